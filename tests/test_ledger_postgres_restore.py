"""A PostgreSQL restore and the processes around it: one cut off from the server
while the restore ran, a reader holding a lock on the store the restore set aside, and
another controller's schema named like a store set aside. ``bridge store restore`` runs
as a command; the process that had the store open is a store in this test process,
whose reconnections are held off to stand for a cut network."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from compliance_support import audit_entries
from ops_support import bridge
from pg_support import PGSchema, fresh_schema
from psycopg import sql
from test_compliance_backup import _hospital_backed_up

from bridge.config import load_config
from bridge.errors import StoreError
from bridge.ledger import open_store
from bridge.ledger import postgres as pgmod
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore, aside_schema


@pytest.fixture
def pg() -> Iterator[PGSchema]:
    yield from fresh_schema()


def _write(store: Any) -> str:
    """"written", or why not: an audit append, tried twice (the first call after a
    broken session fails, the next connects again)."""
    why = ""
    for _ in range(2):
        try:
            store.append_audit(AuditRecord(time=datetime.now(UTC), actor="x",
                                           action="stale.write", subject="s"))
            return "written"
        except StoreError as exc:
            why = str(exc)
    return why


@contextmanager
def _cut_off(store: Any, pg: PGSchema) -> Iterator[Callable[[], None]]:
    """The store's sessions end and it cannot connect again until the returned
    function is called (a network cut, then mended)."""
    real = pgmod.connect
    down = {"on": True}

    def partitioned(*args: Any, **kwargs: Any) -> Any:
        if down["on"]:
            raise StoreError("cannot connect to PostgreSQL: network is unreachable")
        return real(*args, **kwargs)

    pgmod.connect = partitioned  # type: ignore[assignment]
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                         " WHERE application_name = %s",
                         (f"ws-fhir-bridge {store.worker_id}"[:63],))
        yield lambda: down.update(on=False)
    finally:
        pgmod.connect = real  # type: ignore[assignment]


def _write_after_cut_off(pg: PGSchema, site: Any, meanwhile: Callable[[], None]) -> str:
    """A store open (a bridge process), cut off from the server while ``meanwhile``
    runs, then connected again: what its next write says."""
    serving = open_store(load_config(site.hospital).store)
    try:
        with _cut_off(serving, pg) as mend:
            meanwhile()
            mend()
            return _write(serving)
    finally:
        serving.close()


@pytest.mark.battery  # restores beside a process cut off from the server
def test_a_process_cut_off_while_a_restore_ran_does_not_write_into_the_restored_store(
    tmp_path: Path, pg: PGSchema
) -> None:
    # Cut off, the process holds no lock, so the restore runs; connected again, its
    # state is of the store before the restore, and it must not go on in the new one.
    site, backup = _hospital_backed_up(tmp_path, pg)

    def restore() -> None:
        run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
        assert run.returncode == 0, run.stderr

    said = _write_after_cut_off(pg, site, restore)
    assert "the store was restored or replaced while this process was cut off" in said
    actions = [e.record.action for e in audit_entries(site.hospital)]
    assert "stale.write" not in actions


@pytest.mark.battery  # restores beside a process cut off from the server
def test_a_process_cut_off_while_a_restore_was_killed_does_not_write_into_its_copy(
    tmp_path: Path, pg: PGSchema
) -> None:
    import subprocess

    site, backup = _hospital_backed_up(tmp_path, pg)

    def killed_restore() -> None:
        # What a restore killed after pg_restore committed leaves.
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                sql.Identifier(pg.schema), sql.Identifier(aside_schema(pg.schema))))
        assert subprocess.run(
            ["pg_restore", "--no-owner", "--single-transaction", f"--dbname={pg.dsn}",
             str(backup / "store.pgdump")], check=False).returncode == 0

    said = _write_after_cut_off(pg, site, killed_restore)
    assert "a restore was killed part way" in said, said


@pytest.mark.battery  # restores beside a process cut off from the server
def test_a_restore_whose_old_store_cannot_be_dropped_says_it_is_done(
    tmp_path: Path, pg: PGSchema
) -> None:
    # A reader (a report, a whole-database pg_dump) holds a lock on a table of the store
    # the restore set aside, and the role's lock_timeout ends the wait for it: the
    # restore is recorded all the same, and says what is left to do.
    slow = PGSchema(f"{pg.dsn} options='-c lock_timeout=1000'", pg.schema)
    site, backup = _hospital_backed_up(tmp_path, slow)
    reader = psycopg.connect(pg.dsn)  # not in autocommit: its lock stays
    reader.execute(sql.SQL("SELECT count(*) FROM {}.consent").format(
        sql.Identifier(pg.schema)))
    try:
        run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    finally:
        reader.rollback()
        reader.close()
    aside = aside_schema(pg.schema)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f'the restore is done and recorded, but schema "{aside}"' in run.stderr
    assert "not put in place" not in run.stderr
    verify = bridge("audit", "verify", "--config", str(site.hospital))
    assert verify.returncode != 0
    assert (f'a restore of this store is done and recorded, and schema "{aside}" still'
            " holds the store as it was before it: drop it" in verify.stderr)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(aside)))
    assert len(audit_entries(site.hospital, "store.restore")) == 1


def test_a_schema_named_like_a_store_set_aside_is_another_store(pg: PGSchema) -> None:
    other = f"{pg.schema}_before_restore"  # a valid schema of another controller
    try:
        PostgresStore(pg.dsn, schema=other).close()
        PostgresStore(pg.dsn, schema=pg.schema).close()  # not refused
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(other)))

