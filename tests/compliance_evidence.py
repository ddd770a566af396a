"""Pytest plugin: the evidence behind ``bridge compliance report``.

A test that proves an Appendix F item says so with ``@pytest.mark.control("T3", ...)``.
This plugin notes every such test as it is collected and its outcome as it runs, and
at the end of the session writes ``.compliance/evidence.json`` under the project root
(or the file named by ``--control-evidence``): the run's time, and for each marked
test its node id, the items it proves and whether it passed. The report reads that
file; nothing in it is written by hand.

Tests marked ``evidence_check`` run after every other test and can read the live
evidence through :func:`live_evidence`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

_EVIDENCE = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--control-evidence", default=None,
                     help="where to write the Appendix F control evidence of this run")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_EVIDENCE] = {"tests": {}, "collected": set(), "files": set()}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    evidence = config.stash[_EVIDENCE]
    for item in items:
        evidence["collected"].add(item.nodeid)
        evidence["files"].add(item.nodeid.split("::")[0])
        ids: list[str] = []
        for mark in item.iter_markers("control"):
            ids.extend(str(a) for a in mark.args)
        if ids:
            evidence["tests"][item.nodeid] = {"controls": sorted(set(ids)), "outcome": "not run"}
    # The evidence check runs last, when every other outcome is known.
    items.sort(key=lambda i: i.get_closest_marker("evidence_check") is not None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # The stash is reached through the report's config in pytest_runtest_makereport;
    # here the session-wide registry below is used instead.
    entry = _CURRENT.get("tests", {}).get(report.nodeid)
    if entry is None:
        return
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"
    elif report.when == "call" and report.passed and entry["outcome"] == "not run":
        entry["outcome"] = "passed"


_CURRENT: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _CURRENT.clear()
    _CURRENT.update(session.config.stash[_EVIDENCE])


def live_evidence(config: pytest.Config) -> dict[str, Any]:
    """The evidence of the running session (node id -> controls and outcome so far)."""
    return config.stash[_EVIDENCE]


def evidence_file(config: pytest.Config) -> Path:
    chosen = config.getoption("--control-evidence") or os.environ.get("BRIDGE_CONTROL_EVIDENCE")
    return Path(chosen) if chosen else Path(config.rootpath) / ".compliance" / "evidence.json"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    evidence = session.config.stash[_EVIDENCE]
    ran = {k: v for k, v in evidence["tests"].items() if v["outcome"] != "not run"}
    if not ran:
        return
    path = evidence_file(session.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": "ws-fhir-bridge control evidence 1",
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": _whole_suite(session.config, evidence),
        "tests": [{"id": k, **v} for k, v in sorted(ran.items())],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _whole_suite(config: pytest.Config, evidence: dict[str, Any]) -> bool:
    """True when every test file of the suite was collected (a full run)."""
    tests_dir = Path(config.rootpath) / "tests"
    files = {f"tests/{p.name}" for p in tests_dir.glob("test_*.py")}
    return bool(files) and files <= evidence["files"] and not config.getoption("keyword") and (
        not config.getoption("markexpr"))
