"""Pytest plugin: the evidence behind ``bridge compliance report``.

A test that proves an Appendix F item says so with ``@pytest.mark.control("T3", ...)``.
This plugin notes every such test as it is collected and its outcome as it runs, and
at the end of the session writes ``.compliance/evidence.json`` under the project root
(or the file named by ``--control-evidence``): the run's time, and for each marked
test its node id, the items it proves and whether it passed. The report reads that
file; nothing in it is written by hand.

Tests marked ``evidence_check`` run after every other test and can read the live
evidence through :func:`live_evidence`.

The suite has two profiles (``pyproject.toml``): the default one leaves out the tests
marked ``battery`` (long end-to-end runs), and ``pytest -m battery`` runs exactly those;
CI runs both, the default profile first. The default profile notes the battery tests it
leaves out as *deferred*; the battery profile then adds its outcomes to the default
profile's evidence file, and the two together are the whole suite's evidence.
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


#: The marker expressions of the suite's two profiles (``addopts`` in pyproject.toml).
DEFAULT_PROFILE = "not battery"
BATTERY_PROFILE = "battery"


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_EVIDENCE] = {"tests": {}, "collected": set(), "files": set(),
                               "battery": set(), "deferred": set()}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    # First of every plugin, so before ``-m`` deselects: every test of the suite is known.
    evidence = config.stash[_EVIDENCE]
    for item in items:
        evidence["collected"].add(item.nodeid)
        evidence["files"].add(item.nodeid.split("::")[0])
        if item.get_closest_marker("battery") is not None:
            evidence["battery"].add(item.nodeid)
        ids: list[str] = []
        for mark in item.iter_markers("control"):
            ids.extend(str(a) for a in mark.args)
        if ids:
            evidence["tests"][item.nodeid] = {"controls": sorted(set(ids)), "outcome": "not run"}
    # The evidence check runs last, when every other outcome is known.
    items.sort(key=lambda i: i.get_closest_marker("evidence_check") is not None)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if not items:
        return
    evidence = items[0].config.stash[_EVIDENCE]
    if _profile(items[0].config) == DEFAULT_PROFILE:
        evidence["deferred"].update(i.nodeid for i in items if i.nodeid in evidence["battery"])


def _profile(config: pytest.Config) -> str:
    return str(config.getoption("markexpr") or "").strip()


def deferred(config: pytest.Config) -> set[str]:
    """The battery tests this run of the default profile leaves to ``pytest -m battery``."""
    return set(config.stash[_EVIDENCE]["deferred"])


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
    config = session.config
    evidence = config.stash[_EVIDENCE]
    ran = {k: v for k, v in evidence["tests"].items() if v["outcome"] != "not run"}
    if not ran:
        return
    path = evidence_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A test that proves an item and never ran (a run stopped at a failure or by hand,
    # a test deselected by hand) has no outcome to show: the run is not the whole suite's.
    missing = {k for k, v in evidence["tests"].items() if v["outcome"] == "not run"}
    whole = _whole_suite(config, evidence) and missing <= evidence["deferred"]
    document: dict[str, Any] = {
        "format": "ws-fhir-bridge control evidence 1",
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": whole and not evidence["deferred"],
        "tests": [{"id": k, **v} for k, v in sorted(ran.items())],
    }
    if whole and evidence["deferred"]:
        document["profile"] = DEFAULT_PROFILE
        document["deferred"] = sorted(evidence["deferred"])
    elif (_profile(config) == BATTERY_PROFILE and not config.getoption("keyword")
          and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
          and not missing & evidence["battery"]):
        document = _with_default_profile(path, document, evidence["battery"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _with_default_profile(path: Path, battery: dict[str, Any],
                          ran: set[str]) -> dict[str, Any]:
    """The evidence of the whole suite, when ``path`` holds the default profile's evidence
    of a whole run and this battery run ran every test it deferred; else this run's own."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return battery
    if not isinstance(previous, dict) or previous.get("profile") != DEFAULT_PROFILE:
        return battery
    if not set(previous.get("deferred", [])) <= ran:
        return battery
    mine = {t["id"] for t in battery["tests"]}
    tests = [t for t in previous.get("tests", []) if t.get("id") not in mine]
    return {**battery, "complete": True,
            "tests": sorted(tests + battery["tests"], key=lambda t: str(t["id"]))}


def _whole_suite(config: pytest.Config, evidence: dict[str, Any]) -> bool:
    """True when every test file of the suite was collected, in the whole suite or in its
    default profile (which leaves the battery to ``pytest -m battery``)."""
    tests_dir = Path(config.rootpath) / "tests"
    files = {f"tests/{p.name}" for p in tests_dir.glob("test_*.py")}
    return bool(files) and files <= evidence["files"] and not config.getoption("keyword") and (
        _profile(config) in ("", DEFAULT_PROFILE))
