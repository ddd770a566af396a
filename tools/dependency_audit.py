"""Known vulnerabilities in the installed dependencies (GB/T 39725 Appendix F, T14).

Runs ``pip-audit`` against the installed environment and ``npm audit`` for the FHIR
validator, and exits 1 when either finds a known vulnerability that has a fix. Where a
vulnerability database cannot be reached (a network that reaches only the package
registries), the audit says which packages it could not check and why, and does not
fail: a red build must mean a vulnerability, never a network.

Where pip-audit cannot fetch a package's release data, the package's project page on
the PyPI JSON API (``/pypi/<name>/json``) is asked instead: it lists the known
vulnerabilities of the latest release, so a package installed at its latest release is
still audited; an older one is reported as not audited.

    python tools/dependency_audit.py [--python-only | --npm-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any

PYPI_PROJECT = "https://pypi.org/pypi/{name}/json"


@dataclass
class Findings:
    ecosystem: str
    vulnerable: list[str] = field(default_factory=list)  # "name version: ID (fix X)"
    unfixed: list[str] = field(default_factory=list)  # known, no fix yet
    audited: int = 0
    not_audited: list[str] = field(default_factory=list)
    unreachable: str | None = None

    def lines(self) -> list[str]:
        out = [(f"{self.ecosystem}: {self.audited} packages audited, "
                f"{len(self.vulnerable)} with a fixable vulnerability")]
        out += [f"  VULNERABLE {v}" for v in self.vulnerable]
        out += [f"  known, no fix yet: {v}" for v in self.unfixed]
        if self.unreachable:
            out.append(f"  not audited: {self.unreachable}")
        if self.not_audited:
            out.append(f"  not audited ({len(self.not_audited)}): "
                       + ", ".join(self.not_audited[:12])
                       + (" ..." if len(self.not_audited) > 12 else ""))
        return out


def classify_pip_audit(report: dict[str, Any],
                       project: Any = None) -> Findings:
    """Findings from ``pip-audit --format json``; ``project(name)`` returns the PyPI
    project JSON of a package pip-audit skipped (or None when it cannot be had)."""
    found = Findings("python")
    for dep in report.get("dependencies", []):
        name = str(dep.get("name"))
        version = str(dep.get("version") or _installed(name))
        if "skip_reason" in dep:
            if "editable" in str(dep["skip_reason"]) or name == "ws-fhir-bridge":
                continue
            page = project(name) if project is not None else None
            if page is None or str(page.get("info", {}).get("version")) != version:
                found.not_audited.append(f"{name} {version}")
                continue
            found.audited += 1
            for vuln in page.get("vulnerabilities") or []:
                fixes = [str(f) for f in vuln.get("fixed_in") or []]
                entry = f"{name} {version}: {vuln.get('id')}"
                (found.vulnerable if fixes else found.unfixed).append(
                    entry + (f" (fix {', '.join(fixes)})" if fixes else ""))
            continue
        found.audited += 1
        for vuln in dep.get("vulns", []):
            fixes = [str(f) for f in vuln.get("fix_versions") or []]
            entry = f"{name} {version}: {vuln.get('id')}"
            (found.vulnerable if fixes else found.unfixed).append(
                entry + (f" (fix {', '.join(fixes)})" if fixes else ""))
    return found


def classify_npm_audit(report: dict[str, Any]) -> Findings:
    """Findings from ``npm audit --json`` (an error object when the audit endpoint failed)."""
    found = Findings("npm")
    if "error" in report or "message" in report and "vulnerabilities" not in report:
        error = report.get("error") or report
        summary = error.get("summary") if isinstance(error, dict) else None
        found.unreachable = f"the npm audit endpoint failed ({summary or report.get('message')})"
        return found
    meta = report.get("metadata", {}).get("dependencies", {})
    found.audited = int(meta.get("total", 0)) if isinstance(meta, dict) else 0
    for name, vuln in (report.get("vulnerabilities") or {}).items():
        entry = f"{name} {vuln.get('range', '')}: {vuln.get('severity')}"
        (found.vulnerable if vuln.get("fixAvailable") else found.unfixed).append(entry)
    return found


def _installed(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _project(name: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(PYPI_PROJECT.format(name=name), timeout=20) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def audit_python() -> Findings:
    run = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"],
        capture_output=True, text=True, check=False,
    )
    try:
        report = json.loads(run.stdout)
    except ValueError:
        found = Findings("python")
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        found.unreachable = f"pip-audit did not run ({last[:200]})"
        return found
    return classify_pip_audit(report, project=_project)


def audit_npm() -> Findings:
    run = subprocess.run(["npm", "audit", "--json"], capture_output=True, text=True,
                         check=False)
    try:
        return classify_npm_audit(json.loads(run.stdout or "{}"))
    except ValueError:
        found = Findings("npm")
        found.unreachable = "npm audit gave no JSON"
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--python-only", action="store_true", help="only the Python packages")
    which.add_argument("--npm-only", action="store_true", help="only the npm packages")
    args = parser.parse_args(argv)
    results = []
    if not args.npm_only:
        results.append(audit_python())
    if not args.python_only:
        results.append(audit_npm())
    for found in results:
        sys.stdout.write("\n".join(found.lines()) + "\n")
    return 1 if any(f.vulnerable for f in results) else 0


if __name__ == "__main__":
    sys.exit(main())
