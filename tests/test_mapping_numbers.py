"""Amounts and measurements become JSON numbers: an integral value an int, any other the
double nearest to the exact decimal the text writes, whatever the text looks like."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.mapping.transforms import _number


def _exact(text: str) -> int | float:
    """The meaning of a decimal text: the exact value, as an int when integral, else
    rounded once to the nearest double."""
    value = Decimal(text)
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _same(text: str) -> None:
    got, want = _number(text), _exact(text)
    assert type(got) is type(want), text[:40]
    assert got == want, text[:40]


_DIGITS = st.text("0123456789", min_size=1, max_size=30)


@settings(max_examples=2000)
@given(_DIGITS, st.none() | st.text("0123456789", max_size=30))
def test_a_plain_decimal_is_its_exact_value(whole: str, frac: str | None) -> None:
    _same(whole if frac is None else f"{whole}.{frac}")


@pytest.mark.parametrize("text", [
    "0", "0.0", "00.00", "007", "-0", "-0.0", "1e5", "1E-7", "12.", ".5", " 12.50 ", "+1",
    "1_0", "\u0663", "\u0663.\u0665", "\uff11\uff12", "0.1", "2.675", "0.30000000000000004",
    "9007199254740993", "9007199254740993.0", "9007199254740993.5", "5e-324",
    "1." + "0" * 30 + "1", "9" * 20 + ".99", "1" * 400 + ".5",
    # Beyond any declared format: more digits than int() reads from a text.
    "1" * 5000, "1" * 5000 + ".000", "1" * 5000 + ".5",
])
def test_an_odd_decimal_text_is_its_exact_value(text: str) -> None:
    _same(text)
