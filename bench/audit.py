"""Audit evidence benchmark: tree appends, checkpoints, verification, proofs, and what
checkpoints plus encryption at rest add to a claim.

Prints:

- entries appended per second to a SQLite store (synchronous=FULL, one transaction
  each) with the tree kept and a signed checkpoint every 100 entries, and the part of
  that spent on the tree;
- time to verify a log (chain, tree, one checkpoint per 100 entries with signatures)
  of ``--verify`` entries in memory, and extrapolated linearly to 1,000,000 (say
  ``--verify 1000000`` to measure it);
- inclusion and consistency proof sizes at 1,000 / 1,000,000 entries;
- CPU per claim added by checkpoints (receipt checkpoint signed and verified, tree
  append) and by encryption at rest (every sealed write and read of a claim on both
  sides), measured alone, against the marginal CPU per claim of the demo run (both
  processes; the demo's receipts already carry checkpoints), as a ratio.

Medians of ``--runs`` repeats; the machine is shared and noisy.

    python bench/audit.py [--entries 5000] [--verify 100000] [--claims 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import resource
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from bridge.ledger import merkle, tree
from bridge.ledger.audit import GENESIS_HASH, AuditRecord, chain_entry, leaf_of
from bridge.ledger.logcheck import verify_log
from bridge.ledger.seal import AESGCMSealer
from bridge.ledger.sqlite import SQLiteStore
from bridge.trust.checkpoint import origin_for, sign_checkpoint, verify_checkpoint

T0 = datetime(2026, 12, 5, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())


def record(i: int) -> AuditRecord:
    return AuditRecord(time=T0 + timedelta(microseconds=i), actor="insurer-b",
                       action="message.receive", subject=f"urn:uuid:{i:036d}",
                       partner="hospital-a", patient="pp:" + "ab" * 16,
                       categories=["Patient", "Encounter", "Claim"],
                       digest="sha256:" + f"{i:064x}")


def sign(size: int, root: bytes, now: datetime) -> str:
    return sign_checkpoint(KEY, "insurer-b", origin_for("insurer-b"), size, root, now).note


def append_rate(entries: int) -> tuple[float, float]:
    """(entries/s appended with checkpoints every 100, µs per entry spent on the tree)."""
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        store = SQLiteStore(Path(tmp) / "s.sqlite")
        start = time.perf_counter()
        for i in range(entries):
            store.append_audit(record(i))
            if (i + 1) % tree.CHECKPOINT_ENTRIES == 0:
                tree.issue_checkpoint(store, sign, T0)
        elapsed = time.perf_counter() - start
        store.close()
    # The tree's share, measured alone on the same entries.
    cache = tree.TreeCache()
    prev = GENESIS_HASH
    built = []
    for i in range(entries):
        e = chain_entry(prev, i + 1, record(i))
        built.append(e)
        prev = e.hash
    start = time.perf_counter()
    for e in built:
        cache.on_append(e, lambda _after: [])
    tree_us = (time.perf_counter() - start) / entries * 1e6
    return entries / elapsed, tree_us


def verify_time(n: int) -> float:
    """Seconds to verify n entries with a checkpoint per 100, keys checked."""
    entries = []
    prev = GENESIS_HASH
    frontier = merkle.Frontier()
    notes = []
    for i in range(n):
        e = chain_entry(prev, i + 1, record(i))
        entries.append(e)
        prev = e.hash
        frontier.append(leaf_of(e))
        if (i + 1) % 100 == 0:
            notes.append(sign(i + 1, frontier.root(), T0))
    keys = [KEY.public_key()]
    start = time.perf_counter()
    report = verify_log(entries, notes, [], name="insurer-b", keys_for=lambda _n: keys)
    elapsed = time.perf_counter() - start
    assert report.ok and report.checkpoints == len(notes)
    return elapsed


def proof_sizes() -> list[tuple[int, int, int]]:
    """(tree size, inclusion proof bytes, consistency proof bytes from half) as base64."""
    out = []
    for n in (1_000, 1_000_000):
        leaves = [merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(n)]
        inc = merkle.inclusion_proof(n // 3, leaves)
        con = merkle.consistency_proof(n // 2 + 1, leaves)

        def b64(p: list[bytes]) -> int:
            return len(" ".join(base64.b64encode(h).decode() for h in p))

        out.append((n, b64(inc), b64(con)))
    return out


def added_cpu_per_claim(samples: int = 2000) -> tuple[float, float]:
    """(µs of checkpoint work, µs of sealing work) one claim adds, both sides together."""
    leaves = [merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(100_000)]
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    payload = secrets.token_bytes(6000)  # a claim bundle is a few kB
    receipt = secrets.token_bytes(2500)

    class KeyTx:
        def __init__(self) -> None:
            self.rows: list[tuple[int, bytes, str]] = []

        def all(self, _sql: str) -> list[tuple[int, bytes, str]]:
            return list(self.rows)

        def one(self, _sql: str) -> tuple[int | None]:
            return (max((r[0] for r in self.rows), default=None),)

        def execute(self, _sql: str, params: tuple[object, ...]) -> None:
            self.rows.append((int(params[0]), bytes(params[1]), str(params[2])))  # type: ignore[call-overload,arg-type]

    sealer = AESGCMSealer(secrets.token_bytes(32))
    sealer.load(KeyTx())
    keys = [KEY.public_key()]

    start = time.process_time()
    for i in range(samples):
        # Receiver: tree append + root + proof, checkpoint signed into the receipt.
        f = frontier.copy()
        path = f.path_for_next()
        f.append(merkle.leaf_hash(i.to_bytes(8, "big")))
        note = sign(f.size, f.root(), T0)
        # Sender: checkpoint signature and inclusion proof checked.
        cp = verify_checkpoint(note, "insurer-b", keys)
        merkle.verify_inclusion(f.size - 1, f.size, merkle.leaf_hash(i.to_bytes(8, "big")),
                                path, cp.root)
    checkpoint_us = (time.process_time() - start) / samples * 1e6

    start = time.process_time()
    for _ in range(samples):
        # Sender: payload sealed on enqueue, opened on dispatch, receipt sealed on ack.
        sealer.unseal(sealer.seal(payload, context="outbox.payload"), context="outbox.payload")
        sealer.seal(receipt, context="outbox.receipt")
        # Receiver: payload and receipt sealed on accept, opened once for hand-off.
        sealer.unseal(sealer.seal(payload, context="inbox.payload"), context="inbox.payload")
        sealer.unseal(sealer.seal(receipt, context="inbox.receipt"), context="inbox.receipt")
    seal_us = (time.process_time() - start) / samples * 1e6
    return checkpoint_us, seal_us


def demo_cpu(claims: int) -> tuple[float, int]:
    """CPU seconds of a demo run of ``claims`` claims (both processes), and how many were
    delivered."""
    from rich.console import Console

    from bridge.demo import _run

    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="bench-audit-demo-") as tmp:
        result = asyncio.run(_run(claims, Path(tmp), 7, 0.0, Console(quiet=True), True))
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - (b.ru_utime + b.ru_stime) for a, b in (
        (after_self, before_self), (after_children, before_children)))
    return cpu, result.delivered


def claim_cpu(claims: int) -> float:
    """Marginal CPU µs per claim: the difference between demo runs of 2n and n claims
    over n (start-up, certificates and imports cancel out)."""
    small, n1 = demo_cpu(claims)
    large, n2 = demo_cpu(2 * claims)
    return (large - small) / max(n2 - n1, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--verify", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    rates = [append_rate(args.entries) for _ in range(args.runs)]
    print(f"append, SQLite synchronous=FULL, checkpoint every {tree.CHECKPOINT_ENTRIES}:"
          f" {statistics.median(r[0] for r in rates):,.0f} entries/s;"
          f" tree upkeep {statistics.median(r[1] for r in rates):.1f} µs/entry")

    seconds = statistics.median(verify_time(args.verify) for _ in range(args.runs))
    scale = 1_000_000 / args.verify
    print(f"verify {args.verify:,} entries (chain + tree + {args.verify // 100:,} signed"
          f" checkpoints): {seconds:.2f} s"
          + ("" if scale == 1 else f"; 1,000,000 extrapolated linearly: {seconds * scale:.1f} s"))

    for n, inc, con in proof_sizes():
        print(f"proofs at {n:,} entries: inclusion {inc} B, consistency {con} B (base64 text)")

    added = [added_cpu_per_claim() for _ in range(args.runs)]
    cp_us = statistics.median(a[0] for a in added)
    seal_us = statistics.median(a[1] for a in added)
    per_claim = statistics.median(claim_cpu(args.claims) for _ in range(args.runs))
    print(f"claim path: {per_claim:,.0f} µs CPU per claim (marginal, demo runs of"
          f" {args.claims} and {2 * args.claims} claims, both processes);"
          f" checkpoints add {cp_us:.0f} µs ({cp_us / per_claim:.1%}),"
          f" encryption at rest {seal_us:.0f} µs ({seal_us / per_claim:.1%}),"
          f" together {(cp_us + seal_us) / per_claim:.1%}")


if __name__ == "__main__":
    main()
