"""The control evidence of the suite's two profiles, from outside: ``pytest`` and then
``pytest -m battery`` run as processes on a small project that uses the suite's evidence
plugin (tests/compliance_evidence.py), and the evidence file they leave is read back.

The file says ``complete`` only when every test of the suite that proves an item ran:
a test that never ran (a run stopped at its first failure, a test left out by hand)
cannot fail, so an item it proves must not look proven by the others alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_PLUGIN_DIR = Path(__file__).resolve().parent

_PYPROJECT = """\
[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-m 'not battery'"
markers = [
  "battery: long runs",
  "control(*ids): items a test proves",
  "evidence_check: runs last",
]
"""

_SUITE = """\
import os

import pytest


def _outcome(name):
    assert name not in os.environ.get("FAILING", "").split(","), name


@pytest.mark.control("T1")
def test_t1_first():
    _outcome("t1_first")


@pytest.mark.control("T1")
def test_t1_second():
    _outcome("t1_second")
"""

_BATTERY = """\
import os

import pytest


def _outcome(name):
    assert name not in os.environ.get("FAILING", "").split(","), name


@pytest.mark.battery
@pytest.mark.control("T2")
def test_t2_long():
    _outcome("t2_long")


@pytest.mark.battery
@pytest.mark.control("T1")
def test_t1_long():
    _outcome("t1_long")
"""


def _project(root: Path) -> Path:
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(_PYPROJECT, encoding="utf-8")
    (root / "tests" / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(_PLUGIN_DIR)!r})\n"
        "pytest_plugins = ['compliance_evidence']\n", encoding="utf-8")
    (root / "tests" / "test_suite.py").write_text(_SUITE, encoding="utf-8")
    (root / "tests" / "test_battery.py").write_text(_BATTERY, encoding="utf-8")
    return root


def _pytest(root: Path, *args: str, failing: str = "") -> int:
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_CONTROL_EVIDENCE"}
    env["FAILING"] = failing
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    return run.returncode


def _evidence(root: Path) -> dict[str, Any]:
    document = json.loads((root / ".compliance" / "evidence.json").read_text(encoding="utf-8"))
    document["outcomes"] = {t["id"].split("::")[1]: t["outcome"] for t in document["tests"]}
    return document


def test_both_profiles_passing_make_the_whole_suites_evidence(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root) == 0
    assert _evidence(root)["complete"] is False
    assert _pytest(root, "-m", "battery") == 0
    evidence = _evidence(root)
    assert evidence["complete"] is True
    assert evidence["outcomes"] == {"test_t1_first": "passed", "test_t1_second": "passed",
                                    "test_t2_long": "passed", "test_t1_long": "passed"}


def test_a_failing_battery_test_is_in_the_evidence_as_failed(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root) == 0
    assert _pytest(root, "-m", "battery", failing="t2_long") == 1
    evidence = _evidence(root)
    assert evidence["complete"] is True
    assert evidence["outcomes"]["test_t2_long"] == "failed"
    assert evidence["outcomes"]["test_t1_long"] == "passed"


def test_a_battery_run_stopped_early_is_not_the_whole_suites_evidence(tmp_path: Path) -> None:
    """``-x`` stops at the first failure: the battery test of T1 after it never ran, and
    T1 must not look proven by the suite's two tests alone in a complete run."""
    root = _project(tmp_path)
    assert _pytest(root) == 0
    assert _pytest(root, "-m", "battery", "-x", failing="t2_long") == 1
    evidence = _evidence(root)
    assert "test_t1_long" not in evidence["outcomes"]
    assert evidence["complete"] is False


def test_a_battery_test_left_out_by_hand_leaves_the_evidence_incomplete(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root) == 0
    assert _pytest(root, "-m", "battery", "--deselect", "tests/test_battery.py::test_t1_long") == 0
    assert _evidence(root)["complete"] is False


def test_a_default_run_stopped_early_is_not_completed_by_the_battery(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root, "-x", failing="t1_first") == 1
    assert _evidence(root)["complete"] is False
    assert _pytest(root, "-m", "battery") == 0
    evidence = _evidence(root)
    assert "test_t1_second" not in evidence["outcomes"]
    assert evidence["complete"] is False


def test_everything_at_once_is_complete_only_when_everything_ran(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root, "-m", "") == 0
    assert _evidence(root)["complete"] is True
    assert _pytest(root, "-m", "", "-x", failing="t1_first") == 1
    assert _evidence(root)["complete"] is False


def test_one_file_is_never_the_whole_suite(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _pytest(root, "tests/test_suite.py") == 0
    assert _evidence(root)["complete"] is False
    assert _pytest(root, "-m", "battery") == 0
    assert _evidence(root)["complete"] is False
