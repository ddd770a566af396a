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
dump holds the configured schema alone), and while no bridge process has the store open
puts the copy in place, verifies its audit chain and that it ends at the manifest's
head, and records the restore; then it runs the reconciliation hooks. A failure at any
point leaves the store as it was (see :class:`_SqliteRestore`, :class:`_SchemaRestore`).
Whatever was exchanged after the backup is known to the partners, and reconciliation
with each of them brings it back (or reports it).
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
from bridge.files import create_private, private_folder, write_private

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
            target = create_private(directory / SQLITE_FILE)
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
        import psycopg
        from psycopg import sql

        from bridge.ledger.postgres import connect, schema_oid

        assert store_cfg.dsn is not None
        where = f"postgresql schema {store_cfg.db_schema}"
        with connect(store_cfg.dsn) as conn:
            if schema_oid(conn, store_cfg.db_schema) is None:
                raise NotFound("no store in this schema yet", location=where)
        schema = sql.Identifier(store_cfg.db_schema)
        target = directory / PG_FILE
        try:
            # Opened first: brought up to date, and not during a restore. The dump reads
            # a snapshot the head and the steps are read in, so the manifest says what
            # the dump holds (a restore checks its head against it). The session holding
            # the snapshot waits for the dump: no server timeout may end it meanwhile.
            with open_store(store_cfg), connect(store_cfg.dsn) as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
                conn.execute("SET LOCAL statement_timeout = 0")
                exported = conn.execute("SELECT pg_export_snapshot()").fetchone()
                row = conn.execute(sql.SQL("SELECT seq, hash FROM {}.audit ORDER BY seq DESC"
                                           " LIMIT 1").format(schema)).fetchone()
                steps = [str(n) for (n,) in conn.execute(sql.SQL(
                    "SELECT name FROM {}.schema_migrations ORDER BY name").format(schema))]
                create_private(target)
                run = subprocess.run(
                    ["pg_dump", "--format=custom", "--no-owner",
                     f"--schema={store_cfg.db_schema}",
                     f"--snapshot={exported[0] if exported else ''}", f"--file={target}",
                     f"--dbname={store_cfg.dsn}"],
                    capture_output=True, text=True, check=False,
                )
                if run.returncode != 0:
                    raise RuntimeFailure(f"pg_dump failed: {_first_line(run.stderr)}",
                                         location=f"{store_cfg.source}: store.dsn")
        except psycopg.Error as exc:
            target.unlink(missing_ok=True)
            raise StoreError(f"the backup's snapshot failed ({type(exc).__name__})",
                             location=where) from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
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


class RestoredNotCleared(RuntimeFailure):
    """The restore is done and recorded; what it set aside could not be cleared away."""


class _SqliteRestore:
    """A restore of an SQLite store, whose commit is one rename.

    The copy is checked, and the restore recorded in it, beside the store (``.restoring``)
    and its log folded into the file; only then does it take the store's place, in one
    rename. Until that rename the store is where it was. A log the store could not fold
    into its file is kept aside (``.before-restore-wal``, with a link to the file it
    belongs to) for the moment of the swap; :func:`~bridge.ledger.sqlite.settle_aside`
    clears away what a restore killed at any point left."""

    def __init__(self, store_cfg: Any) -> None:
        from bridge.ledger.sqlite import aside_path, settle_aside

        self.cfg = store_cfg
        settle_aside(store_cfg.path)  # what a killed restore left
        # Where a link leads: the copy takes the place of the file, not of the link.
        self.path: Path = store_cfg.path.resolve()
        self.aside = aside_path(store_cfg.path)
        self.tmp = self.path.with_name(self.path.name + ".restoring")

    def run(self, copy: Path, checked: Callable[[Any], int]) -> int:
        try:
            # The store's own mode when there is one (else the owner's only).
            was = self.path.stat() if self.path.exists() else None
            mode = was.st_mode & 0o777 if was is not None else 0o600
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            os.chmod(self.tmp, mode)
            if was is not None and os.geteuid() == 0:
                # Run as root for a store a service account owns: it stays the owner's.
                os.chown(self.tmp, was.st_uid, was.st_gid)
            shutil.copyfile(copy, self.tmp)
            entries = checked(self.cfg.model_copy(update={"path": self.tmp}))
            _fold_log(self.tmp, required=True)
            self._swap()
        except BaseException:
            self._clear(self.tmp)
            raise
        self._clear(self.aside)
        return entries

    def _swap(self) -> None:
        """Put the checked copy in the store's place. A log the store could not fold
        into its file (a damaged store) must not be read as the copy's: it goes aside,
        with a link to the file it belongs to, until the rename is done."""
        present: list[str] = []
        if self.path.exists():
            _fold_log(self.path, required=False)
            present = [s for s in ("-wal", "-shm") if Path(f"{self.path}{s}").exists()]
            if present:
                os.link(self.path, self.aside)
        try:
            for suffix in present:
                os.replace(f"{self.path}{suffix}", f"{self.aside}{suffix}")
            os.replace(self.tmp, self.path)  # the restore's commit
        except BaseException:
            # Undone from what the file system holds, not from the steps counted: an
            # interrupt (Ctrl-C) can be raised after a rename it stopped was done.
            if not self.tmp.exists():
                raise  # renamed: the restore is done, and the store set aside goes
            for suffix in present:
                log = Path(f"{self.aside}{suffix}")
                if log.exists() and not Path(f"{self.path}{suffix}").exists():
                    os.replace(log, f"{self.path}{suffix}")
            if not any(Path(f"{self.aside}{s}").exists() for s in present):
                self.aside.unlink(missing_ok=True)
            raise

    @staticmethod
    def _clear(path: Path) -> None:
        for suffix in ("-wal", "-shm", ""):  # the file last: it says what is left
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def _fold_log(path: Path, *, required: bool) -> None:
    """Fold the write-ahead log of the SQLite file at ``path`` into the file, leaving
    none beside it. ``required``: a failure is an error (else it is left as it is)."""
    try:
        con = sqlite3.connect(path, timeout=5)
        try:
            busy, _log, _done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        if required:
            raise StoreError(f"cannot fold the copy's log into it ({type(exc).__name__})",
                             location=str(path)) from None
        return
    if busy and required:
        raise StoreError("cannot fold the copy's log into it (busy)", location=str(path))


class _SchemaRestore:
    """A restore of a PostgreSQL store: the schema as it was renamed aside while
    ``pg_restore`` writes the copy in one transaction (a failed ``pg_restore`` writes
    nothing), then checked and the restore recorded; any failure puts it back. Where
    there was no schema, an empty one stands aside instead, so that a restore killed
    part way leaves a mark whichever way: the stores refuse a schema set aside (see
    :func:`~bridge.ledger.postgres.refuse_if_set_aside`)."""

    def __init__(self, store_cfg: Any) -> None:
        from bridge.ledger.postgres import aside_schema, connect, refuse_if_set_aside

        self.cfg = store_cfg
        self.dsn: str = store_cfg.dsn
        self.schema: str = store_cfg.db_schema
        self.location = f"{store_cfg.source}: store.dsn"
        self.aside = aside_schema(self.schema)
        with connect(self.dsn) as conn:
            refuse_if_set_aside(conn, self.schema)

    def _exists(self, schema: str) -> bool:
        from bridge.ledger.postgres import connect, schema_oid

        with connect(self.dsn) as conn:
            return schema_oid(conn, schema) is not None

    def _ddl(self, what: str, *statements: Any) -> None:
        """Run ``statements`` (composed SQL) in one transaction; ``what`` they do names
        a failure."""
        import psycopg

        from bridge.ledger.postgres import connect

        try:
            with connect(self.dsn) as conn, conn.transaction():
                for statement in statements:
                    conn.execute(statement)
        except psycopg.Error as exc:
            raise StoreError(f"{what} failed ({type(exc).__name__})",
                             location=f"postgresql schema {self.schema}") from None

    def run(self, copy: Path, checked: Callable[[Any], int]) -> int:
        kept = self._exists(self.schema)
        self._ddl("setting the store aside",
                  _named("ALTER SCHEMA {} RENAME TO {}", self.schema, self.aside) if kept
                  else _named("CREATE SCHEMA {}", self.aside))
        try:
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
            entries = checked(self.cfg)
        except BaseException as exc:
            try:
                self._ddl("putting the store back",
                          _named("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
                          _named("ALTER SCHEMA {} RENAME TO {}", self.aside, self.schema)
                          if kept else _named("DROP SCHEMA {}", self.aside))
            except StoreError as undo:
                why = exc.message if isinstance(exc, BridgeError) else type(exc).__name__
                raise StoreError(
                    f"the restore failed ({why}), and putting the store back failed too"
                    f' ({undo.message}): schema "{self.aside}" holds the store as it was',
                    location=f"postgresql schema {self.schema}") from None
            raise
        # Recorded: whatever happens now, the restore is done, and the schema set aside
        # says so (a lock on one of its tables can hold up dropping it).
        from psycopg import sql

        from bridge.ledger.postgres import RESTORE_DONE

        try:
            self._ddl("marking the restore done", sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(self.aside), sql.Literal(RESTORE_DONE)))
            self._ddl("dropping the store set aside",
                      _named("DROP SCHEMA {} CASCADE", self.aside))
        except StoreError as exc:
            raise RestoredNotCleared(
                f'the restore is done and recorded, but schema "{self.aside}", the store as'
                f" it was before it, could not be dropped ({exc.message}): drop it"
                f' (DROP SCHEMA "{self.aside}" CASCADE) before starting the bridge',
                location=f"postgresql schema {self.schema}") from None
        return entries


def _named(template: str, *schemas: str) -> Any:
    """``template`` with its ``{}`` filled by the quoted schema names."""
    from psycopg import sql

    return sql.SQL(template).format(*map(sql.Identifier, schemas))


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
    sealer = AESGCMSealer(kek) if kek is not None else None

    def checked(cfg: Any) -> int:
        """Open what was put in place (``cfg``), check it and record the restore; the
        number of audit entries then."""
        with open_store(cfg, restoring=True, sealer=sealer) as store:
            report = store.verify_audit()
            if not report.ok:
                raise StoreError(f"the restored audit chain does not verify: {report.reason}",
                                 location=str(directory))
            _check_head(store.audit_head(), manifest, directory)
            record_restore(store, backup_taken=str(manifest["taken"]), audit=AuditRecord(
                time=datetime.now(UTC), actor=config.controller.id, action="store.restore",
                subject=f"backup:{manifest['taken']}", digest=f"sha256:{manifest['sha256']}",
                detail=f"audit head at backup {manifest.get('audit_seq')}", operator=operator,
            ))
            return report.count + 1

    with _nobody_using(store_cfg):
        try:
            if store_cfg.kind == "sqlite":
                entries = _SqliteRestore(store_cfg).run(copy, checked)
            else:
                entries = _SchemaRestore(store_cfg).run(copy, checked)
        except RestoredNotCleared:
            raise
        except (BridgeError, OSError) as exc:
            if isinstance(exc, BridgeError):
                why = f"{exc.message} (at {exc.location})" if exc.location else exc.message
                kind: type[BridgeError] = type(exc)
            else:  # the file system's reason only: its message may quote a path
                why, kind = exc.strerror or type(exc).__name__, RuntimeFailure
            raise kind("the backup copy was not put in place, and the store is as it was"
                       f" before the restore: {why}", location=str(copy)) from None
    hooks = [hook(config) for hook in AFTER_RESTORE]
    return Restored(str(manifest["taken"]), entries, hooks)


__all__ = ["AFTER_RESTORE", "Backup", "Restored", "backup_store", "read_manifest",
           "restore_store"]
