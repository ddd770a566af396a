"""The audit Merkle tree: RFC 9162 hashes and proofs, checked against a plain recursion."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ledger import merkle
from bridge.ledger.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    canonical_bytes,
    chain_entry,
    leaf_of,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 written as the recursion it is defined by."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def log(subjects: list[str]) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    prev = GENESIS_HASH
    for i, subject in enumerate(subjects, start=1):
        rec = AuditRecord(time=T0 + timedelta(seconds=i), actor="insurer-b",
                          action="message.receive", subject=subject or "s",
                          partner="hospital-a", categories=["health-payment"],
                          digest=f"sha256:{i:064x}")
        e = chain_entry(prev, i, rec)
        out.append(e)
        prev = e.hash
    return out


def test_known_vectors() -> None:
    # RFC 6962/9162 reference test data (certificate-transparency-go merkle tests).
    inputs = [bytes.fromhex(h) for h in
              ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
               "606162636465666768696a6b6c6d6e6f"]]
    leaves = [merkle.leaf_hash(d) for d in inputs]
    assert merkle.root(leaves).hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
    assert merkle.root(leaves[:1]).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert merkle.root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=40), st.data())
def test_every_proof_verifies_and_any_changed_byte_fails(subjects: list[str],
                                                        data: st.DataObject) -> None:
    entries = log(subjects)
    leaves = [leaf_of(e) for e in entries]
    n = len(leaves)
    frontier = merkle.Frontier()
    for size in range(1, n + 1):
        frontier.append(leaves[size - 1])
        assert frontier.root() == mth(leaves[:size])
    head = merkle.root(leaves)
    assert head == mth(leaves)
    for i in range(n):
        proof = merkle.inclusion_proof(i, leaves)
        assert merkle.verify_inclusion(i, n, leaves[i], proof, head)
        assert not merkle.verify_inclusion(i, n, merkle.leaf_hash(b"other"), proof, head)
    for m in range(n + 1):
        proof = merkle.consistency_proof(m, leaves)
        assert merkle.verify_consistency(m, n, merkle.root(leaves[:m]), head, proof)
        if 0 < m < n:
            assert not merkle.verify_consistency(m, n, merkle.root(leaves[:m]), head, proof[:-1])
    # One byte of one stored entry changed: its inclusion proof no longer verifies, nor
    # does any consistency proof from a checkpoint that covered it.
    victim = data.draw(st.integers(0, n - 1))
    raw = bytearray(canonical_bytes(entries[victim].prev_hash, entries[victim].seq,
                                    entries[victim].record))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    changed = merkle.leaf_hash(hashlib.sha256(bytes(raw)).digest())
    tampered = leaves[:victim] + [changed] + leaves[victim + 1:]
    assert not merkle.verify_inclusion(victim, n, changed,
                                       merkle.inclusion_proof(victim, tampered), head)
    old = data.draw(st.integers(victim + 1, n))
    assert not merkle.verify_consistency(old, n, merkle.root(leaves[:old]), merkle.root(tampered),
                                         merkle.consistency_proof(old, tampered))


def test_a_field_change_changes_the_leaf() -> None:
    entries = log(["a", "b", "c"])
    edited = dataclasses.replace(entries[1], record=dataclasses.replace(entries[1].record,
                                                                        outcome="denied"))
    assert leaf_of(edited) != leaf_of(entries[1])


def test_out_of_range_requests_are_refused() -> None:
    leaves = [merkle.leaf_hash(b"x")] * 3
    for bad in (-1, 3):
        try:
            merkle.inclusion_proof(bad, leaves)
        except ValueError as exc:
            assert "size 3" in str(exc)
        else:
            raise AssertionError("accepted")
    assert not merkle.verify_consistency(4, 3, b"", b"", [])
    assert not merkle.verify_inclusion(3, 3, leaves[0], [], merkle.root(leaves))
