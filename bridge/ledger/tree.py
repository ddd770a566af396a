"""The audit tree of a store: leaves kept in a file, roots at every append, checkpoints.

:class:`TreeCache` follows a store's audit table. Each append (inside its transaction)
asks it for the root of the tree that ends with the new entry, so a receipt can carry
a checkpoint of exactly that tree (PROTOCOL §9.6). The cache trusts nothing it has not
seen linked: an entry extends the cached tree only when its ``prev_hash`` is the hash
the cache holds for the entry before it; otherwise the cache rereads the entries from
the last point it can link to (another process appended meanwhile, or a transaction
rolled back), and from the start when even that fails (a store replaced underneath).

The leaves (32 bytes per entry, hashed from the entries' content once) are what a
consistency proof for a partner (``$audit-checkpoint``) is built from. A bridge that
runs for years appends millions of entries, so they are kept in an unnamed temporary
file (:class:`LeafFile`), not in the process's memory: what stays in memory is the
recent frontiers, a few kilobytes whatever the log's length. The file is made beside an
SQLite store's database (``TMPDIR`` is often a memory file system), and in ``TMPDIR``
for a PostgreSQL store; it goes when the store closes or the process ends, and a
restarted process rebuilds it from the store's entries.

The tables added here (migration ``1100-audit-checkpoints``):

- ``audit_checkpoint``: checkpoints this controller issued of its own log;
- ``audit_cosigned``: those checkpoints with a partner's cosignature, as received;
- ``audit_witness``: partners' checkpoints this controller verified and cosigned, the
  newest of which is what the partner's next checkpoint must extend;
- ``audit_witness_fault``: partner checkpoints refused, with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, overload

from bridge.ledger import merkle
from bridge.ledger.audit import (
    GENESIS_HASH,
    AuditEntry,
    format_time,
    leaf_from_hash,
    leaf_of,
    parse_time,
)

#: Issue a checkpoint once this many entries are not covered by one ...
CHECKPOINT_ENTRIES = 100
#: ... or once the newest entry has waited this long.
CHECKPOINT_INTERVAL = timedelta(seconds=60)
_RECENT = 256

Fetch = Callable[[int], Sequence[AuditEntry]]


class Leaves(Sequence[bytes]):
    """Leaf hashes held in one bytearray (32 bytes each)."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self._data = bytearray(data)

    def __len__(self) -> int:
        return len(self._data) // 32

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...
    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        n = len(self)
        if isinstance(i, slice):
            start, stop, _ = i.indices(n)
            raw = bytes(self._data[start * 32:stop * 32])
            return [raw[j:j + 32] for j in range(0, len(raw), 32)]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return bytes(self._data[i * 32:i * 32 + 32])

    def truncate(self, size: int) -> None:
        del self._data[size * 32:]

    def append(self, leaf: bytes) -> None:
        self._data += leaf


class LeafFile:
    """Leaf hashes (32 bytes each) in an unnamed temporary file, for as long as the
    process holds it: :class:`Leaves`' appends and truncation, and :meth:`snapshot`."""

    def __init__(self, directory: str | None = None) -> None:
        # Held until close (the store's): an unnamed file goes with its descriptor.
        try:
            self._file = tempfile.TemporaryFile(buffering=0, dir=directory)  # noqa: SIM115
        except OSError:
            if directory is None:
                raise
            # A directory this process cannot write in (a store opened to be read).
            self._file = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115
        self._fd = self._file.fileno()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, leaf: bytes) -> None:
        if len(leaf) != 32:
            raise ValueError("a leaf hash is 32 bytes")
        offset = self._count * 32
        written = 0
        while written < 32:  # a short write (a signal, a full disk) is taken up again
            n = os.pwrite(self._fd, leaf[written:], offset + written)
            if n <= 0:
                raise OSError("the audit tree's leaf file takes no more bytes")
            written += n
        self._count += 1

    def truncate(self, size: int) -> None:
        if size < self._count:
            os.ftruncate(self._fd, size * 32)
            self._count = size

    def snapshot(self) -> Leaves:
        """Every leaf, read into memory (for one proof: the file keeps growing)."""
        size = self._count * 32
        data = bytearray()
        while len(data) < size:
            chunk = os.pread(self._fd, min(size - len(data), 1 << 24), len(data))
            if not chunk:
                raise OSError("the audit tree's leaf file is shorter than its count")
            data += chunk
        return Leaves(data)

    def close(self) -> None:
        self._file.close()


class TreeCache:
    """The leaves and recent frontiers of one store's audit tree (see the module docstring)."""

    def __init__(self, directory: str | None = None) -> None:
        self._lock = threading.Lock()
        self.leaves = LeafFile(directory)
        # size -> (hash of entry `size`, frontier of the tree of that size)
        self._recent: dict[int, tuple[str, merkle.Frontier]] = {0: (GENESIS_HASH,
                                                                      merkle.Frontier())}

    def _remember(self, size: int, entry_hash: str, frontier: merkle.Frontier) -> None:
        self._recent.pop(size, None)  # re-inserted last: the dict's order is recency
        self._recent[size] = (entry_hash, frontier)
        if len(self._recent) > _RECENT:
            oldest = next(k for k in self._recent if k != 0)
            del self._recent[oldest]

    def _linkable(self, size: int, prev_hash: str) -> merkle.Frontier | None:
        known = self._recent.get(size)
        if known is not None and known[0] == prev_hash:
            return known[1]
        return None

    def _extend(self, start: int, frontier: merkle.Frontier,
                entries: Sequence[AuditEntry], *, fresh: bool = False) -> merkle.Frontier:
        """Leaves after ``start`` replaced by ``entries``'.

        ``fresh``: the entries were just built from their content (their hash is the
        content's), so the leaf comes from the hash without hashing the content again.
        """
        self.leaves.truncate(start)
        f = frontier.copy()
        for e in entries:
            leaf = leaf_from_hash(e.hash) if fresh else leaf_of(e)
            f.append(leaf)
            self.leaves.append(leaf)
            self._remember(e.seq, e.hash, f.copy())
        return f

    def _catch_up(self, before: int, prev_hash: str, fetch: Fetch) -> merkle.Frontier:
        """Frontier of the first ``before - 1`` entries, reading what the cache lacks."""
        size = max(s for s in self._recent if s < before)
        known_hash, frontier = self._recent[size]
        rows = [e for e in fetch(size) if e.seq < before]
        if (size > 0 and len(rows) == before - 1 - size and rows
                and rows[0].prev_hash == known_hash and rows[-1].hash == prev_hash):
            return self._extend(size, frontier, rows)
        # Nothing links: start over (the store was replaced, or a row changed).
        self._recent = {0: (GENESIS_HASH, merkle.Frontier())}
        rows = [e for e in fetch(0) if e.seq < before]
        return self._extend(0, merkle.Frontier(), rows)

    def on_append(self, entry: AuditEntry, fetch: Fetch, *, proof: bool = True) -> AuditEntry:
        """``entry`` with the root of the tree it ends and its inclusion proof in that tree.

        Called inside the appending transaction, with the entry just made by
        :func:`bridge.ledger.audit.chain_entry` (its hash is its content's).

        ``proof=False``: the caller has no use for the root and the proof now. An entry
        that extends the cached tree extends it as usual (cheap, and keeps the cache
        current); one that does not (another process appended meanwhile) is returned
        as it is, without reading the other process's entries now: the next append
        that needs a proof, or :meth:`sync`, reads them all at once. Processes sharing
        one log would otherwise each reread every entry the others write, one query
        per append.
        """
        with self._lock:
            frontier = self._linkable(entry.seq - 1, entry.prev_hash)
            if frontier is None:
                if not proof:
                    return entry
                frontier = self._catch_up(entry.seq, entry.prev_hash, fetch)
            path = tuple(frontier.path_for_next())
            root = self._extend(entry.seq - 1, frontier, [entry], fresh=True).root()
        return dataclasses.replace(entry, root=root, path=path)

    def sync(self, store: Any) -> tuple[int, bytes, Leaves]:
        """Bring the cache up to the store's committed log: ``(size, root, leaves)``.

        The store is read without the cache's lock held (an append holds the store's
        lock, then the cache's).
        """
        size, root, leaves = self._sync(store, snapshot=True)
        assert leaves is not None
        return size, root, leaves

    def head(self, store: Any) -> tuple[int, bytes]:
        """:meth:`sync` without reading the leaves back: ``(size, root)``."""
        size, root, _ = self._sync(store, snapshot=False)
        return size, root

    def _sync(self, store: Any, *, snapshot: bool) -> tuple[int, bytes, Leaves | None]:
        with self._lock:
            start = max(self._recent)
            known = self._recent[start][0]
        # Reread entry `start` itself: it may belong to a transaction that rolled back.
        rows = store.audit_entries(since_seq=max(start - 1, 0))
        with self._lock:
            linked = self._recent.get(start, ("", None))[0] == known and (
                start == 0 or (bool(rows) and rows[0].seq == start and rows[0].hash == known))
            if linked:
                f = self._extend(start, self._recent[start][1], rows[1:] if start else rows)
                self._drop_after(len(self.leaves))
                return (len(self.leaves), f.root(),
                        self.leaves.snapshot() if snapshot else None)
        rows = store.audit_entries(since_seq=0)
        with self._lock:
            self._recent = {0: (GENESIS_HASH, merkle.Frontier())}
            f = self._extend(0, merkle.Frontier(), rows)
            self._drop_after(len(self.leaves))
            return len(self.leaves), f.root(), self.leaves.snapshot() if snapshot else None

    def close(self) -> None:
        """Let go of the leaf file (the store is closing)."""
        with self._lock:
            self.leaves.close()

    def _drop_after(self, size: int) -> None:
        self.leaves.truncate(size)
        for s in [s for s in self._recent if s > size]:
            del self._recent[s]


def cache_of(store: Any) -> TreeCache:
    """The store's tree cache (created on first use). Its leaf file is made beside an
    SQLite store's database (``TMPDIR`` is often a memory file system), in ``TMPDIR``
    for a PostgreSQL store."""
    cache = getattr(store, "_tree_cache", None)
    if cache is None:
        path = getattr(store, "path", None)
        cache = TreeCache(str(path.parent) if isinstance(path, Path) else None)
        store._tree_cache = cache
    return cache


def close_cache(store: Any) -> None:
    """Close the store's tree cache, if it has one (the store is closing): its leaf
    file goes. A store used again after that builds a new one from its entries."""
    cache = store.__dict__.pop("_tree_cache", None)
    if cache is not None:
        cache.close()


# --- checkpoints -----------------------------------------------------------------------


def latest_checkpoint(store: Any) -> tuple[int, str, datetime, str] | None:
    """The newest own checkpoint: ``(size, root hex, issued, note)``."""
    with store.read("latest_checkpoint") as tx:
        r = tx.one("SELECT size, root, issued, note FROM audit_checkpoint"
                   " ORDER BY size DESC LIMIT 1")
    if r is None:
        return None
    return int(r[0]), str(r[1]), parse_time(r[2]), str(r[3])


def own_checkpoints(store: Any) -> list[tuple[int, str]]:
    """Every own checkpoint: ``(size, note)`` in size order."""
    with store.read("own_checkpoints") as tx:
        return [(int(r[0]), str(r[1])) for r in
                tx.all("SELECT size, note FROM audit_checkpoint ORDER BY size")]


def checkpoint_due(store: Any, now: datetime) -> bool:
    """Whether :func:`issue_checkpoint` should run now (100 entries or 60 s uncovered)."""
    head, _ = store.audit_head()
    last = latest_checkpoint(store)
    covered = last[0] if last else 0
    if head <= covered:
        return False
    if head - covered >= CHECKPOINT_ENTRIES or last is None:
        return True
    return now - last[2] >= CHECKPOINT_INTERVAL


def issue_checkpoint(store: Any, sign: Callable[[int, bytes, datetime], str],
                     now: datetime) -> tuple[int, str] | None:
    """Sign and keep a checkpoint of the committed log; None when it is already covered.

    ``sign(size, root, now)`` returns the note text. The checkpoint is stored only if
    entry ``size`` still has the hash the tree was built from.
    """
    cache = cache_of(store)
    size, root = cache.head(store)
    if size == 0:
        return None
    last = latest_checkpoint(store)
    if last is not None and last[0] >= size:
        return None
    note = sign(size, root, now)
    with store.transaction("issue_checkpoint") as tx:
        head = tx.one("SELECT hash FROM audit WHERE seq=?", (size,))
        if head is None or cache._recent.get(size, ("", None))[0] != head[0]:
            return None
        tx.execute("INSERT INTO audit_checkpoint (size, root, issued, note) VALUES (?,?,?,?)"
                   " ON CONFLICT (size) DO NOTHING", (size, root.hex(), format_time(now), note))
    return size, note


def keep_cosigned(store: Any, cosigner: str, size: int, note: str, now: datetime) -> None:
    """Keep one of our checkpoints as a partner cosigned it."""
    with store.transaction("keep_cosigned") as tx:
        tx.execute("INSERT INTO audit_cosigned (cosigner, size, note, received) VALUES (?,?,?,?)",
                   (cosigner, size, note, format_time(now)))


def cosigned_checkpoints(store: Any) -> list[tuple[str, int, str]]:
    """Our checkpoints with partners' cosignatures: ``(cosigner, size, note)``."""
    with store.read("cosigned_checkpoints") as tx:
        return [(str(r[0]), int(r[1]), str(r[2])) for r in tx.all(
            "SELECT cosigner, size, note FROM audit_cosigned ORDER BY size, id")]


def last_witnessed(store: Any, partner: str) -> tuple[int, str] | None:
    """The newest checkpoint of ``partner`` that we cosigned: ``(size, note)``."""
    with store.read("last_witnessed") as tx:
        r = tx.one("SELECT size, note FROM audit_witness WHERE partner=?"
                   " ORDER BY size DESC LIMIT 1", (partner,))
    return (int(r[0]), str(r[1])) if r is not None else None


def keep_witnessed(store: Any, partner: str, size: int, root: bytes, note: str,
                   now: datetime) -> None:
    """Keep a partner checkpoint we verified and cosigned (``note`` with our cosignature)."""
    with store.transaction("keep_witnessed") as tx:
        tx.execute("INSERT INTO audit_witness (partner, size, root, note, cosigned)"
                   " VALUES (?,?,?,?,?) ON CONFLICT (partner, size) DO NOTHING",
                   (partner, size, root.hex(), note, format_time(now)))


def open_faults(store: Any, partner: str) -> tuple[int, str | None, str | None]:
    """The checkpoints of ``partner`` refused since the last one cosigned here:
    ``(count, reason of the newest, when it was seen)``. A partner whose log was cut or
    rewritten stays here until someone settles it: its later checkpoints do not extend
    the one cosigned before."""
    with store.read("open_faults") as tx:
        last = tx.one("SELECT MAX(cosigned) FROM audit_witness WHERE partner=?", (partner,))
        since = str(last[0]) if last is not None and last[0] is not None else ""
        count = tx.one("SELECT COUNT(*) FROM audit_witness_fault WHERE partner=? AND seen>?",
                       (partner, since))
        newest = tx.one("SELECT reason, seen FROM audit_witness_fault WHERE partner=? AND"
                        " seen>? ORDER BY id DESC LIMIT 1", (partner, since))
    if newest is None:
        return 0, None, None
    return int(count[0]), str(newest[0]), str(newest[1])


def keep_fault(store: Any, partner: str, note: str, reason: str, now: datetime) -> None:
    """Keep a partner checkpoint we refused, as evidence."""
    with store.transaction("keep_witness_fault") as tx:
        tx.execute("INSERT INTO audit_witness_fault (partner, note, reason, seen)"
                   " VALUES (?,?,?,?)", (partner, note, reason, format_time(now)))
