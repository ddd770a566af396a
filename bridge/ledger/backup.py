"""Backup and restore of a store (GB/T 39725 Appendix F: local backup and recovery).

``backup`` takes a consistent snapshot while bridges keep serving:

- SQLite: the online backup API copies the database page by page from a read
  transaction of its own, so the copy is one committed state of the file (WAL
  included) whatever other processes write meanwhile;
- PostgreSQL: ``pg_dump`` of the controller's schema, which reads everything in one
  repeatable-read snapshot.

Next to the copy goes ``manifest.json``: the controller, the store kind, when it was
taken, the audit chain's head in the copy, the schema steps, on PostgreSQL the schema,
and the SHA-256 of the copy. ``restore`` checks the manifest and the digest (and that a
dump holds the configured schema alone), puts the copy in place while no
bridge process has the store open (SQLite: in one rename; PostgreSQL: ``pg_restore`` in
one transaction), verifies the audit chain and that it ends at the manifest's head,
records the restore, and runs the
reconciliation hooks. The store as it was is kept aside until the copy is checked and
the restore recorded, and put back if anything before that fails. Whatever was
exchanged after the backup is known to the partners, and reconciliation with each of
them brings it back (or reports it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError, ConfigError, NotFound, RuntimeFailure, StoreError
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
        from psycopg import sql

        from bridge.ledger.postgres import connect

        assert store_cfg.dsn is not None
        schema = sql.Identifier(store_cfg.db_schema)
        # Opened first: brought up to date, and not during a restore. The dump reads a
        # snapshot the head and the steps are read in, so the manifest says what the
        # dump holds (a restore checks its head against it).
        with open_store(store_cfg), connect(store_cfg.dsn) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            exported = conn.execute("SELECT pg_export_snapshot()").fetchone()
            row = conn.execute(sql.SQL("SELECT seq, hash FROM {}.audit ORDER BY seq DESC"
                                       " LIMIT 1").format(schema)).fetchone()
            steps = [str(n) for (n,) in conn.execute(sql.SQL(
                "SELECT name FROM {}.schema_migrations ORDER BY name").format(schema))]
            target = _private_file(directory / PG_FILE)
            run = subprocess.run(
                ["pg_dump", "--format=custom", "--no-owner", f"--schema={store_cfg.db_schema}",
                 f"--snapshot={exported[0] if exported else ''}", f"--file={target}",
                 f"--dbname={store_cfg.dsn}"],
                capture_output=True, text=True, check=False,
            )
        if run.returncode != 0:
            target.unlink(missing_ok=True)
            raise RuntimeFailure(f"pg_dump failed: {_first_line(run.stderr)}",
                                 location=f"{store_cfg.source}: store.dsn")
        seq, head = (int(row[0]), str(row[1])) if row else (0, "0" * 64)
    digest = _sha256(target)
    manifest = {
        "controller": config.controller.id, "kind": store_cfg.kind, "taken": taken,
        "audit_seq": seq, "audit_hash": head, "migrations": steps,
        "file": target.name, "sha256": digest,
    }
    if store_cfg.kind == "postgresql":
        manifest["schema"] = store_cfg.db_schema  # and the head is the dump's own
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


def _check_head(head: tuple[int, str], manifest: dict[str, Any], directory: Path) -> None:
    """The restored audit chain ends where the manifest says the backup's did. A backup
    of PostgreSQL without the schema in its manifest read its head after the dump, so
    that the dump's is at most it (and some entry when it names one)."""
    seq, digest = head
    want_seq, want = int(manifest.get("audit_seq") or 0), str(manifest.get("audit_hash"))
    exact = manifest["kind"] == "sqlite" or "schema" in manifest
    if (seq, digest) == (want_seq, want) or (
            not exact and seq <= want_seq and (seq > 0 or want_seq == 0)):
        return
    raise StoreError(f"the restored audit chain ends at entry {seq}, and the manifest says"
                     f" the backup's ended at entry {want_seq}",
                     location=str(directory / MANIFEST))


def _check_archive_schema(copy: Path, manifest: dict[str, Any], schema: str) -> None:
    """A dump holds one schema, and it is the configured one: restored, another would
    leave the configured schema empty (checked in the manifest and in the archive)."""
    named = manifest.get("schema")
    if named is not None and named != schema:
        raise ConfigError(f"the backup is of schema {named}, not of the configured {schema}",
                          location=str(copy.parent / MANIFEST))
    run = subprocess.run(["pg_restore", "--list", str(copy)], capture_output=True,
                         text=True, check=False)
    if run.returncode != 0:
        raise RuntimeFailure(f"pg_restore cannot read the backup copy: {_first_line(run.stderr)}",
                             location=str(copy))
    # A table of contents line: "<id>; <oid> <oid> SCHEMA - <name> <owner>".
    schemas = [m.group(1) for m in re.finditer(r"^\d+; \d+ \d+ SCHEMA - (\S+)", run.stdout,
                                                re.MULTILINE)]
    if schemas != [schema]:
        held = ", ".join(schemas) or "none"
        raise ConfigError(f"the backup copy holds schema {held}, not the configured {schema}"
                          " alone", location=str(copy))


class _SqliteAside:
    """The store file as it was, kept aside (a hard link) while a copy takes its place.

    The store's path names a whole database at every moment: the copy replaces it in
    one rename. The store's write-ahead log goes aside with it (a log beside the copy
    would be read as the copy's). :meth:`put_back` undoes the steps taken, whichever
    failed."""

    def __init__(self, path: Path) -> None:
        from bridge.ledger.sqlite import aside_path, settle_aside

        settle_aside(path)  # refused while an interrupted restore keeps a store aside
        # Where a link leads: the copy takes the place of the file, not of the link.
        self.path = path.resolve()
        self.aside = aside_path(path)
        self.tmp = self.path.with_name(self.path.name + ".restoring")
        self.kept = False  # the store as it was is linked aside
        self.logs: list[str] = []  # its logs moved aside
        self.placed = False  # the copy is in its place

    def put_copy_in_place(self, copy: Path) -> None:
        shutil.copyfile(copy, self.tmp)
        if self.path.exists():
            # What the log holds goes into the file first, so that the file set aside
            # is the whole store (a damaged store keeps its log beside it instead).
            try:
                con = sqlite3.connect(self.path, timeout=5)
                try:
                    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    con.close()
            except sqlite3.Error:
                pass
            try:
                os.link(self.path, self.aside)
            except OSError:  # a filesystem without hard links: a whole copy, or none
                partial = self.aside.with_name(self.aside.name + ".partial")
                try:
                    shutil.copy2(self.path, partial)
                    os.replace(partial, self.aside)
                finally:
                    partial.unlink(missing_ok=True)
            self.kept = True
        for suffix in ("-wal", "-shm"):
            if Path(f"{self.path}{suffix}").exists():
                os.replace(f"{self.path}{suffix}", f"{self.aside}{suffix}")
                self.logs.append(suffix)
        os.replace(self.tmp, self.path)
        self.placed = True

    def put_back(self) -> None:
        self.tmp.unlink(missing_ok=True)
        if self.placed:
            for suffix in ("-wal", "-shm"):  # the copy's own
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        for suffix in self.logs:
            os.replace(f"{self.aside}{suffix}", f"{self.path}{suffix}")
        if self.kept:
            if self.placed:
                os.replace(self.aside, self.path)
            else:
                self.aside.unlink()
        elif self.placed:
            self.path.unlink(missing_ok=True)

    def let_go(self) -> None:
        for suffix in ("-wal", "-shm", ""):  # the file last: it says what is left
            Path(f"{self.aside}{suffix}").unlink(missing_ok=True)


class _SchemaAside:
    """The store's schema as it was, renamed aside while ``pg_restore`` writes the copy
    in one transaction (a failed ``pg_restore`` writes nothing)."""

    def __init__(self, dsn: str, schema: str, location: str) -> None:
        from bridge.ledger.postgres import aside_schema, connect, refuse_if_set_aside

        self.dsn, self.schema, self.location = dsn, schema, location
        self.aside = aside_schema(schema)
        self.kept = False  # the schema as it was is renamed aside
        self.tried = False  # pg_restore ran
        with connect(dsn) as conn:
            refuse_if_set_aside(conn, schema)

    def _exists(self, schema: str) -> bool:
        from bridge.ledger.postgres import connect

        with connect(self.dsn) as conn:
            return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                (schema,)).fetchone() is not None

    def _ddl(self, *statements: tuple[str, ...]) -> None:
        """Run ``(template, name, ...)`` statements in one transaction, each template's
        ``{}`` filled with the quoted schema names that follow it."""
        from psycopg import sql

        from bridge.ledger.postgres import connect

        with connect(self.dsn) as conn, conn.transaction():
            for template, *names in statements:
                conn.execute(sql.SQL(template).format(*map(sql.Identifier, names)))

    def put_copy_in_place(self, copy: Path) -> None:
        if self._exists(self.schema):
            self._ddl(("ALTER SCHEMA {} RENAME TO {}", self.schema, self.aside))
            self.kept = True
        self.tried = True
        run = subprocess.run(
            ["pg_restore", "--no-owner", "--single-transaction", "--exit-on-error",
             f"--dbname={self.dsn}", str(copy)],
            capture_output=True, text=True, check=False,
        )
        if run.returncode != 0:
            raise RuntimeFailure(f"pg_restore failed: {_first_line(run.stderr)}",
                                 location=self.location)
        if not self._exists(self.schema):
            raise StoreError("the backup copy restored no schema of the configured name",
                             location=f"postgresql schema {self.schema}")

    def put_back(self) -> None:
        statements: list[tuple[str, ...]] = []
        if self.tried:
            statements.append(("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
        if self.kept:
            statements.append(("ALTER SCHEMA {} RENAME TO {}", self.aside, self.schema))
        if statements:
            self._ddl(*statements)

    def let_go(self) -> None:
        self._ddl(("DROP SCHEMA IF EXISTS {} CASCADE", self.aside))


def _first_line(stderr: str) -> str:
    """What a PostgreSQL tool said first, with what it quoted left out: a value of a
    row it could not write is quoted, and no error of the bridge carries health data."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return re.sub(r"\"[^\"]*\"|'[^']*'", "(…)", lines[0] if lines else "")[:300] or "(no reason)"


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
    if store_cfg.kind == "postgresql":
        _check_archive_schema(copy, manifest, store_cfg.db_schema)
    # What could fail for reasons of the configuration fails before the store is
    # touched, naming where it is configured.
    from bridge.compliance.operators import acting_operator
    from bridge.ledger.seal import AESGCMSealer, load_kek

    kek = load_kek(store_cfg.data_key_file, store_cfg.data_key_env,
                   where=f"{store_cfg.source}: store" if store_cfg.source else "store")
    operator = acting_operator()
    # Put in place, checked and recorded while no bridge process has the store open
    # and none can open it: a process would go on writing to what is replaced under it,
    # and one starting before the restore is recorded would run on an unchecked store.
    # The store as it was is kept aside until the copy is checked and the restore
    # recorded; whatever fails before that puts it back, so a failed restore leaves the
    # store as it was, not half-written.
    with _nobody_using(store_cfg):
        aside = _SqliteAside(store_cfg.path) if store_cfg.kind == "sqlite" else _SchemaAside(
            str(store_cfg.dsn), store_cfg.db_schema, f"{store_cfg.source}: store.dsn")
        try:
            aside.put_copy_in_place(copy)
            with open_store(store_cfg, restoring=True,
                            sealer=AESGCMSealer(kek) if kek is not None else None) as store:
                report = store.verify_audit()
                if not report.ok:
                    raise StoreError(
                        f"the restored audit chain does not verify: {report.reason}",
                        location=str(directory))
                _check_head(store.audit_head(), manifest, directory)
                record_restore(store, backup_taken=str(manifest["taken"]), audit=AuditRecord(
                    time=datetime.now(UTC), actor=config.controller.id,
                    action="store.restore", subject=f"backup:{manifest['taken']}",
                    digest=f"sha256:{manifest['sha256']}",
                    detail=f"audit head at backup {manifest.get('audit_seq')}",
                    operator=operator,
                ))
                entries = report.count + 1
        except (BridgeError, OSError) as exc:
            aside.put_back()
            if isinstance(exc, BridgeError):
                why = f"{exc.message} (at {exc.location})" if exc.location else exc.message
                kind: type[BridgeError] = type(exc)
            else:  # the file system's reason only: its message may quote a path
                why, kind = exc.strerror or type(exc).__name__, RuntimeFailure
            raise kind("the backup copy was not put in place, and the store is as it was"
                       f" before the restore: {why}", location=str(copy)) from None
        except BaseException:
            aside.put_back()
            raise
        aside.let_go()
    hooks = [hook(config) for hook in AFTER_RESTORE]
    return Restored(str(manifest["taken"]), entries, hooks)


__all__ = ["AFTER_RESTORE", "Backup", "Restored", "backup_store", "read_manifest",
           "restore_store"]
