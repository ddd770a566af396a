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

from ops_support import make_site, wait_for

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


def _serving(config: Path) -> subprocess.Popen[str]:
    """``bridge serve`` with umask 022, once it says ready."""
    proc = subprocess.Popen([sys.executable, "-c", UMASK_022, "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"bridge serve did not start: {line!r}")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _modes_while_serving(config: Path, store: Path) -> dict[str, int]:
    """The modes of the store file and its two logs while ``bridge serve`` has it open."""
    files = [store, Path(f"{store}-wal"), Path(f"{store}-shm")]
    proc = _serving(config)
    try:
        wait_for(lambda: all(f.exists() for f in files), what="the store and its logs")
        return {f.name: _mode(f) for f in files}
    finally:
        _stop(proc)


def test_the_store_and_its_logs_are_made_for_the_owner_only(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    store = load_config(site.hospital).store.path
    assert not store.exists()
    run = _bridge("store", "migrate", "--config", str(site.hospital))
    assert run.returncode == 0, run.stderr
    assert _mode(store) == 0o600
    store.unlink()
    # Made by a serving bridge: the file, and the write-ahead log and shared memory
    # index SQLite makes beside it while it is open.
    modes = _modes_while_serving(site.hospital, store)
    assert set(modes.values()) == {0o600}, modes


def test_a_store_already_there_keeps_its_mode(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    store = load_config(site.hospital).store.path
    assert _bridge("store", "migrate", "--config", str(site.hospital)).returncode == 0
    os.chmod(store, 0o640)  # the operator's choice (a backup agent's group reads it)
    modes = _modes_while_serving(site.hospital, store)
    assert set(modes.values()) == {0o640}, modes
