"""Verify an audit log as a whole: chain, tree, checkpoints and cosignatures (pure).

:func:`verify_log` is what ``bridge audit verify`` runs. It names the first thing that
fails, in this order: an entry whose chain link or hash is wrong (§9.2); a checkpoint
this controller issued whose signature fails, that covers more entries than the log
holds (the tail was removed, or the store is an older copy), or whose root the
entries no longer give (entries rewritten since: the failing checkpoint and the last
good one bound where); a partner's cosignature that does not verify.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bridge.ledger import merkle
from bridge.ledger.audit import AuditEntry, AuditEntryDamaged, leaf_from_hash, verify_chain
from bridge.trust.checkpoint import (
    Checkpoint,
    CheckpointError,
    PublicKey,
    cosignatures,
    parse_checkpoint,
    verify_checkpoint,
)

KeysFor = Callable[[str], Sequence[PublicKey]]


@dataclass(frozen=True)
class LogReport:
    """Outcome of :func:`verify_log` (``first_bad_seq`` / ``bad_checkpoint`` name the fault)."""

    ok: bool
    entries: int
    head_hash: str
    root: bytes
    checkpoints: int = 0
    cosignatures: int = 0
    signatures_checked: bool = False
    first_bad_seq: int | None = None
    bad_checkpoint: str | None = None
    reason: str | None = None


def verify_log(
    entries: Sequence[AuditEntry],
    checkpoints: Sequence[str],
    cosigned: Sequence[tuple[str, str]],
    *,
    name: str,
    keys_for: KeysFor | None = None,
    damaged: AuditEntryDamaged | None = None,
) -> LogReport:
    """Check ``entries`` against the chain rule, then every checkpoint and cosignature.

    ``checkpoints`` are this controller's notes, ``cosigned`` ``(cosigner, note)`` pairs;
    ``keys_for(name)`` gives the public keys of a controller (this one included). Without
    it, signatures are not checked (``signatures_checked`` says which). ``damaged`` is
    the stored entry after ``entries`` that could not be read
    (:func:`bridge.ledger.audit.read_chain`).
    """
    chain = verify_chain(entries, damaged=damaged)
    if not chain.ok:
        return LogReport(False, chain.count, chain.head_hash, b"", first_bad_seq=chain.first_bad_seq,
                         reason=chain.reason)
    # The chain check recomputed every hash from the content: the stored one now stands
    # for it, and the leaf is taken from it rather than hashed a second time.
    leaves = [leaf_from_hash(e.hash) for e in entries]
    n = len(leaves)
    parsed: list[Checkpoint] = []
    for note in checkpoints:
        try:
            cp = (verify_checkpoint(note, name, keys_for(name)) if keys_for
                  else parse_checkpoint(note))
        except CheckpointError as exc:
            return LogReport(False, n, chain.head_hash, b"", bad_checkpoint=exc.location,
                             reason=str(exc))
        parsed.append(cp)
    parsed.sort(key=lambda c: c.size)
    frontier = merkle.Frontier()
    good = 0
    for cp in parsed:
        if cp.size > n:
            return LogReport(
                False, n, chain.head_hash, merkle.root(leaves), checkpoints=good,
                bad_checkpoint=cp.name, first_bad_seq=n + 1,
                reason=f"checkpoint {cp.name} covers {cp.size} entries but the log holds {n}:"
                       f" entries {n + 1} to {cp.size} are gone")
        while frontier.size < cp.size:
            frontier.append(leaves[frontier.size])
        if frontier.root() != cp.root:
            last = parsed[good - 1].size if good else 0
            return LogReport(
                False, n, chain.head_hash, merkle.root(leaves), checkpoints=good,
                bad_checkpoint=cp.name, first_bad_seq=last + 1,
                reason=f"entries 1 to {cp.size} no longer give the root of checkpoint {cp.name}:"
                       f" an entry from {last + 1} to {cp.size} was rewritten")
        good += 1
    checked: list[tuple[str, Checkpoint]] = []
    for cosigner, note in cosigned:
        try:
            cp = (verify_checkpoint(note, name, keys_for(name)) if keys_for
                  else parse_checkpoint(note))
            where = f"checkpoint {cp.name}"
            if keys_for is not None and not cosignatures(note, cosigner, keys_for(cosigner),
                                                         where=where):
                raise CheckpointError(f"no valid cosignature by {cosigner}", location=where)
        except CheckpointError as exc:
            return LogReport(False, n, chain.head_hash, merkle.root(leaves), checkpoints=good,
                             bad_checkpoint=exc.location, reason=str(exc))
        checked.append((cosigner, cp))
    prefix_roots = _roots_at(leaves, {cp.size for _, cp in checked if cp.size <= n})
    for cosigner, cp in checked:
        if prefix_roots.get(cp.size) != cp.root:
            return LogReport(False, n, chain.head_hash, merkle.root(leaves), checkpoints=good,
                             bad_checkpoint=cp.name,
                             reason=f"checkpoint {cp.name} cosigned by {cosigner} does not match"
                                    " the log (entries removed or rewritten since)")
    count = len(checked)
    return LogReport(True, n, chain.head_hash, merkle.root(leaves), checkpoints=good,
                     cosignatures=count, signatures_checked=keys_for is not None)


def _roots_at(leaves: Sequence[bytes], sizes: set[int]) -> dict[int, bytes]:
    """Roots of the prefixes of ``leaves`` of the given sizes, in one pass."""
    out: dict[int, bytes] = {}
    frontier = merkle.Frontier()
    for size in sorted(sizes):
        while frontier.size < size:
            frontier.append(leaves[frontier.size])
        out[size] = frontier.root()
    return out
