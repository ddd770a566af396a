"""The audit log as a Merkle tree (RFC 9162 §2.1): pure functions over leaf hashes.

Leaf ``i`` (0-based) of a controller's tree is audit entry ``i + 1``. Its hash is
``SHA-256(0x00 || SHA-256(E(n)))`` where ``E(n)`` is the entry's canonical serialisation
(:func:`bridge.ledger.audit.canonical_bytes`, PROTOCOL §9.2); an interior node is
``SHA-256(0x01 || left || right)`` and the tree over ``n`` leaves splits at the
largest power of two below ``n``. A root names the exact content of the first ``n``
entries; an inclusion proof shows one entry under a root; a consistency proof shows
that a tree of size ``m`` is the prefix of a tree of size ``n``. Whoever holds a
signed root (a checkpoint) can check either with nothing else (PROTOCOL §9.5).

:class:`Frontier` appends in O(log n) and gives the current root, so a writer can sign
checkpoints without rereading the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash of one leaf's input bytes."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of ``leaves`` (leaf hashes); the hash of b"" when empty."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """Audit path of leaf ``index`` in the tree over ``leaves`` (RFC 9162 §2.1.3.1)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of size {n}")
    path: list[bytes] = []
    lo, hi = 0, n
    stack: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            stack.append(root(leaves[lo + k:hi]))
            hi = lo + k
        else:
            stack.append(root(leaves[lo:lo + k]))
            lo = lo + k
    path.extend(reversed(stack))
    return path


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """Proof that the first ``old_size`` leaves form a prefix (RFC 9162 §2.1.4.1)."""
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"size {old_size} is not a prefix of a tree of size {n}")
    if old_size in (0, n):
        return []
    out: list[bytes] = []
    lo, hi, m, whole = 0, n, old_size, True
    while True:
        if m == hi - lo:
            if not whole:
                out.append(root(leaves[lo:hi]))
            break
        k = _split(hi - lo)
        if m <= k:
            out.append(root(leaves[lo + k:hi]))
            hi = lo + k
        else:
            out.append(root(leaves[lo:lo + k]))
            lo, m, whole = lo + k, m - k, False
    out.reverse()
    return out


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                     root_hash: bytes) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf`` at ``index`` in the tree of ``size`` with ``root_hash``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree (old_size, old_root) a prefix of (new_size, new_root)?

    Size 0 is the prefix of every tree (with an empty proof).
    """
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    path = list(proof)
    if not path:
        return False
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


class Frontier:
    """The roots of the perfect subtrees of a growing tree: O(log n) append and root.

    ``size`` leaves have been added; :meth:`root` equals ``root(all leaves)``.
    """

    __slots__ = ("_nodes", "size")

    def __init__(self) -> None:
        self.size = 0
        self._nodes: list[tuple[int, bytes]] = []  # (subtree size, hash), sizes decreasing

    def append(self, leaf: bytes) -> None:
        node = (1, leaf)
        while self._nodes and self._nodes[-1][0] == node[0]:
            left = self._nodes.pop()
            node = (left[0] * 2, node_hash(left[1], node[1]))
        self._nodes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self._nodes:
            return EMPTY_ROOT
        acc = self._nodes[-1][1]
        for _, h in reversed(self._nodes[:-1]):
            acc = node_hash(h, acc)
        return acc

    def path_for_next(self) -> list[bytes]:
        """Inclusion proof of the leaf appended next, in the tree it will end.

        The perfect subtrees to its left are exactly its siblings, nearest first.
        """
        return [h for _, h in reversed(self._nodes)]

    def copy(self) -> Frontier:
        other = Frontier()
        other.size = self.size
        other._nodes = list(self._nodes)
        return other
