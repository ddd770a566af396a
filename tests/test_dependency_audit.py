"""The dependency audit's verdicts on the reports pip-audit and npm audit write."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from dependency_audit import classify_npm_audit, classify_pip_audit


@pytest.mark.control("T14")
def test_a_known_vulnerability_with_a_fix_fails_and_an_unreachable_database_does_not() -> None:
    report = {"dependencies": [
        {"name": "aiohttp", "version": "3.8.0", "vulns": [
            {"id": "GHSA-xxxx", "fix_versions": ["3.9.4"], "aliases": []}]},
        {"name": "orjson", "version": "3.10.0", "vulns": []},
        {"name": "idna", "version": "3.0", "vulns": [{"id": "PYSEC-1", "fix_versions": []}]},
        {"name": "yarl", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "attrs", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "ws-fhir-bridge", "skip_reason": "distribution marked as editable"},
    ]}
    pages: dict[str, Any] = {
        # Installed at its latest release: that release's vulnerabilities apply.
        "yarl": {"info": {"version": "1.2"}, "vulnerabilities": [
            {"id": "GHSA-yyyy", "fixed_in": ["1.3"]}]},
        # Behind its latest release: cannot be told from the project page.
        "attrs": {"info": {"version": "26.1.0"}, "vulnerabilities": []},
    }
    import dependency_audit

    original = dependency_audit._installed
    dependency_audit._installed = lambda name: {"yarl": "1.2", "attrs": "25.0"}.get(name, "?")
    try:
        found = classify_pip_audit(report, project=pages.get)
    finally:
        dependency_audit._installed = original
    assert found.vulnerable == ["aiohttp 3.8.0: GHSA-xxxx (fix 3.9.4)",
                                "yarl 1.2: GHSA-yyyy (fix 1.3)"]
    assert found.unfixed == ["idna 3.0: PYSEC-1"]
    assert found.not_audited == ["attrs 25.0"]
    assert found.audited == 4

    unreachable = classify_npm_audit({"message": "405 Method Not Allowed - POST https://"
                                      "registry.npmjs.org/-/npm/v1/security/advisories/bulk",
                                      "method": "POST"})
    assert unreachable.unreachable and not unreachable.vulnerable
    npm = classify_npm_audit({
        "vulnerabilities": {
            "lodash": {"severity": "high", "range": "<4.17.21", "fixAvailable": True},
            "minimist": {"severity": "low", "range": "<1.2.6", "fixAvailable": False},
        },
        "metadata": {"dependencies": {"total": 120}},
    })
    assert npm.vulnerable == ["lodash <4.17.21: high"] and npm.audited == 120
    assert npm.unfixed == ["minimist <1.2.6: low"]
