"""The keyed stand-ins of de-identification: the MAC is HMAC-SHA256 for keys of every
length (a key longer than SHA-256's block is hashed first) and any text, and the
pseudonymous ids, written without ``uuid.UUID`` (which costs more than the work it
wraps, once per resource), are exactly what ``uuid.UUID`` gives."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import uuid
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from bridge.policy.transforms import TRANSFORMS, DeidContext

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


def shifted_by_arithmetic(text: str, days: int) -> str | None:
    """What a date shift of a dateTime is: the day of the instant, as written, moved by
    whole days, its time of day dropped (to the second, an admission and a discharge time
    would pick out the stay in the original records), or nothing when it is not a valid
    dateTime or leaves the calendar."""
    try:
        return (datetime.fromisoformat(text) + timedelta(days=days)).date().isoformat()
    except (ValueError, OverflowError):
        return None


def test_a_shifted_date_time_is_the_day_moved_by_whole_days_without_its_time() -> None:
    # Every written form, valid or not, against the arithmetic: seconds or none,
    # fractions, Z, offsets (-00:00 is written +00:00 by isoformat), hours and minutes
    # out of range, a day that does not exist, shifts past the ends of the calendar.
    forms = itertools.product(
        ["2024-02-29", "2025-12-31", "0001-01-05", "9999-12-20", "2023-02-30", "2025-05-20"],
        ["00", "09", "23", "24"], ["00", "59", "60"], ["", ":00", ":07", ":59", ":60"],
        ["", ".5", ".123456"],
        ["", "Z", "+08:00", "-05:30", "+00:00", "-00:00", "+23:59", "+24:00", "+0800"],
    )
    contexts = [DeidContext(bytes(range(k, k + 32)), "person") for k in range(3)]
    assert len({ctx.shift_days > 0 for ctx in contexts}) == 2  # both directions
    for day, hour, minute, second, fraction, zone in forms:
        text = f"{day}T{hour}:{minute}{second}{fraction}{zone}"
        for ctx in contexts:
            expected = shifted_by_arithmetic(text, ctx.shift_days)
            assert TRANSFORMS["date_shift"].fn(text, ctx) == expected, text
