"""Restore drills from outside: ``bridge store backup`` of a store while its ``bridge
serve`` keeps receiving, then ``bridge store restore`` into the state of the backup,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from compliance_support import another_claim, audit_entries, inbox_count, samples
from ops_support import Site, bridge, make_site, serve, wait_for
from pg_support import PGSchema, fresh_schema

from bridge.config import load_config
from bridge.errors import StoreError
from bridge.ledger.sqlite import SQLiteStore, nobody_serving


@pytest.fixture(params=["sqlite", "postgresql"])
def store_kind(request: pytest.FixtureRequest) -> Iterator[PGSchema | None]:
    if request.param == "sqlite":
        yield None
    else:
        yield from fresh_schema()


def _insurer_on(site: Site, pg: PGSchema | None) -> None:
    if pg is None:
        return
    text = site.insurer.read_text(encoding="utf-8")
    old = 'path = "insurer-b/bridge.sqlite"'
    assert old in text
    site.insurer.write_text(text.replace(
        old, f'kind = "postgresql"\ndsn = "{pg.dsn}"\nschema = "{pg.schema}"'), encoding="utf-8")


def _push(site: Site, claim: Path) -> None:
    run = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                 str(claim))
    assert run.returncode == 0, run.stderr


@pytest.mark.battery
@pytest.mark.control("T16", "T10")
def test_restore_drill_back_to_a_backup_taken_while_serving(
    tmp_path: Path, store_kind: PGSchema | None
) -> None:
    site = make_site(tmp_path)
    _insurer_on(site, store_kind)
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    backup = tmp_path / "backup"
    try:
        _push(site, samples(site) / "claim-1.json")
        wait_for(lambda: inbox_count(site.insurer) == 1, what="first claim received")
        run = bridge("store", "backup", "--config", str(site.insurer), str(backup), "--json")
        assert run.returncode == 0, run.stderr
        taken = json.loads(run.stdout)
        _push(site, another_claim(site, 2))
        wait_for(lambda: inbox_count(site.insurer) == 2, what="second claim received")
    finally:
        hospital.stop()
        insurer.stop()
    before = len(audit_entries(site.insurer))
    assert taken["audit_seq"] < before

    restored = bridge("store", "restore", "--config", str(site.insurer), str(backup))
    assert restored.returncode == 0, restored.stderr
    assert "audit chain verified" in restored.stdout
    assert "reconciliation" in restored.stdout
    assert inbox_count(site.insurer) == 1
    entries = audit_entries(site.insurer)
    assert entries[-1].record.action == "store.restore"
    assert entries[-1].record.digest == f"sha256:{taken['sha256']}"
    assert entries[-2].seq == taken["audit_seq"] and entries[-2].hash == taken["audit_hash"]
    assert bridge("audit", "verify", "--config", str(site.insurer)).returncode == 0

    # The restored store serves again.
    insurer = serve(site.insurer)
    insurer.stop()


def _hospital_backed_up(tmp_path: Path, pg: PGSchema | None = None) -> tuple[Site, Path]:
    """A site whose hospital holds one consent, and a backup of the hospital's store
    (on the PostgreSQL schema ``pg`` when given)."""
    site = make_site(tmp_path)
    if pg is not None:
        text = site.hospital.read_text(encoding="utf-8")
        old = 'path = "hospital-a/bridge.sqlite"'
        assert old in text
        site.hospital.write_text(text.replace(
            old, f'kind = "postgresql"\ndsn = "{pg.dsn}"\nschema = "{pg.schema}"'),
            encoding="utf-8")
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    backup = tmp_path / "backup"
    assert bridge("store", "backup", "--config", str(site.hospital), str(backup)).returncode == 0
    return site, backup


def test_a_backup_that_does_not_match_its_manifest_is_not_restored(tmp_path: Path) -> None:
    site, backup = _hospital_backed_up(tmp_path)
    copy = backup / "store.sqlite"
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert run.returncode != 0
    assert "does not match its manifest" in run.stderr and "store.sqlite" in run.stderr
    assert len(audit_entries(site.hospital, "consent.put")) == 1


def test_a_store_a_bridge_serves_is_not_restored_under_it(
    tmp_path: Path, store_kind: PGSchema | None
) -> None:
    # Put in place under a running `bridge serve`, the backup would be written over by
    # a process that still holds the old file (or goes on writing to the schema dropped
    # and restored under it): restore refuses while one serves.
    site, backup = _hospital_backed_up(tmp_path, store_kind)
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    hospital = serve(site.hospital)
    try:
        run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    finally:
        hospital.stop()
    assert run.returncode != 0
    said = ("a bridge process is serving this store" if store_kind is None
            else "a bridge process has this store open")
    assert f"{said}: stop it first" in run.stderr and "Traceback" not in run.stderr
    assert len(audit_entries(site.hospital, "consent.put")) == 2  # nothing was put back
    restored = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert restored.returncode == 0, restored.stderr
    assert len(audit_entries(site.hospital, "consent.put")) == 1


def test_a_store_a_command_has_open_is_not_restored_under_it(tmp_path: Path) -> None:
    # Not only `bridge serve`: any process with the store open (a `bridge push` queueing
    # claims, a script through the Python API) would go on writing to the file replaced
    # under it, and what it reported as queued would be gone.
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    script = ("import sys; from bridge.ledger.sqlite import SQLiteStore;"
              f" s = SQLiteStore({str(store)!r}); print('open', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    finally:
        holder.communicate("")
    assert run.returncode != 0
    assert "a bridge process has this store open: stop it first" in run.stderr
    assert "Traceback" not in run.stderr
    # And a store is not opened while a restore puts the copy in place.
    with nobody_serving(store), pytest.raises(StoreError, match="a restore of this store"):
        SQLiteStore(store)
    assert bridge("store", "restore", "--config", str(site.hospital),
                  str(backup)).returncode == 0


def test_a_store_dropped_without_closing_lets_a_restore_go_once_collected(
    tmp_path: Path,
) -> None:
    import gc

    path = tmp_path / "bridge.sqlite"
    store = SQLiteStore(path)
    store.hold_dispatch()
    with pytest.raises(StoreError, match="serving this store"), nobody_serving(path):
        pass
    del store
    gc.collect()
    with nobody_serving(path):  # its locks went with it
        pass


def test_no_backup_is_taken_while_a_restore_puts_a_copy_in_place(
    tmp_path: Path, store_kind: PGSchema | None
) -> None:
    # What a backup would copy then is the store being replaced: it is refused, writes
    # nothing to its folder, and can be taken again once the restore is done.
    from bridge.ledger.postgres import nobody_using

    site, _backup = _hospital_backed_up(tmp_path, store_kind)
    cfg = load_config(site.hospital).store
    again = tmp_path / "again"
    restoring = (nobody_serving(cfg.path) if store_kind is None
                 else nobody_using(store_kind.dsn, store_kind.schema))
    with restoring:
        run = bridge("store", "backup", "--config", str(site.hospital), str(again))
    assert run.returncode != 0
    assert "a restore of this store is under way" in run.stderr
    assert "Traceback" not in run.stderr
    assert not any(again.iterdir())
    assert bridge("store", "backup", "--config", str(site.hospital),
                  str(again)).returncode == 0
