"""The keyed stand-ins of de-identification: the MAC is HMAC-SHA256 for keys of every
length (a key longer than SHA-256's block is hashed first) and any text, and the
pseudonymous ids, written without ``uuid.UUID`` (which costs more than the work it
wraps, once per resource), are exactly what ``uuid.UUID`` gives."""

from __future__ import annotations

import hashlib
import hmac
import uuid

from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.transforms import DeidContext

keys = st.binary(min_size=16, max_size=130)
texts = st.text(max_size=40)


def reference_mac(key: bytes, purpose: str, text: str) -> bytes:
    return hmac.new(key, f"{purpose}\x00{text}".encode(), hashlib.sha256).digest()


@given(keys, st.sampled_from(["pseudonym", "id", "date-shift"]), texts)
def test_the_keyed_mac_is_hmac_sha256(key: bytes, purpose: str, text: str) -> None:
    assert DeidContext(key, "p")._mac(purpose, text) == reference_mac(key, purpose, text)


@given(keys, texts)
def test_pseudonymous_ids_are_the_uuid_of_the_mac(key: bytes, text: str) -> None:
    expected = str(uuid.UUID(bytes=reference_mac(key, "id", text)[:16], version=4))
    assert DeidContext(key, "p").pseudonym_uuid(text) == expected


@given(keys, texts)
def test_pseudonyms_and_date_shifts_are_keyed_by_the_mac(key: bytes, text: str) -> None:
    ctx = DeidContext(key, text)
    assert ctx.pseudonym(text) == reference_mac(key, "pseudonym", text)[:16].hex()
    raw = int.from_bytes(reference_mac(key, "date-shift", text)[:8], "big")
    days = raw % 365 + 1
    assert ctx.shift_days == (days if (raw >> 32) & 1 else -days)


def test_one_key_gives_the_same_stand_ins_after_other_keys() -> None:
    # The keyed hash objects are kept per key and copied for each MAC; a MAC must never
    # change what the next one starts from.
    a, b = bytes(range(32)), bytes(range(1, 33))
    first = DeidContext(a, "p").pseudonym_uuid("x")
    DeidContext(b, "p").pseudonym_uuid("x")
    DeidContext(a, "p").pseudonym_uuid("y")
    assert DeidContext(a, "p").pseudonym_uuid("x") == first
    assert first == str(uuid.UUID(bytes=reference_mac(a, "id", "x")[:16], version=4))
