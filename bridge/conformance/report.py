"""Reports of a conformance run: a table for the terminal, JUnit XML for a CI system,
and one self-contained HTML page for a person (pass/fail per requirement, with the
evidence exchanged)."""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bridge.conformance import protocol as P
from bridge.conformance.kit import (
    Case,
    Requirement,
    Result,
    all_cases,
    conformant,
    coverage,
)

_MARK = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "error": "ERROR"}


def _status_of(results: Sequence[Result]) -> str:
    """One status for a requirement from the results of the cases that check it."""
    if not results:
        return "untested"
    if any(r.status in ("fail", "error") for r in results):
        return "fail"
    if all(r.status == "pass" for r in results):
        return "pass"
    return "partial" if any(r.status == "pass" for r in results) else "skip"


def write_table(results: Sequence[Result], out: TextIO, *, target: str) -> None:
    width = max((len(r.case.id) for r in results), default=10)
    out.write(f"conformance run against {target} (protocol {P.PROTOCOL_VERSION})\n")
    for r in results:
        reqs = ",".join(r.case.requirements)
        optional = "" if r.case.required else " (may be skipped)"
        line = f"{_MARK[r.status]:<5} {r.case.id:<{width}} {r.seconds:6.2f}s  {reqs}{optional}"
        out.write(line + "\n")
        if r.detail:
            out.write(f"      {r.detail}\n")
        if r.measures:
            out.write("      " + ", ".join(f"{k}={v}" for k, v in r.measures.items()) + "\n")
    counts = {s: sum(1 for r in results if r.status == s) for s in _MARK}
    total = sum(r.seconds for r in results)
    verdict = "CONFORMANT" if conformant(results) else "NOT CONFORMANT"
    out.write(
        f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['error']} "
        f"errors, {counts['skip']} skipped in {total:.1f} s\n"
    )


def write_junit(results: Sequence[Result], path: Path, *, target: str) -> None:
    suite = ET.Element(
        "testsuite",
        name="ws-fhir-bridge conformance",
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.status == "fail")),
        errors=str(sum(1 for r in results if r.status == "error")),
        skipped=str(sum(1 for r in results if r.status == "skip")),
        time=f"{sum(r.seconds for r in results):.3f}",
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="target", value=target)
    ET.SubElement(props, "property", name="protocol", value=P.PROTOCOL_VERSION)
    for r in results:
        tc = ET.SubElement(
            suite, "testcase", classname=f"conformance.{r.case.family}", name=r.case.id,
            time=f"{r.seconds:.3f}",
        )
        cprops = ET.SubElement(tc, "properties")
        for rid in r.case.requirements:
            ET.SubElement(cprops, "property", name="requirement", value=rid)
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=r.detail).text = _evidence_text(r)
        elif r.status == "error":
            ET.SubElement(tc, "error", message=r.detail).text = _evidence_text(r)
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=r.detail)
        ET.SubElement(tc, "system-out").text = _evidence_text(r)
    tree = ET.ElementTree(suite)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def _evidence_text(r: Result) -> str:
    parts = []
    for e in r.evidence:
        parts.append(f"--- {e.label} ({e.seconds:.3f} s)\n>>> {e.sent}\n<<< {e.received}")
    return "\n".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} table{border-collapse:collapse;margin:1em 0;width:100%}
td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}
.pass{background:#e3f6e3}.fail,.error{background:#fbe0e0}.skip,.partial{background:#fff6d6}
.untested{background:#eee} pre{white-space:pre-wrap;font-size:.85em;margin:.2em 0;
background:#f7f7f7;padding:.4em;max-height:24em;overflow:auto}
details{margin:.2em 0} .verdict{font-size:1.2em;font-weight:bold}
"""


def write_html(
    results: Sequence[Result],
    requirements: Sequence[Requirement],
    path: Path,
    *,
    target: str,
) -> None:
    """One page, no external resources: the verdict, the requirements with their
    status and cases, then every case with its evidence."""
    e = html.escape
    by_case = {r.case.id: r for r in results}
    cases: list[Case] = [r.case for r in results]
    covered = coverage(requirements, cases)
    everywhere = coverage(requirements, all_cases())
    verdict = "CONFORMANT" if conformant(results) else "NOT CONFORMANT"
    rows = []
    for req in requirements:
        run = [by_case[c.id] for c in covered.get(req.id, []) if c.id in by_case]
        status = _status_of(run)
        links = " ".join(
            f'<a href="#{e(r.case.id)}">{e(r.case.id)}</a>&nbsp;({_MARK[r.status]})' for r in run
        )
        others = [c.id for c in everywhere.get(req.id, []) if c.id not in by_case]
        note = "" if run else e(
            req.why_not_tested
            or (f"checked by {', '.join(others)} (another role or case selection)"
                if others else "no case in this run")
        )
        rows.append(
            f'<tr class="{status}"><td>{e(req.id)}</td><td>{e(req.level)}</td>'
            f"<td>{e(req.actor)}</td><td>{e(req.text)}</td><td>{status}</td>"
            f"<td>{links or note}</td></tr>"
        )
    sections = []
    for r in results:
        evidence = "".join(
            f"<details><summary>{e(x.label)} ({x.seconds:.3f} s)</summary>"
            f"<pre>&gt;&gt;&gt; {e(x.sent)}</pre><pre>&lt;&lt;&lt; {e(x.received)}</pre>"
            "</details>"
            for x in r.evidence
        )
        measures = ", ".join(f"{e(k)}={e(str(v))}" for k, v in r.measures.items())
        sections.append(
            f'<tr class="{r.status}" id="{e(r.case.id)}"><td>{e(r.case.id)}</td>'
            f"<td>{_MARK[r.status]}{'' if r.case.required else ' (may be skipped)'}</td>"
            f"<td><b>{e(r.case.title)}</b><br>{e(r.case.description)}"
            f"{'<br><b>' + e(r.detail) + '</b>' if r.detail else ''}"
            f"{'<br>' + measures if measures else ''}{evidence}</td>"
            f"<td>{', '.join(e(x) for x in r.case.requirements)}</td>"
            f"<td>{r.seconds:.2f} s</td></tr>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Conformance of {e(target)}</title><style>{_STYLE}</style></head><body>
<h1>ws-fhir-bridge protocol {P.PROTOCOL_VERSION} conformance: {e(target)}</h1>
<p class="verdict">{verdict}</p>
<p>{sum(1 for r in results if r.passed)} of {len(results)} cases passed;
run {e(datetime.now(UTC).isoformat(timespec="seconds"))}.</p>
<h2>Requirements</h2>
<table><tr><th>id</th><th>level</th><th>actor</th><th>requirement</th><th>status</th>
<th>cases</th></tr>{''.join(rows)}</table>
<h2>Cases and evidence</h2>
<table><tr><th>case</th><th>result</th><th>what it checks</th><th>requirements</th>
<th>time</th></tr>{''.join(sections)}</table>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def write_requirements(
    requirements: Sequence[Requirement], cases: Sequence[Case], out: TextIO
) -> None:
    covered = coverage(requirements, cases)
    for req in requirements:
        ids = [c.id for c in covered.get(req.id, [])]
        listed = ", ".join(ids) if ids else f"(none: {req.why_not_tested or 'no case yet'})"
        out.write(f"{req.id:<11} {req.level:<6} {req.actor:<9} {listed}\n")
    unknown = sorted({rid for c in cases for rid in c.requirements} - {r.id for r in requirements})
    out.writelines(f"{rid:<11} (cited by a case but not in requirements.csv)\n" for rid in unknown)
