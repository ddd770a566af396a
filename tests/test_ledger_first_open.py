"""Opening a SQLite store while another process is making it.

A new store file starts in SQLite's rollback-journal mode until the first process
switches it to WAL; a second process opening it meanwhile (a ``bridge serve`` and a
``bridge consent add`` started together on a new controller) must wait for the lock, as
it does for every other statement, not fail at once with SQLITE_BUSY."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from bridge.ledger.sqlite import SQLiteStore


def test_opening_waits_for_a_writer_of_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sqlite"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE made_first (x)")  # still a rollback-journal file
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO made_first VALUES (1)")
    done = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    done.start()
    started = time.monotonic()
    try:
        SQLiteStore(path).close()  # SQLite refuses the switch to WAL at once: retried
    finally:
        done.join()
        writer.close()
    assert time.monotonic() - started >= 0.2


def test_processes_opening_a_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    failures = 0
    for attempt in range(10):
        path = tmp_path / f"store-{attempt}.sqlite"
        go = time.time() + 0.2
        children = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                while time.time() < go:
                    pass
                status = 1
                try:
                    SQLiteStore(path).close()
                    status = 0
                finally:
                    os._exit(status)
            children.append(pid)
        for pid in children:
            _, status = os.waitpid(pid, 0)
            failures += status != 0
    assert failures == 0
