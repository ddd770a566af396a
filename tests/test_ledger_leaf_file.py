"""The audit tree's leaves live in a temporary file, not in the bridge's memory.

A bridge appends two audit entries per claim for as long as it runs; the leaf hashes
(32 bytes each) that consistency proofs are built from would otherwise grow its resident
size by that much per claim for ever.
"""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ledger import merkle
from bridge.ledger.audit import GENESIS_HASH, AuditRecord, chain_entry, leaf_from_hash
from bridge.ledger.tree import LeafFile, Leaves, TreeCache

T0 = datetime(2026, 12, 7, tzinfo=UTC)


def leaf(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40).map(lambda n: ("append", n)),
                          st.integers(0, 60).map(lambda n: ("truncate", n))), max_size=25))
def test_the_leaf_file_holds_what_the_in_memory_leaves_hold(steps: list[tuple[str, int]]) -> None:
    file, memory = LeafFile(), Leaves()
    counter = 0
    try:
        for op, n in steps:
            if op == "append":
                for _ in range(n):
                    file.append(leaf(counter))
                    memory.append(leaf(counter))
                    counter += 1
            else:
                file.truncate(n)
                memory.truncate(n)
            assert len(file) == len(memory)
            snap = file.snapshot()
            assert list(snap) == list(memory)
            assert snap[:] == memory[:]
    finally:
        file.close()


def test_a_leaf_is_32_bytes() -> None:
    file = LeafFile()
    try:
        with pytest.raises(ValueError, match="32 bytes"):
            file.append(b"short")
        assert len(file) == 0
    finally:
        file.close()


def _entries(n: int) -> list:
    out, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        e = chain_entry(prev, seq, AuditRecord(time=T0, actor="hospital-a",
                                               action="claim.enqueue", subject=f"m{seq}"))
        out.append(e)
        prev = e.hash
    return out


def test_the_tree_cache_does_not_grow_with_the_log() -> None:
    entries = _entries(24_000)
    cache = TreeCache()

    def no_fetch(since: int) -> list:
        raise AssertionError("every entry extends the cached tree")

    def append(part: list) -> None:
        for e in part:
            cache.on_append(e, no_fetch, proof=False)

    append(entries[:4_000])  # the recent frontiers fill up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        append(entries[4_000:])
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 20,000 leaves are 640,000 bytes; in memory they would be all of that. What does
    # grow is the recent frontiers, a node longer each time the log doubles.
    assert grown < 160_000, grown
    # What the file holds is the tree of the log, leaf by leaf.
    leaves = [leaf_from_hash(e.hash) for e in entries]
    snap = cache.leaves.snapshot()
    assert len(snap) == 24_000 and list(snap) == leaves
    assert merkle.root(snap[:]) == merkle.root(leaves)
    cache.close()
