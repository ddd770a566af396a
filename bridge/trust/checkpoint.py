"""Signed checkpoints of an audit tree, and partners' cosignatures on them (PROTOCOL §9.6).

A checkpoint is a C2SP signed note (``c2sp.org/signed-note``) whose text is a C2SP
checkpoint (``c2sp.org/tlog-checkpoint``) with one extension line::

    ws-fhir-bridge/audit/insurer-b
    1042
    q0V8bm9Jd3VjZV9hYmNkZWZnaGlqa2xtbm9wcXJzdHU=
    time 2026-12-05T01:02:03.000000+00:00

    — insurer-b AbCdEf...

The body (every line up to the blank one, each ending in ``\\n``) is what is signed.
A signature line is ``— <name> <base64(key id || signature)>``: the key id is the
first 4 bytes of ``SHA-256(name || 0x0A || type || public key)``, type ``0x01`` with
the 32 raw bytes of an Ed25519 key, type ``0x02`` with the DER SubjectPublicKeyInfo of
an EC P-256 key (signature: DER ECDSA over SHA-256).

A cosignature (``c2sp.org/tlog-cosignature``) is a signature line by the partner over
``"cosignature/v1\\ntime <unix seconds>\\n" + body``; its value is
``base64(key id || 8-byte big-endian seconds || signature)`` with type ``0x04`` in the
key id. A partner cosigns only a checkpoint it has shown to extend the last one it
cosigned (:func:`check_extends`).

Everything here is pure: keys in, text out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bridge.errors import BridgeError
from bridge.ledger import merkle

ORIGIN_PREFIX = "ws-fhir-bridge/audit/"
COSIGNATURE_PREFIX = "cosignature/v1\n"
_DASH = "\u2014 "
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
_TIME = re.compile(r"^time (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00)\Z")

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class CheckpointError(BridgeError):
    """A checkpoint that is malformed, badly signed, or does not extend the one before."""

    code = "checkpoint-invalid"
    http_status = 422


@dataclass(frozen=True)
class Checkpoint:
    """One signed tree head: ``size`` entries of ``origin``'s log hash to ``root``."""

    origin: str
    size: int
    root: bytes
    time: datetime
    note: str

    @property
    def name(self) -> str:
        """How reports name it: ``<origin>@<size>``."""
        return f"{self.origin}@{self.size}"

    @property
    def body(self) -> str:
        return self.note.split("\n\n", 1)[0] + "\n"


def origin_for(controller: str) -> str:
    """The checkpoint origin line of ``controller``'s audit log."""
    return ORIGIN_PREFIX + controller


def _pub_bytes(key: PublicKey) -> tuple[int, bytes]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 0x01, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return 0x02, key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(name: str, key: PublicKey, *, cosignature: bool = False) -> bytes:
    """The 4-byte key id of ``key`` under ``name`` (type 0x04 for cosignatures)."""
    kind, raw = _pub_bytes(key)
    if cosignature:
        kind = 0x04
    return hashlib.sha256(name.encode() + b"\n" + bytes([kind]) + raw).digest()[:4]


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _verify(key: PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def body_text(origin: str, size: int, root: bytes, time: datetime) -> str:
    """The signed text of a checkpoint."""
    stamp = time.astimezone(UTC).isoformat(timespec="microseconds")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {stamp}\n"


def sign_checkpoint(key: PrivateKey, name: str, origin: str, size: int, root: bytes,
                    time: datetime) -> Checkpoint:
    """A checkpoint of ``size``/``root`` signed by ``name``'s ``key``."""
    body = body_text(origin, size, root, time)
    sig = key_id(name, key.public_key()) + _sign(key, body.encode())
    note = f"{body}\n{_DASH}{name} {base64.b64encode(sig).decode()}\n"
    return Checkpoint(origin=origin, size=size, root=root,
                      time=time.astimezone(UTC), note=note)


def _split_note(note: str, where: str) -> tuple[str, list[tuple[str, bytes]]]:
    if "\n\n" not in note or not note.endswith("\n"):
        raise CheckpointError("not a signed note (no blank line after the text)", location=where)
    body, sigs = note.split("\n\n", 1)
    lines: list[tuple[str, bytes]] = []
    for line in sigs[:-1].split("\n"):
        if not line.startswith(_DASH) or line.count(" ") != 2:
            raise CheckpointError("malformed signature line", location=where)
        name, value = line[len(_DASH):].split(" ")
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise CheckpointError("signature is not base64", location=where) from None
        if len(raw) < 5:
            raise CheckpointError("signature too short", location=where)
        lines.append((name, raw))
    return body + "\n", lines


def parse_checkpoint(note: str, *, where: str = "checkpoint") -> Checkpoint:
    """The fields of a checkpoint note, without checking any signature."""
    body, _ = _split_note(note, where)
    parts = body[:-1].split("\n")
    if len(parts) != 4:
        raise CheckpointError("checkpoint text must have 4 lines", location=where)
    origin, size_text, root_text, time_line = parts
    if not origin.startswith(ORIGIN_PREFIX) or not _NAME.match(origin[len(ORIGIN_PREFIX):]):
        raise CheckpointError("unknown checkpoint origin", location=f"{where} line 1")
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise CheckpointError("tree size is not a decimal number", location=f"{where} line 2")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        root = b""
    if len(root) != 32:
        raise CheckpointError("root hash is not 32 bytes of base64", location=f"{where} line 3")
    m = _TIME.match(time_line)
    if m is None:
        raise CheckpointError("missing time line", location=f"{where} line 4")
    return Checkpoint(origin=origin, size=int(size_text), root=root,
                      time=datetime.fromisoformat(m.group(1)), note=note)


def verify_checkpoint(note: str, name: str, keys: Sequence[PublicKey], *,
                      where: str = "checkpoint") -> Checkpoint:
    """Parse ``note`` and check it carries a valid signature by ``name`` with one of ``keys``.

    The origin must be ``name``'s: a checkpoint of one log cannot stand for another.
    """
    cp = parse_checkpoint(note, where=where)
    if cp.origin != origin_for(name):
        # Named by its place only: the origin it states is the sender's text.
        raise CheckpointError(f"checkpoint is not of {name}'s log", location=f"{where} line 1")
    where = f"checkpoint {cp.name}"
    body, sigs = _split_note(note, where)
    for signer, raw in sigs:
        if signer != name:
            continue
        for key in keys:
            if raw[:4] == key_id(name, key) and _verify(key, raw[4:], body.encode()):
                return cp
    raise CheckpointError(f"no valid signature by {name}", location=where)


def cosign(cp: Checkpoint, key: PrivateKey, name: str, time: datetime) -> str:
    """``cp``'s note with a cosignature line by ``name`` appended."""
    seconds = int(time.timestamp())
    message = f"{COSIGNATURE_PREFIX}time {seconds}\n{cp.body}".encode()
    raw = key_id(name, key.public_key(), cosignature=True) + struct.pack(">Q", seconds) + _sign(
        key, message)
    return f"{cp.note}{_DASH}{name} {base64.b64encode(raw).decode()}\n"


def cosignatures(note: str, name: str, keys: Sequence[PublicKey], *,
                 where: str = "checkpoint") -> list[datetime]:
    """Times of the valid cosignatures by ``name`` on ``note`` (a bad one is an error)."""
    body, sigs = _split_note(note, where)
    found: list[datetime] = []
    for signer, raw in sigs:
        if signer != name or len(raw) < 13:
            continue
        kid, (seconds,), sig = raw[:4], struct.unpack(">Q", raw[4:12]), raw[12:]
        message = f"{COSIGNATURE_PREFIX}time {seconds}\n{body}".encode()
        candidates = [k for k in keys if key_id(name, k, cosignature=True) == kid]
        if not candidates:
            continue
        if not any(_verify(k, sig, message) for k in candidates):
            raise CheckpointError(f"cosignature by {name} does not verify", location=where)
        found.append(datetime.fromtimestamp(seconds, UTC))
    return found


def check_extends(previous: Checkpoint | None, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """Refuse ``new`` unless the consistency ``proof`` shows it extends ``previous``.

    The error names both checkpoints: a smaller tree (entries removed, or an older copy
    of the store), the same size with another root (a rewrite or a fork), or a larger
    tree that does not contain the old one.
    """
    if previous is None:
        return
    where = f"checkpoint {new.name}"
    if previous.origin != new.origin:
        raise CheckpointError("checkpoints of two different logs", location=where)
    if new.size < previous.size:
        raise CheckpointError(
            f"log shrank from {previous.size} to {new.size} entries since checkpoint "
            f"{previous.name} (truncated, or restored from an older copy)", location=where)
    if not merkle.verify_consistency(previous.size, new.size, previous.root, new.root, proof):
        kind = "another root for the same size" if new.size == previous.size else (
            "does not extend")
        raise CheckpointError(
            f"{kind}: checkpoint {new.name} is inconsistent with checkpoint {previous.name}"
            " (entries rewritten, removed, or the log forked)", location=where)
