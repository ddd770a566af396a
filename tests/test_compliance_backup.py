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
from compliance_support import (
    another_claim,
    audit_entries,
    consenting_site,
    inbox_count,
    samples,
)
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
    site = consenting_site(tmp_path)
    _insurer_on(site, store_kind)
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
        return [p.name for p in store.parent.iterdir()
                if ".before-restore" in p.name or ".restoring" in p.name]
    with pg.connect() as conn:
        return [name for (name,) in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (f"{pg.schema}%before-restore",))]


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


def _restore_killed(config: Path, backup: Path, module: str, name: str, match: str) -> None:
    """``bridge store restore`` killed (SIGKILL) right after its call of ``module.name``
    whose first argument's text (a command's words joined) holds ``match``."""
    run = _python(f"""
import os, signal
import {module} as patched
real = patched.{name}
def call(first, *args, **kwargs):
    done = real(first, *args, **kwargs)
    if {match!r} in (" ".join(first) if isinstance(first, list) else str(first)):
        os.kill(os.getpid(), signal.SIGKILL)
    return done
patched.{name} = call
from bridge.cli import main
main(['store', 'restore', '--config', {str(config)!r}, {str(backup)!r}])
""")
    assert run.returncode == -9, run.stderr


@pytest.mark.battery  # a restore killed in a process of its own
def test_a_restore_killed_before_its_copy_takes_the_place_loses_nothing(
    tmp_path: Path,
) -> None:
    # The copy is checked, and the restore recorded in it, beside the store; killed
    # then, the store is as it was, with what it held only in its log.
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    _committed_and_killed(store)
    before = [(e.seq, e.hash) for e in audit_entries(site.hospital)]
    _committed_and_killed(store)
    _restore_killed(site.hospital, backup, "bridge.ledger.backup", "_fold_log", ".restoring")
    assert (store.parent / "bridge.sqlite.restoring").exists()
    after = [(e.seq, e.hash) for e in audit_entries(site.hospital)]
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert _left_aside(site, None) == []  # cleared away by the first to open it
    assert bridge("audit", "verify", "--config", str(site.hospital)).returncode == 0


@pytest.mark.battery  # a restore killed in a process of its own
@pytest.mark.parametrize("fresh", [False, True])
def test_a_restore_killed_once_its_copy_took_the_place_is_done(
    tmp_path: Path, fresh: bool
) -> None:
    # The rename is the restore's commit: what took the store's place was checked and
    # the restore recorded, on a store that was there and on one that was not (a new
    # host).
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    if fresh:
        for path in store.parent.glob(store.name + "*"):
            path.unlink()
    else:
        _committed_and_killed(store)
    _restore_killed(site.hospital, backup, "os", "replace",
                    ".restoring")
    actions = [e.record.action for e in audit_entries(site.hospital)]
    assert actions.count("store.restore") == 1 and "test.committed" not in actions
    assert _left_aside(site, None) == []
    assert bridge("audit", "verify", "--config", str(site.hospital)).returncode == 0


@pytest.mark.battery  # a restore killed in a process of its own
def test_a_schema_a_killed_restore_set_aside_is_refused_until_settled(
    tmp_path: Path,
) -> None:
    # pg_restore has committed the copy, unchecked; the schema as it was (or, on a
    # new server, an empty one) stands aside. No process runs on the copy nor backs it
    # up, and the message says how to go on.
    for pg in fresh_schema():
        for fresh in (False, True):
            site, backup = _hospital_backed_up(tmp_path / str(fresh), pg)
            if fresh:
                with pg.connect() as conn:
                    conn.execute(f'DROP SCHEMA "{pg.schema}" CASCADE')
            _restore_killed(site.hospital, backup, "subprocess", "run",
                            "--single-transaction")
            aside = f"{pg.schema}-before-restore"
            for command in (("audit", "verify"), ("store", "restore", str(backup)),
                            ("store", "backup", str(tmp_path / f"again-{fresh}"))):
                run = bridge(*command[:2], "--config", str(site.hospital), *command[2:])
                assert run.returncode != 0 and "Traceback" not in run.stderr, command
                assert (f'a restore was killed part way, and schema "{aside}" holds the store'
                        f" as it was before it" in run.stderr), run.stderr
            # As the message says, to restore again: drop the schema set aside first.
            with pg.connect() as conn:
                conn.execute(f'DROP SCHEMA "{aside}" CASCADE')
            run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
            assert run.returncode == 0, run.stderr
            assert len(audit_entries(site.hospital, "store.restore")) == 1
            with pg.connect() as conn:
                conn.execute(f'DROP SCHEMA "{pg.schema}" CASCADE')


def test_a_restored_store_keeps_the_mode_of_the_one_it_replaced(tmp_path: Path) -> None:
    import stat

    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    # Not the 600 a new store is made with: the operator's own choice is kept.
    os.chmod(store, 0o640)
    run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(store.stat().st_mode) == 0o640


def test_a_backup_of_a_schema_that_is_not_there_is_refused_not_made(tmp_path: Path) -> None:
    for pg in fresh_schema():
        site, _backup = _hospital_backed_up(tmp_path, pg)
        with pg.connect() as conn:
            conn.execute(f'DROP SCHEMA "{pg.schema}" CASCADE')
        run = bridge("store", "backup", "--config", str(site.hospital), str(tmp_path / "b"))
        assert run.returncode != 0 and "no store in this schema yet" in run.stderr
        with pg.connect() as conn:
            assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname=%s",
                                (pg.schema,)).fetchone() is None


def test_a_backup_outlasting_the_servers_idle_transaction_timeout_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session holding the dump's snapshot waits in its transaction while pg_dump
    # runs; a server's idle_in_transaction_session_timeout must not end it.
    import shutil as sh

    for pg in fresh_schema():
        site, _backup = _hospital_backed_up(tmp_path, pg)
        text = site.hospital.read_text(encoding="utf-8")
        dsn = f"{pg.dsn} options='-c idle_in_transaction_session_timeout=500'"
        site.hospital.write_text(text.replace(f'dsn = "{pg.dsn}"', f'dsn = "{dsn}"'),
                                 encoding="utf-8")
        shim = tmp_path / "bin"
        shim.mkdir()
        real = sh.which("pg_dump")
        (shim / "pg_dump").write_text(
            "#!/bin/sh\n" + f'{real} "$@"; rc=$?\nsleep 1.5\nexit $rc\n')
        (shim / "pg_dump").chmod(0o755)
        monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
        again = tmp_path / "again"
        run = bridge("store", "backup", "--config", str(site.hospital), str(again))
        assert run.returncode == 0, run.stderr
        assert sorted(p.name for p in again.iterdir()) == ["manifest.json", "store.pgdump"]


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


@pytest.mark.battery  # a restore killed in a process of its own
def test_processes_opening_a_store_a_killed_restore_left_all_open_it(tmp_path: Path) -> None:
    # Several processes starting at once each find what a restore killed before its
    # swap left (a link to the store aside): one clears it away, and none is refused.
    site, _backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    aside = store.with_name(store.name + ".before-restore")
    opener = (f"import time, sys; from bridge.ledger.sqlite import SQLiteStore;"
              f" time.sleep(max(0, float(sys.argv[1]) - time.time()));"
              f" SQLiteStore({str(store)!r}).close(); print('open')")
    import time

    for _ in range(5):
        os.link(store, aside)
        start = f"{time.time() + 1.0}"
        openers = [subprocess.Popen([sys.executable, "-c", opener, start],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(4)]
        said = [p.communicate(timeout=60) for p in openers]
        assert all(out.strip() == "open" for out, _err in said), said
        assert not aside.exists()


def test_a_restored_store_keeps_its_owner(tmp_path: Path) -> None:
    # Run as root (an operator's shell) for a store a service account owns, the
    # restored store must stay that account's, or the service cannot open it.
    site, backup = _hospital_backed_up(tmp_path)
    store = load_config(site.hospital).store.path
    owner = 65534 if os.geteuid() == 0 else os.geteuid()
    os.chown(store, owner, owner if os.geteuid() == 0 else os.getegid())
    before = store.stat()
    run = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert run.returncode == 0, run.stderr
    after = store.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid) == (
        owner, before.st_gid)
