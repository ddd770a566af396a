"""Backup and restore of a store (GB/T 39725 Appendix F: local backup and recovery).

``backup`` takes a consistent snapshot while bridges keep serving:

- SQLite: the online backup API copies the database page by page from a read
  transaction of its own, so the copy is one committed state of the file (WAL
  included) whatever other processes write meanwhile;
- PostgreSQL: ``pg_dump`` of the controller's schema, which reads everything in one
  repeatable-read snapshot.

Next to the copy goes ``manifest.json``: the controller, the store kind, when it was
taken, the audit chain's head at that moment, the schema steps, and the SHA-256 of the
copy. ``restore`` checks the manifest and the digest, puts the copy in place (SQLite:
the bridge must be stopped; PostgreSQL: the schema is dropped and restored), verifies
the audit chain, records the restore, and runs the reconciliation hooks: whatever was
exchanged after the backup is known to the partners, and reconciliation with each of
them brings it back (or reports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import ConfigError, NotFound, RuntimeFailure, StoreError
from bridge.files import private_folder, write_private

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

MANIFEST = "manifest.json"
SQLITE_FILE = "store.sqlite"
PG_FILE = "store.pgdump"

#: Called after a restore with the configuration; each returns a one-line summary.
#: Reconciliation with the partners registers here.
AFTER_RESTORE: list[Callable[[BridgeConfig], str]] = []


@dataclass(frozen=True)
class Backup:
    directory: Path
    kind: str
    taken: str
    audit_seq: int
    audit_hash: str
    sha256: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 600 (refusing a name already taken), for a tool
    that writes into it afterwards (SQLite's backup, ``pg_dump --file``)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def backup_store(config: BridgeConfig, directory: Path) -> Backup:
    """Write a consistent snapshot of the configured store into ``directory``."""
    from bridge.ledger import open_store

    # A backup holds everything the store does: a new folder is the owner's only, and
    # every file in it is created with mode 600 before a byte goes in.
    private_folder(directory)
    if any(directory.iterdir()):
        raise ConfigError("the backup folder is not empty", location=str(directory))
    taken = datetime.now(UTC).isoformat(timespec="seconds")
    store_cfg = config.store
    if store_cfg.kind == "sqlite":
        if not store_cfg.path.exists():
            raise NotFound("no store at this path yet", location=str(store_cfg.path))
        from bridge.ledger.sqlite import in_use

        # Not while a restore puts a copy in place: that would be what is copied (and
        # nothing is written to the folder then, so the backup can be taken again).
        with in_use(store_cfg.path):
            target = _private_file(directory / SQLITE_FILE)
            source = sqlite3.connect(f"file:{store_cfg.path}?mode=ro", uri=True, timeout=30)
            dest = sqlite3.connect(target)
            try:
                source.backup(dest, pages=1024)
            finally:
                dest.close()
                source.close()
        snapshot = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
        try:
            row = snapshot.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            steps = [r[0] for r in snapshot.execute(
                "SELECT name FROM schema_migrations ORDER BY name")]
        finally:
            snapshot.close()
        seq, head = (int(row[0]), str(row[1])) if row else (0, "0" * 64)
    else:
        from bridge.ledger.postgres import in_use as schema_in_use

        assert store_cfg.dsn is not None
        with schema_in_use(store_cfg.dsn, store_cfg.db_schema):  # not during a restore
            target = _private_file(directory / PG_FILE)
            run = subprocess.run(
                ["pg_dump", "--format=custom", "--no-owner", f"--schema={store_cfg.db_schema}",
                 f"--file={target}", f"--dbname={store_cfg.dsn}"],
                capture_output=True, text=True, check=False,
            )
        if run.returncode != 0:
            raise RuntimeFailure(f"pg_dump failed: {run.stderr.strip()[:300]}",
                                 location=f"{store_cfg.source}: store.dsn")
        # The head the dump holds is not read back from the dump; it is at least this.
        with open_store(store_cfg) as store:
            seq, head = store.audit_head()
            steps = list(store.applied_migrations())
    digest = _sha256(target)
    manifest = {
        "controller": config.controller.id, "kind": store_cfg.kind, "taken": taken,
        "audit_seq": seq, "audit_hash": head, "migrations": steps,
        "file": target.name, "sha256": digest,
    }
    write_private(directory / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    return Backup(directory, store_cfg.kind, taken, seq, head, digest)


def _nobody_using(store_cfg: Any) -> AbstractContextManager[None]:
    """The store's locks, held alone (refused while a bridge process has it open)."""
    if store_cfg.kind == "sqlite":
        from bridge.ledger.sqlite import nobody_serving

        store_cfg.path.parent.mkdir(parents=True, exist_ok=True)
        return nobody_serving(store_cfg.path)
    from bridge.ledger.postgres import nobody_using

    assert store_cfg.dsn is not None
    return nobody_using(store_cfg.dsn, store_cfg.db_schema)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for key in ("controller", "kind", "taken", "file", "sha256"):
            manifest[key]
    except FileNotFoundError:
        raise NotFound("no backup manifest here", location=str(path)) from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError("the backup manifest is damaged", location=str(path)) from None
    if not isinstance(manifest, dict):
        raise ConfigError("the backup manifest is damaged", location=str(path))
    return manifest


@dataclass(frozen=True)
class Restored:
    taken: str
    audit_entries: int
    hooks: list[str]


def restore_store(config: BridgeConfig, directory: Path) -> Restored:
    """Put a backup back in place of the configured store (see the module docstring)."""
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.compliance import record_restore

    manifest = read_manifest(directory)
    if manifest["controller"] != config.controller.id:
        raise ConfigError(f"the backup is of {manifest['controller']}, not of"
                          f" {config.controller.id}", location=str(directory / MANIFEST))
    if manifest["kind"] != config.store.kind:
        raise ConfigError(f"the backup is of a {manifest['kind']} store",
                          location=str(directory / MANIFEST))
    copy = directory / str(manifest["file"])
    if not copy.is_file() or _sha256(copy) != manifest["sha256"]:
        raise StoreError("the backup copy does not match its manifest's digest",
                         location=str(copy))
    store_cfg = config.store
    # Put in place, checked and recorded while no bridge process has the store open
    # and none can open it: a process would go on writing to what is replaced under it,
    # and one starting before the restore is recorded would run on an unchecked store.
    with _nobody_using(store_cfg):
        if store_cfg.kind == "sqlite":
            tmp = store_cfg.path.with_name(store_cfg.path.name + ".restoring")
            shutil.copyfile(copy, tmp)
            for suffix in ("-wal", "-shm"):
                stale = store_cfg.path.with_name(store_cfg.path.name + suffix)
                if stale.exists():
                    stale.unlink()
            os.replace(tmp, store_cfg.path)
        else:
            assert store_cfg.dsn is not None
            import psycopg

            with psycopg.connect(store_cfg.dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{store_cfg.db_schema}" CASCADE')
            run = subprocess.run(
                ["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={store_cfg.dsn}",
                 str(copy)],
                capture_output=True, text=True, check=False,
            )
            if run.returncode != 0:
                raise RuntimeFailure(f"pg_restore failed: {run.stderr.strip()[:300]}",
                                     location=f"{store_cfg.source}: store.dsn")
        with open_store(store_cfg, restoring=True) as store:
            report = store.verify_audit()
            if not report.ok:
                raise StoreError(f"the restored audit chain does not verify: {report.reason}",
                                 location=str(directory))
            from bridge.compliance.operators import acting_operator

            record_restore(store, backup_taken=str(manifest["taken"]), audit=AuditRecord(
                time=datetime.now(UTC), actor=config.controller.id, action="store.restore",
                subject=f"backup:{manifest['taken']}", digest=f"sha256:{manifest['sha256']}",
                detail=f"audit head at backup {manifest.get('audit_seq')}",
                operator=acting_operator(),
            ))
            entries = report.count + 1
    hooks = [hook(config) for hook in AFTER_RESTORE]
    return Restored(str(manifest["taken"]), entries, hooks)


__all__ = ["AFTER_RESTORE", "Backup", "Restored", "backup_store", "read_manifest",
           "restore_store"]
