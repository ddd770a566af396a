"""Files that hold the store, or describe the controller, are the owner's only.

``bridge store backup`` and ``bridge compliance report --html`` run in their own
processes with the usual umask (022, which would leave files readable by everyone);
what they write has mode 600, and a new backup folder mode 700.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from ops_support import make_site

from bridge.config import load_config
from bridge.ledger import open_store

UMASK_022 = ("import os, sys, runpy; os.umask(0o022); sys.argv = ['bridge', *sys.argv[1:]];"
             " runpy.run_module('bridge', run_name='__main__')")


def _bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", UMASK_022, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_backup_and_a_report_page_are_written_for_the_owner_only(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    with open_store(load_config(site.hospital).store):
        pass  # the store a serving bridge would have made
    run = _bridge("store", "backup", "--config", str(site.hospital), str(tmp_path / "backup"))
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "backup"
    assert _mode(folder) == 0o700
    modes = {f.name: _mode(f) for f in folder.iterdir()}
    assert {"manifest.json", "store.sqlite"} <= set(modes)
    # SQLite's own side files (-wal, -shm) take the database file's mode.
    assert set(modes.values()) == {0o600}, modes
    assert json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["kind"] == "sqlite"

    evidence = tmp_path / "evidence.json"
    evidence.write_text(json.dumps({"finished": "now", "complete": False, "tests": []}))
    page = tmp_path / "report.html"
    run = _bridge("compliance", "report", "--config", str(site.hospital), "--html", str(page),
                  "--evidence", str(evidence))
    assert run.returncode == 0, run.stderr
    assert _mode(page) == 0o600 and "<tr id=" in page.read_text(encoding="utf-8")
