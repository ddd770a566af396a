"""Restore drills from outside: ``bridge store backup`` of a store while its ``bridge
serve`` keeps receiving, then ``bridge store restore`` into the state of the backup,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
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


def _tampered_audit(site: Site, pg: PGSchema | None, tamper: bool) -> None:
    """Change the first audit entry's subject behind the bridge's back (``tamper``), or
    put it back as it was."""
    change = ("UPDATE audit SET subject = subject || '-x' WHERE seq = 1" if tamper else
              "UPDATE audit SET subject = substr(subject, 1, length(subject) - 2)"
              " WHERE seq = 1")
    if pg is None:
        import sqlite3

        con = sqlite3.connect(load_config(site.hospital).store.path)
        with con:
            con.execute("DROP TRIGGER IF EXISTS audit_no_update")
            con.execute(change)
        con.close()
    else:
        with pg.connect() as conn:
            conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
            conn.execute(change)
            conn.execute("ALTER TABLE audit ENABLE TRIGGER USER")


def _left_aside(site: Site, pg: PGSchema | None) -> list[str]:
    """What a restore kept aside and did not clear away."""
    if pg is None:
        store = load_config(site.hospital).store.path
        return [p.name for p in store.parent.iterdir() if ".before-restore" in p.name]
    with pg.connect() as conn:
        return [name for (name,) in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (f"{pg.schema}%before_restore",))]


@pytest.mark.control("T16")
def test_a_restore_that_fails_leaves_the_store_as_it_was(
    tmp_path: Path, store_kind: PGSchema | None
) -> None:
    # A copy that cannot be put in place (a damaged archive whose manifest was made to
    # match it), or whose audit chain does not verify, is refused after it was tried:
    # the store must then be the one that was there, whole, not the copy or a
    # half-written mix.
    site, good = _hospital_backed_up(tmp_path, store_kind)
    _tampered_audit(site, store_kind, tamper=True)
    forged = tmp_path / "forged"
    assert bridge("store", "backup", "--config", str(site.hospital),
                  str(forged)).returncode == 0
    _tampered_audit(site, store_kind, tamper=False)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    manifest = json.loads((good / "manifest.json").read_text(encoding="utf-8"))
    whole = (good / manifest["file"]).read_bytes()
    # SQLite: the file cut short. PostgreSQL: the archive's table of contents whole (so
    # pg_restore starts) and its last table's data zeroed (so it fails part way).
    bad = (whole[: len(whole) * 2 // 3] if store_kind is None
           else whole[: -len(whole) // 50] + bytes(len(whole) // 50))
    (damaged / manifest["file"]).write_bytes(bad)
    import hashlib

    manifest["sha256"] = hashlib.sha256(bad).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    # The store moves on from the backups: a second consent.
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0

    for backup, said in ((forged, "the restored audit chain does not verify"),
                         (damaged, "pg_restore failed" if store_kind else "is corrupt")):
        run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
        assert run.returncode != 0, backup.name
        assert said in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert "the store is as it was before the restore" in run.stderr
        assert f"{backup / manifest['file']}" in run.stderr  # said of the copy
        entries = audit_entries(site.hospital)
        assert [e.record.action for e in entries].count("consent.put") == 2, backup.name
        assert "store.restore" not in [e.record.action for e in entries]
        assert _left_aside(site, store_kind) == [], backup.name
        checked = bridge("audit", "verify", "--config", str(site.hospital))
        assert checked.returncode == 0, checked.stderr

    restored = bridge("store", "restore", "--config", str(site.hospital), str(good))
    assert restored.returncode == 0, restored.stderr
    assert len(audit_entries(site.hospital, "consent.put")) == 1
    assert _left_aside(site, store_kind) == []


def test_a_restore_refuses_while_an_interrupted_one_left_the_store_aside(
    tmp_path: Path, store_kind: PGSchema | None
) -> None:
    # A restore killed between setting the store aside and clearing it away leaves the
    # only copy of the store as it was before it: the next restore does not go over it,
    # and the store is not opened as if nothing had happened.
    site, backup = _hospital_backed_up(tmp_path, store_kind)
    if store_kind is None:
        store = load_config(site.hospital).store.path
        left = store.with_name(store.name + ".before-restore")
        left.write_bytes(store.read_bytes())
        named = str(left)
    else:
        with store_kind.connect() as conn:
            conn.execute(f'CREATE SCHEMA "{store_kind.schema}_before_restore"')
        named = f"schema {store_kind.schema}_before_restore"
    try:
        # Neither a restore nor any other command: on PostgreSQL a store opened while
        # its schema is aside would make a new, empty one in its place.
        for command in (("store", "restore", "--config", str(site.hospital), str(backup)),
                        ("audit", "verify", "--config", str(site.hospital))):
            run = bridge(*command)
            assert run.returncode != 0, command
            said = ("an earlier restore was interrupted, and the store as it was before it"
                    f" is kept aside in {named}")
            assert said in run.stderr and "Traceback" not in run.stderr, run.stderr
    finally:
        if store_kind is not None:
            with store_kind.connect() as conn:
                conn.execute(f'DROP SCHEMA "{store_kind.schema}_before_restore"')


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


def _committed_and_killed(store: Path) -> None:
    """A process commits an audit entry and is killed before anything checkpoints the
    store's log: the entry is in ``<store>-wal`` alone."""
    run = _python(f"""
import os
from datetime import UTC, datetime
from bridge.ledger.sqlite import SQLiteStore
from bridge.ledger.audit import AuditRecord
s = SQLiteStore({str(store)!r})
s._conn.execute('PRAGMA wal_autocheckpoint=0')
s.append_audit(AuditRecord(time=datetime.now(UTC), actor='x', action='test.committed',
                           subject='s'))
os.kill(os.getpid(), 9)
""")
    assert run.returncode == -9, run.stderr
    assert Path(f"{store}-wal").stat().st_size > 0


def _restore_killed(config: Path, backup: Path, *, after_swap: bool) -> None:
    """``bridge store restore`` killed (SIGKILL) just before, or just after, the copy
    takes the store's place."""
    run = _python(f"""
import os, signal
import bridge.ledger.backup as backup
real = os.replace
def replace(src, dst, *args, **kwargs):
    if str(src).endswith('.restoring'):
        if {after_swap!r}:
            real(src, dst, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
backup.os.replace = replace
from bridge.cli import main
main(['store', 'restore', '--config', {str(config)!r}, {str(backup)!r}])
""")
    assert run.returncode == -9, run.stderr


@pytest.mark.parametrize("after_swap", [False, True])
def test_a_restore_killed_part_way_loses_nothing_committed(
    tmp_path: Path, after_swap: bool
) -> None:
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    _committed_and_killed(store)  # what the store holds only in its log
    _restore_killed(site.hospital, backup, after_swap=after_swap)
    aside = store.with_name(store.name + ".before-restore")
    if not after_swap:
        # The copy never took the store's place: the store is as it was, and opens
        # (what the restore set aside put back).
        assert aside.exists()
        assert len(audit_entries(site.hospital, "test.committed")) == 1
        assert not aside.exists()
        return
    # The copy took its place unchecked: neither opened nor backed up, nor restored over.
    for command in (("audit", "verify"), ("store", "backup"), ("store", "restore")):
        extra = [str(tmp_path / "again")] if command[1] == "backup" else (
            [str(backup)] if command[1] == "restore" else [])
        run = bridge(*command, "--config", str(site.hospital), *extra)
        assert run.returncode != 0, command
        assert f"is kept aside in {aside}:" in run.stderr, run.stderr
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())
    # Put back as the message says, the store holds what was committed.
    assert [p.name for p in store.parent.glob("*.before-restore*")] == [aside.name]
    os.replace(aside, store)
    assert len(audit_entries(site.hospital, "test.committed")) == 1


def test_a_restore_whose_setting_aside_fails_leaves_the_store_whole(tmp_path: Path) -> None:
    # On a file system without hard links the store is copied aside; a copy cut short
    # (the disk full) must not be left to be taken for the store as it was.
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    run = _python(f"""
import errno, sys
import bridge.ledger.backup as backup
def link(src, dst):
    raise PermissionError(errno.EPERM, 'Operation not permitted')
def copy2(src, dst):
    with open(src, 'rb') as fh, open(dst, 'wb') as out:
        out.write(fh.read()[:1000])
    raise OSError(errno.ENOSPC, 'No space left on device', str(dst))
backup.os.link = link
backup.shutil.copy2 = copy2
from bridge.cli import main
sys.exit(main(['store', 'restore', '--config', {str(site.hospital)!r}, {str(backup)!r}]))
""")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert ("the store is as it was before the restore: No space left on device"
            in run.stderr)
    assert sorted(p.name for p in store.parent.glob("bridge.sqlite.*")) == [
        "bridge.sqlite.dispatch", "bridge.sqlite.open"]
    assert len(audit_entries(site.hospital, "consent.put")) == 1


def test_a_backup_of_another_schema_is_not_restored_over_the_configured_one(
    tmp_path: Path,
) -> None:
    # Restored, a dump of schema A into the configuration of schema B would put A back
    # and leave B to be made anew, empty.
    for pg in fresh_schema():
        site, backup = _hospital_backed_up(tmp_path, pg)
        other = f"{pg.schema}_b"
        text = site.hospital.read_text(encoding="utf-8")
        site.hospital.write_text(text.replace(f'schema = "{pg.schema}"',
                                              f'schema = "{other}"'), encoding="utf-8")
        try:
            assert bridge("consent", "add", "--config", str(site.hospital),
                          str(samples(site) / "consent.json")).returncode == 0
            run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
            assert run.returncode == 2 and "Traceback" not in run.stderr
            assert f"the backup is of schema {pg.schema}, not of the configured {other}" in (
                run.stderr)
            # A manifest of an earlier version names no schema: the archive says it.
            manifest = json.loads((backup / "manifest.json").read_text(encoding="utf-8"))
            del manifest["schema"]
            (backup / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
            run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
            assert run.returncode == 2, run.stderr
            assert f"the backup copy holds schema {pg.schema}, not the configured {other}" in (
                run.stderr)
            assert len(audit_entries(site.hospital, "consent.put")) == 1  # B's own
        finally:
            with pg.connect() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


def test_a_restore_refused_for_its_configuration_names_the_configuration(
    tmp_path: Path,
) -> None:
    site, backup = _hospital_backed_up(tmp_path)
    text = site.hospital.read_text(encoding="utf-8")
    site.hospital.write_text(text.replace(
        'path = "hospital-a/bridge.sqlite"',
        'path = "hospital-a/bridge.sqlite"\ndata_key_env = "BRIDGE_TEST_UNSET_KEY"'),
        encoding="utf-8")
    run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert run.returncode == 2 and "store.data_key_env" in run.stderr, run.stderr
    assert "backup copy" not in run.stderr
