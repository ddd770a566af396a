"""How health data is sealed before it is written to a store, and opened after.

A store holds one :class:`Sealer`. :class:`PlainSealer`, the default, stores bytes as
they are. :class:`AESGCMSealer` encrypts: every health-data column is written through
:meth:`bridge.ledger.portable.Tx.seal` and read through ``unseal``, so no table code
changes with it.

Keys. The **key-encryption key** (KEK, 32 bytes) comes from a file or an environment
variable that the configuration names (``store.data_key_file`` / ``store.data_key_env``)
and is never stored. **Data keys** (32 bytes, random) are stored in the ``data_key``
table wrapped under the KEK (RFC 3394 AES key wrap), with the KEK's fingerprint, so a
wrong KEK is refused by name rather than decrypting garbage. The newest data key seals;
every data key opens what it sealed. ``bridge keys rotate-data-key`` adds a new data key
while the bridge runs: other processes pick it up the first time they meet a value it
sealed, and keep writing with the key they hold until they reopen.

A sealed value is ``b"\\x00WSB1" || key id (4 bytes, big-endian) || nonce (12) ||
AES-256-GCM ciphertext and tag``, with the column's ``context`` (``"inbox.payload"``) as
associated data, so a value moved to another column does not open. A value without
that prefix is plain (written before encryption was turned on) and is returned as is:
health data is JSON or HL7 text and never starts with a NUL byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import struct
import threading
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from bridge.errors import ConfigError, StoreError

MAGIC = b"\x00WSB1"
_HEAD = len(MAGIC) + 4 + 12


class Sealer(Protocol):
    """Seal and open stored values; ``context`` names the table and column."""

    def seal(self, data: bytes, *, context: str) -> bytes: ...
    def unseal(self, data: bytes, *, context: str) -> bytes: ...


class PlainSealer:
    """No encryption at rest: values are stored as given."""

    def seal(self, data: bytes, *, context: str) -> bytes:
        return bytes(data)

    def unseal(self, data: bytes, *, context: str) -> bytes:
        return bytes(data)


class UnknownDataKey(Exception):
    """A sealed value names a data key this sealer has not loaded (added since)."""


def kek_fingerprint(kek: bytes) -> str:
    """How the ``data_key`` table names the KEK a data key is wrapped under."""
    return hashlib.sha256(b"ws-fhir-bridge kek\x00" + kek).hexdigest()[:16]


def parse_kek(text: bytes, where: str) -> bytes:
    """32 bytes given raw, as 64 hex digits, or as base64."""
    if len(text) == 32:
        return bytes(text)
    stripped = text.strip()
    try:
        if len(stripped) == 64:
            return bytes.fromhex(stripped.decode("ascii"))
        key = base64.b64decode(stripped, validate=True)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise ConfigError("key-encryption key must be 32 bytes (raw, 64 hex digits or base64)",
                          location=where)
    return key


def load_kek(file: Path | None, env: str | None, *, where: str = "store") -> bytes | None:
    """The KEK the configuration names, or None when it names none."""
    if file is not None and env is not None:
        raise ConfigError("name the key-encryption key once: data_key_file or data_key_env",
                          location=f"{where}.data_key_file")
    if file is not None:
        try:
            return parse_kek(Path(file).read_bytes(), str(file))
        except OSError as exc:
            raise ConfigError(f"cannot read the key-encryption key ({exc.strerror})",
                              location=str(file)) from None
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"environment variable {env} is not set",
                              location=f"{where}.data_key_env")
        return parse_kek(value.encode(), f"environment variable {env}")
    return None


class AESGCMSealer:
    """AES-256-GCM under data keys wrapped by a KEK (see the module docstring)."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError("key-encryption key must be 32 bytes")
        self._kek = kek
        self._kek_id = kek_fingerprint(kek)
        self._keys: dict[int, AESGCM] = {}
        self._active: int | None = None
        self._blind_key: bytes | None = None
        self._lock = threading.Lock()

    # --- keys ---------------------------------------------------------------------------

    def load(self, tx: Any, *, create: bool = True) -> None:
        """Read the data keys (creating the first one when ``create``) through ``tx``."""
        rows = tx.all("SELECT id, wrapped, kek FROM data_key ORDER BY id")
        if not rows and create:
            self.add_key(tx)
            rows = tx.all("SELECT id, wrapped, kek FROM data_key ORDER BY id")
        keys: dict[int, AESGCM] = {}
        first: bytes | None = None
        for key_id, wrapped, kek_id in rows:
            if kek_id != self._kek_id:
                raise StoreError(
                    f"data key {key_id} is wrapped under another key-encryption key"
                    f" ({kek_id}); this one is {self._kek_id}", location="data_key")
            try:
                raw = aes_key_unwrap(self._kek, bytes(wrapped))
            except InvalidUnwrap:
                raise StoreError(f"data key {key_id} does not unwrap under the key-encryption"
                                 " key", location="data_key") from None
            keys[int(key_id)] = AESGCM(raw)
            first = raw if first is None else first
        with self._lock:
            self._keys = keys
            self._active = max(keys) if keys else None
            if first is not None:
                # Lookup keys must stay the same across data key rotations: derived from
                # the first data key, which is never removed.
                self._blind_key = hmac.new(first, b"ws-fhir-bridge blind index",
                                           hashlib.sha256).digest()

    def add_key(self, tx: Any) -> int:
        """Store a new random data key (it seals from the next :meth:`load`)."""
        from datetime import UTC, datetime

        from bridge.ledger.audit import format_time

        row = tx.one("SELECT MAX(id) FROM data_key")
        key_id = int(row[0] or 0) + 1
        wrapped = aes_key_wrap(self._kek, secrets.token_bytes(32))
        tx.execute("INSERT INTO data_key (id, wrapped, kek, created) VALUES (?,?,?,?)",
                   (key_id, wrapped, self._kek_id, format_time(datetime.now(UTC))))
        return key_id

    @property
    def active_key(self) -> int | None:
        return self._active

    def blind(self, key: str) -> str:
        """A lookup key (a patient identifier) as stored: HMAC-SHA256 under a stored key."""
        if self._blind_key is None:
            raise StoreError("no data key loaded for lookup keys", location="data_key")
        return "bk:" + hmac.new(self._blind_key, key.encode(), hashlib.sha256).hexdigest()

    # --- values ---------------------------------------------------------------------------

    def seal(self, data: bytes, *, context: str) -> bytes:
        with self._lock:
            key_id, aead = self._active, self._keys.get(self._active or 0)
        if key_id is None or aead is None:
            raise StoreError("no data key loaded for sealing", location="data_key")
        nonce = secrets.token_bytes(12)
        return MAGIC + struct.pack(">I", key_id) + nonce + aead.encrypt(
            nonce, bytes(data), context.encode())

    def unseal(self, data: bytes, *, context: str) -> bytes:
        if not data.startswith(MAGIC):
            return bytes(data)  # written before encryption was turned on
        if len(data) < _HEAD + 16:
            raise StoreError("sealed value is truncated", location=context)
        (key_id,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
        with self._lock:
            aead = self._keys.get(key_id)
        if aead is None:
            raise UnknownDataKey(key_id)
        nonce = data[len(MAGIC) + 4:_HEAD]
        try:
            return aead.decrypt(nonce, data[_HEAD:], context.encode())
        except InvalidTag:
            raise StoreError("sealed value does not open (altered, or moved from another"
                             " column)", location=context) from None
