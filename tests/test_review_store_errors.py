"""A store the command cannot use says why in words an operator acts on: locked by
another process, not a database at all. (SQLite's exception class alone,
``OperationalError``, told neither.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest


def bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def hospital(tmp_path: Path) -> Path:
    run = bridge("init", "hospital", "site", "--port", "0", "--ops-port", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = bridge("consent", "add", "--config", "site/hospital.toml",
                 "site/hospital-a/samples/consent.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    return tmp_path


def test_a_store_locked_by_another_process(hospital: Path) -> None:
    store = hospital / "site" / "hospital-a" / "bridge.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sqlite3, sys, time\n"
         f"c = sqlite3.connect({str(store)!r}, isolation_level=None)\n"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        run = bridge("status", "--config", "site/hospital.toml", cwd=hospital)
        assert time.monotonic() - started < 60
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 1
    assert run.stderr.startswith("error [store-error]:"), run.stderr
    assert "another process holds the store locked" in run.stderr
    assert str(store) in run.stderr and len(run.stderr.splitlines()) == 1


def test_a_store_path_holding_something_else(hospital: Path) -> None:
    store = hospital / "site" / "hospital-a" / "bridge.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    store.write_text("notes, not a database\n" * 100, encoding="utf-8")
    run = bridge("status", "--config", "site/hospital.toml", cwd=hospital)
    assert run.returncode == 1
    assert "the file is not an SQLite database" in run.stderr, run.stderr
