#!/usr/bin/env node
// Validate FHIR JSON files against the FHIR R4 core definitions shipped with the npm
// package `fhir` (pre-parsed R4 StructureDefinitions and value sets), independently of
// the Python models the bridge uses.
//
// Usage: node tools/validate-fhir-r4.js FILE.json [FILE.json ...]
// Prints one JSON document on stdout:
//   {"validator": "fhir@<version>", "fhirVersion": "R4",
//    "results": [{"file": ..., "valid": true|false, "messages": [{severity, location, message}]}]}
// Exit status: 0 when every file is valid, 1 when any is not, 2 on a usage or read error.
// Warnings and information messages are reported but do not make a file invalid.
'use strict';

const fs = require('fs');
const path = require('path');

let Fhir;
let version;
try {
  Fhir = require('fhir').Fhir;
  version = require('fhir/package.json').version;
} catch (err) {
  process.stderr.write('the npm package "fhir" is not installed (run `npm ci` at the repository root)\n');
  process.exit(2);
}

const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write('usage: node tools/validate-fhir-r4.js FILE.json [FILE.json ...]\n');
  process.exit(2);
}

// The default parser of the package holds the R4 definitions.
const fhir = new Fhir();
const results = [];
let allValid = true;
for (const file of files) {
  let resource;
  try {
    resource = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    results.push({file: path.resolve(file), valid: false,
                  messages: [{severity: 'fatal', location: '', message: 'cannot read or parse JSON'}]});
    allValid = false;
    continue;
  }
  // errorOnUnexpected: an element R4 does not define (an R4B/R5-only element) is an error.
  const response = fhir.validate(resource, {errorOnUnexpected: true});
  const messages = (response.messages || []).map((m) => ({
    severity: m.severity || 'error', location: m.location || '', message: m.message || '',
  }));
  const valid = !messages.some((m) => m.severity === 'error' || m.severity === 'fatal');
  if (!valid) allValid = false;
  results.push({file: path.resolve(file), valid, messages});
}
process.stdout.write(JSON.stringify({validator: `fhir@${version}`, fhirVersion: 'R4', results}) + '\n');
// exitCode, not exit(): exit() would cut a large report short when stdout is a pipe.
process.exitCode = allValid ? 0 : 1;
