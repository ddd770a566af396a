"""The audit tree kept by each store: roots on append, other writers, rollbacks, checkpoints."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
import test_ledger_contract
from cryptography.hazmat.primitives.asymmetric import ec
from test_ledger_contract import Backend, rec

from bridge.ledger import merkle, tree
from bridge.ledger.audit import leaf_of
from bridge.trust.checkpoint import origin_for, sign_checkpoint, verify_checkpoint

T0 = datetime(2026, 12, 5, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())

# Both engines, as the store contract tests run them.
backend = test_ledger_contract.backend


def signer(size: int, root: bytes, now: datetime) -> str:
    return sign_checkpoint(KEY, "hospital-a", origin_for("hospital-a"), size, root, now).note


def test_every_append_knows_the_root_of_its_tree(backend: Backend) -> None:
    with backend.open() as a, backend.open() as b:
        entries = []
        # Two store objects on the same data stand for two processes appending in turn.
        for i in range(12):
            writer = a if i % 3 else b
            entries.append(writer.append_audit(rec("message.receive", f"s{i}")))
        leaves = [leaf_of(e) for e in a.audit_entries()]
        for e in entries:
            assert e.root == merkle.root(leaves[:e.seq]), e.seq
            assert merkle.verify_inclusion(e.seq - 1, e.seq, leaves[e.seq - 1], e.path, e.root)
        # A transaction that rolls back leaves no trace in the tree that follows.
        with pytest.raises(RuntimeError), a.transaction("t") as tx:
            tx.append_audit(rec("message.receive", "rolled-back"))
            raise RuntimeError("abort")
        after = a.append_audit(rec("message.receive", "after"))
        leaves = [leaf_of(e) for e in a.audit_entries()]
        assert after.seq == 13 and after.root == merkle.root(leaves)
        size, root, cached = tree.cache_of(b).sync(b)
        assert (size, root, list(cached)) == (13, merkle.root(leaves), leaves)


def test_checkpoints_are_issued_after_100_entries_or_60_seconds(backend: Backend) -> None:
    with backend.open() as s:
        assert not tree.checkpoint_due(s, T0)
        s.append_audit(rec("message.receive", "first"))
        assert tree.checkpoint_due(s, T0)  # nothing covered yet
        issued = tree.issue_checkpoint(s, signer, T0)
        assert issued is not None and issued[0] == 1
        assert tree.issue_checkpoint(s, signer, T0) is None  # already covered
        for i in range(99):
            s.append_audit(rec("message.receive", f"s{i}"))
        assert not tree.checkpoint_due(s, T0 + timedelta(seconds=59))
        assert tree.checkpoint_due(s, T0 + timedelta(seconds=60))
        s.append_audit(rec("message.receive", "hundredth"))
        assert tree.checkpoint_due(s, T0 + timedelta(seconds=1))
        size, note = tree.issue_checkpoint(s, signer, T0 + timedelta(seconds=1)) or (0, "")
        cp = verify_checkpoint(note, "hospital-a", [KEY.public_key()])
        leaves = [leaf_of(e) for e in s.audit_entries()]
        assert size == cp.size == 101 and cp.root == merkle.root(leaves)
        assert [n for n, _ in tree.own_checkpoints(s)] == [1, 101]


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_closed_store_lets_go_of_its_leaf_file(backend: Backend) -> None:
    """Each store keeps its audit tree's leaves in an unnamed file: closing the store
    closes it, so a process that opens and closes stores for years holds no more files
    than it has stores open; a store opened again reads its tree back from its entries."""
    with backend.open() as s:
        s.append_audit(rec("message.receive", "warm"))
    before = _open_files()
    kept = []  # referenced to the end: only close may let go of the files
    for i in range(30):
        s = backend.open()
        s.append_audit(rec("message.receive", f"s{i}"))
        s.close()
        kept.append(s)
    assert _open_files() - before < 5
    with backend.open() as s:
        entry = s.append_audit(rec("message.receive", "again"))
        leaves = [leaf_of(e) for e in s.audit_entries()]
        assert entry.root == merkle.root(leaves)
        size, root, cached = tree.cache_of(s).sync(s)
        assert (size, root, list(cached)) == (len(leaves), merkle.root(leaves), leaves)
