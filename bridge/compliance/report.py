"""``bridge compliance report``: every Appendix F item with its status for one
configuration, the feature that meets it, and the tests that prove it.

Statuses come from :mod:`bridge.compliance.catalog`, assessed against the live
configuration. Tests come from the evidence a test run wrote (``.compliance/
evidence.json``, see ``tests/compliance_evidence.py``): every test marked with the
item's id, and whether it passed in that run. Nothing about tests is written by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.compliance.catalog import ITEMS, AuditLogFacts, Facts

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

STANDARD = "GB/T 39725-2020 附录F 表F.1"


@dataclass(frozen=True)
class TestEvidence:
    id: str
    outcome: str  # passed, failed, skipped


@dataclass
class Evidence:
    """The tests of one run, by the items they prove."""

    source: str | None = None
    finished: str | None = None
    complete: bool = False
    by_item: dict[str, list[TestEvidence]] = field(default_factory=dict)


def default_evidence_path() -> Path | None:
    """The evidence of the last test run of this checkout, if there is one."""
    import os

    named = os.environ.get("BRIDGE_CONTROL_EVIDENCE")
    candidates = [Path(named)] if named else []
    candidates += [Path.cwd() / ".compliance" / "evidence.json",
                   Path(__file__).resolve().parents[2] / ".compliance" / "evidence.json"]
    return next((p for p in candidates if p.is_file()), None)


def load_evidence(path: Path | None) -> Evidence:
    """Read an evidence file (``tests/compliance_evidence.py`` writes it)."""
    from bridge.errors import ParseError

    if path is None:
        return Evidence()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        tests = document["tests"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ParseError("not a control evidence file", location=str(path)) from None
    return evidence_from_tests(tests, source=str(path), finished=document.get("finished"),
                               complete=bool(document.get("complete")))


def evidence_from_tests(tests: list[dict[str, Any]], *, source: str | None = None,
                        finished: str | None = None, complete: bool = False) -> Evidence:
    evidence = Evidence(source, finished, complete)
    for test in tests:
        for control in test.get("controls", []):
            evidence.by_item.setdefault(str(control), []).append(
                TestEvidence(str(test["id"]), str(test.get("outcome", "not run"))))
    return evidence


def audit_log_facts(store: Any) -> AuditLogFacts:
    """Checkpoints and partners' cosignatures held by an open store, whether its chain
    verifies from genesis (read whole: a report is not made often), which of its
    append-only triggers remain, and what it holds plain."""
    from bridge.ledger import tree
    from bridge.ledger.sealing import plain_values

    cosigned = tree.cosigned_checkpoints(store)
    chain = store.verify_audit()
    broken = None if chain.ok else f"entry {chain.first_bad_seq}: {chain.reason}"
    return AuditLogFacts(checkpoints=len(tree.own_checkpoints(store)),
                         cosignatures=len(cosigned),
                         cosigners=tuple(sorted({c for c, _, _ in cosigned})),
                         chain_broken=broken, guards=store.audit_guards(),
                         plain_values=tuple(sorted(plain_values(store).items())))


def build_report(config: BridgeConfig, evidence: Evidence, *,
                 audit: AuditLogFacts | None = None,
                 audit_unread: str = "the store was not read") -> dict[str, Any]:
    """The report as data (the text, JSON and HTML forms render this). ``audit``: what the
    store holds of its audit log's protection, or None with the reason."""
    facts = Facts(config, audit, audit_unread)
    items: list[dict[str, Any]] = []
    for item in ITEMS:
        status, why = item.assess(facts)
        tests = evidence.by_item.get(item.id, [])
        items.append({
            "id": item.id,
            "question": item.text,
            "line": item.line,
            "asks": item.asks,
            "status": status,
            "why": why,
            "feature": item.feature,
            "tests": [{"id": t.id, "outcome": t.outcome} for t in tests],
            "proven": bool(tests) and all(t.outcome == "passed" for t in tests),
        })
    counts: dict[str, int] = {}
    for row in items:
        status_name = str(row["status"])
        counts[status_name] = counts.get(status_name, 0) + 1
    return {
        "standard": STANDARD,
        "controller": config.controller.id,
        "configuration": str(config.source) if config.source else None,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "evidence": {"file": evidence.source, "finished": evidence.finished,
                     "complete_run": evidence.complete},
        "counts": dict(sorted(counts.items())),
        "items": items,
    }


def render_text(report: dict[str, Any]) -> str:
    out = [f"{report['controller']}: {report['standard']}, "
           + ", ".join(f"{n} {s}" for s, n in report["counts"].items())]
    ev = report["evidence"]
    out.append(f"  tests: {ev['file']} ({ev['finished']})" if ev["file"] else
               "  tests: no evidence file; run the test suite to record it")
    for row in report["items"]:
        out.append(f"{row['id']:<4} {row['status']:<15} {row['asks']}")
        out.append(f"     why:     {row['why']}")
        out.append(f"     feature: {row['feature']}")
        for test in row["tests"]:
            out.append(f"     test:    {test['id']} [{test['outcome']}]")
    return "\n".join(out) + "\n"


_COLOURS = {"met": "#17663a", "partial": "#8a5a00", "not met": "#a3141e",
            "not applicable": "#5b6475"}


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page (no scripts, no external assets) for an auditor."""
    e = escape
    rows = []
    for row in report["items"]:
        tests = "".join(
            f"<li><code>{e(t['id'])}</code> <b class='{'ok' if t['outcome'] == 'passed' else 'bad'}'>"
            f"{e(t['outcome'])}</b></li>" for t in row["tests"]) or "<li class='muted'>none</li>"
        rows.append(
            f"<tr id='{e(row['id'])}'><th>{e(row['id'])}</th>"
            f"<td lang='zh'>{e(row['question'])}<div class='muted'>{e(row['asks'])}"
            f" (line {row['line']})</div></td>"
            f"<td style='color:{_COLOURS[row['status']]}'><b>{e(row['status'])}</b>"
            f"<div>{e(row['why'])}</div></td>"
            f"<td>{e(row['feature'])}</td><td><ul>{tests}</ul></td></tr>")
    ev = report["evidence"]
    evidence = (f"Tests from <code>{e(str(ev['file']))}</code>, run finished {e(str(ev['finished']))}"
                + (" (the whole suite)." if ev["complete_run"] else " (part of the suite).")
                if ev["file"] else "No test evidence: run the test suite to record it.")
    counts = ", ".join(f"{n} {e(s)}" for s, n in report["counts"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{e(report['controller'])}: {e(report['standard'])}</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#1d2330}}
table{{border-collapse:collapse}}th,td{{border:1px solid #d8dde6;padding:.35em .6em;
vertical-align:top;text-align:left}}thead th{{background:#eef1f5}}
.muted{{color:#5b6475;font-size:.92em}}.ok{{color:#17663a}}.bad{{color:#a3141e}}
ul{{margin:0;padding-left:1.1em}}code{{font-size:.9em}}
@media print{{body{{margin:0}}}}
</style></head><body>
<h1>{e(report['standard'])}</h1>
<p>Controller <b>{e(report['controller'])}</b>, configuration
<code>{e(str(report['configuration']))}</code>, generated {e(report['generated'])}.
{counts}.</p>
<p>{evidence} Statuses are read from the configuration above; each test named passed
or failed in that run.</p>
<table><thead><tr><th>item</th><th>the standard asks</th><th>status</th>
<th>feature</th><th>tests</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table></body></html>
"""


__all__ = ["Evidence", "audit_log_facts", "build_report", "default_evidence_path", "evidence_from_tests",
           "load_evidence", "render_html", "render_text"]
