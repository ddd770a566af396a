"""An outside verifier of audit evidence, written from PROTOCOL.md §6.2 and §9.5-9.7 alone.

Checks a receipt's checkpoint and inclusion proof, a checkpoint's signature and a
consistency proof between two checkpoints, and makes a cosignature, with nothing but
``hashlib`` and ``cryptography``'s primitives (RFC 9162 §2.1.3.2 and §2.1.4.2 written
out again here on purpose: nothing comes from the bridge's own tree code).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bridge.conformance import protocol as P
from bridge.conformance.envelope import PeerCheckFailed, SigningKey

EXT_AUDIT_CHECKPOINT = P.EXT_PREFIX + "audit-checkpoint"
EXT_AUDIT_PROOF = P.EXT_PREFIX + "audit-proof"
DASH = "\u2014 "


@dataclass(frozen=True)
class Tree:
    """A checkpoint as §9.6 reads it."""

    origin: str
    size: int
    root: bytes
    text: str  # the signed four lines
    note: str


def _key_bytes(key: Any) -> tuple[int, bytes]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 1, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return 2, key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(name: str, key: Any, kind: int | None = None) -> bytes:
    own_kind, raw = _key_bytes(key)
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind or own_kind]) + raw).digest()[:4]


def _verify_sig(key: Any, sig: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def read_checkpoint(note: str, name: str, certificate: x509.Certificate) -> Tree:
    """§9.6: four lines, a blank line, and a valid signature line by ``name``."""
    text, _, sigs = note.partition("\n\n")
    lines = text.split("\n")
    if len(lines) != 4 or not lines[3].startswith("time "):
        raise PeerCheckFailed("checkpoint text is not four lines ending with a time line")
    if lines[0] != f"ws-fhir-bridge/audit/{name}":
        raise PeerCheckFailed(f"checkpoint origin is not {name}'s log")
    body = (text + "\n").encode()
    key = certificate.public_key()
    for line in sigs.rstrip("\n").split("\n"):
        if line.startswith(DASH + name + " "):
            raw = base64.b64decode(line.rsplit(" ", 1)[1])
            if raw[:4] == _key_id(name, key) and _verify_sig(key, raw[4:], body):
                return Tree(lines[0], int(lines[1]), base64.b64decode(lines[2]), text + "\n",
                            note)
    raise PeerCheckFailed(f"no valid signature by {name} on the checkpoint")


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def inclusion_holds(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                    root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = _node(p, r)
            while fn % 2 == 0 and fn != 0:
                fn //= 2
                sn //= 2
        else:
            r = _node(r, p)
        fn //= 2
        sn //= 2
    return sn == 0 and r == root


def consistency_holds(first: int, second: int, first_root: bytes, second_root: bytes,
                      proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2 (size 0 extends to anything with an empty proof)."""
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof
    if first > second or not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path = [first_root, *path]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while fn % 2 == 0 and fn != 0:
                fn //= 2
                sn //= 2
        else:
            sr = _node(sr, c)
        fn //= 2
        sn //= 2
    return sn == 0 and fr == first_root and sr == second_root


def receipt_tree(receipt: Mapping[str, Any], receiver: str,
                 certificate: x509.Certificate) -> Tree:
    """P-RCP-4: the receipt's checkpoint, checked to hold the audit entry it names."""
    header = receipt["entry"][0]["resource"]
    ext = {e["url"]: e.get("valueString", e.get("valueInteger"))
           for e in header.get("extension", [])}
    note = ext.get(EXT_AUDIT_CHECKPOINT)
    if not isinstance(note, str):
        raise PeerCheckFailed("receipt carries no audit checkpoint")
    tree = read_checkpoint(note, receiver, certificate)
    seq, entry_hash = ext[P.EXT_AUDIT_SEQ], ext[P.EXT_AUDIT_HASH]
    proof = [base64.b64decode(p) for p in str(ext.get(EXT_AUDIT_PROOF) or "").split()]
    leaf = hashlib.sha256(b"\x00" + bytes.fromhex(entry_hash)).digest()
    if tree.size != seq or not inclusion_holds(seq - 1, tree.size, leaf, proof, tree.root):
        raise PeerCheckFailed(f"audit entry {seq} is not in the receipt's checkpoint")
    return tree


def parameters(doc: Any) -> dict[str, str]:
    """The valueString parameters of a FHIR Parameters answer (§9.7)."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise PeerCheckFailed("answer is not a Parameters resource")
    return {p["name"]: p["valueString"] for p in doc.get("parameter", [])}


def proof_of(text: str | None) -> list[bytes]:
    return [base64.b64decode(p) for p in (text or "").split()]


def cosign(tree: Tree, key: SigningKey, name: str, seconds: int) -> str:
    """§9.7 P-AUD-8: the checkpoint with a cosignature line by ``name`` added."""
    message = f"cosignature/v1\ntime {seconds}\n".encode() + tree.text.encode()
    if isinstance(key.private_key, ed25519.Ed25519PrivateKey):
        sig = key.private_key.sign(message)
    else:
        sig = key.private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    raw = _key_id(name, key.private_key.public_key(), 4) + struct.pack(">Q", seconds) + sig
    return f"{tree.note}{DASH}{name} {base64.b64encode(raw).decode()}\n"
