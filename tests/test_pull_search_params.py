"""FHIR R4 search parameters for record pull, as a pure module: what is accepted, what
is refused (naming the parameter, never echoing the value), and the date semantics."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from bridge.records.search import (
    DateFilter,
    SearchError,
    UnsupportedParameter,
    date_range,
    decode_cursor,
    encode_cursor,
    parse_everything,
    parse_search,
    resource_date_range,
)

KEY = b"k" * 32


def search(rtype: str, *params: tuple[str, str]) -> object:
    return parse_search(rtype, list(params), default_count=50, max_count=200)


def test_the_module_is_pure() -> None:
    code = ("import sys, bridge.records.search; "
            "print(any(m in sys.modules for m in ('aiohttp', 'asyncio', 'ssl', 'sqlite3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_date_values_are_ranges_at_their_precision_in_china_time() -> None:
    lo, hi = date_range("2024-03-05", where="date")
    assert lo == datetime(2024, 3, 4, 16, tzinfo=UTC) and hi == datetime(2024, 3, 5, 16, tzinfo=UTC)
    lo, hi = date_range("2024", where="date")
    assert (hi - lo).days == 366
    lo, hi = date_range("2024-12", where="date")
    assert hi == datetime(2024, 12, 31, 16, tzinfo=UTC)
    lo, hi = date_range("2024-03-05T10:00:00Z", where="date")
    assert (hi - lo).total_seconds() == 1 and lo.hour == 10


@pytest.mark.parametrize(
    ("prefix", "target", "expected"),
    [
        # search value 2024-03-05 (a day); targets as (first day, last day) in March 2024
        ("eq", (5, 5), True), ("eq", (4, 5), False),
        ("ne", (4, 5), True), ("ne", (5, 5), False),
        ("gt", (6, 6), True), ("gt", (5, 5), False), ("gt", (4, 6), True),
        ("lt", (4, 4), True), ("lt", (5, 5), False),
        ("ge", (5, 5), True), ("ge", (6, 9), True), ("ge", (1, 4), False),
        ("le", (5, 5), True), ("le", (1, 4), True), ("le", (6, 9), False),
        ("sa", (6, 7), True), ("sa", (5, 7), False),
        ("eb", (1, 4), True), ("eb", (1, 5), False),
    ],
)
def test_date_prefixes_follow_r4(prefix: str, target: tuple[int, int], expected: bool) -> None:
    (flt,) = search("Encounter", ("patient", "p1"), ("date", f"{prefix}2024-03-05")).dates  # type: ignore[attr-defined]
    assert isinstance(flt, DateFilter)
    start = date_range(f"2024-03-{target[0]:02d}", where="-")[0]
    end = date_range(f"2024-03-{target[1]:02d}", where="-")[1]
    rng = (start.isoformat(timespec="microseconds"), end.isoformat(timespec="microseconds"))
    assert flt.matches(rng) is expected


def test_resource_dates_come_from_the_element_behind_the_parameter() -> None:
    enc = {"resourceType": "Encounter", "period": {"start": "2024-03-05T10:00:00+08:00"}}
    lo, hi = resource_date_range(enc)  # type: ignore[misc]
    assert lo.startswith("2024-03-05T02:00:00") and hi.startswith("9999")
    obs = {"resourceType": "Observation", "effectiveDateTime": "2024-03-05"}
    assert resource_date_range(obs) is not None
    assert resource_date_range({"resourceType": "Observation"}) is None


@pytest.mark.parametrize(
    ("rtype", "params", "where", "kind"),
    [
        # A name that is no search parameter's is named by its position: it may be a value.
        ("Encounter", [("patient", "p1"), ("foo", "1")], "query[1]", UnsupportedParameter),
        ("Encounter", [("patient", "p1"), ("date", "ge2024-13-01")], "date", SearchError),
        ("Encounter", [("patient", "p1"), ("date", "2024-02-30")], "date", SearchError),
        ("Encounter", [("patient", "p1"), ("date", "ap2024")], "date", UnsupportedParameter),
        ("Encounter", [("patient", "p1"), ("date", "xx2024")], "date", SearchError),
        ("Encounter", [("patient", "p1"), ("_count", "201")], "_count", SearchError),
        ("Encounter", [("patient", "p1"), ("_count", "0")], "_count", SearchError),
        ("Encounter", [("patient", "p1"), ("_count", "ten")], "_count", SearchError),
        ("Encounter", [("patient", "p1"), ("patient", "p2")], "patient", SearchError),
        ("Encounter", [("patient", "Group/g1")], "patient", SearchError),
        ("Encounter", [("date", "ge2024")], "patient", SearchError),
        ("Encounter", [("patient", "p1"), ("date:missing", "true")], "date",
         UnsupportedParameter),
        ("Encounter", [("patient.identifier", "a|b")], "patient",
         UnsupportedParameter),
        ("Encounter", [("patient", "p1"), ("_revinclude", "Condition:encounter")],
         "_revinclude", UnsupportedParameter),
        ("Condition", [("patient", "p1"), ("_include", "Condition:subject")], "_include",
         UnsupportedParameter),
        ("Encounter", [("patient", "p1"), ("_include", "Condition:encounter")], "_include",
         UnsupportedParameter),
        ("Condition", [("patient", "p1"), ("date", "2024")], "date", UnsupportedParameter),
        ("Patient", [("identifier", "12345")], "identifier", SearchError),
        ("Patient", [("identifier", "a|b,c|d")], "identifier", SearchError),
        ("Patient", [("name", "Zhang")], "name", UnsupportedParameter),
        ("Patient", [("_count", "5")], "identifier", SearchError),
        ("Encounter", [("patient", "p1"), ("_format", "xml")], "_format", SearchError),
        ("Encounter", [("patient", "p1"), ("_summary", "true")], "_summary",
         UnsupportedParameter),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter_not_the_value(
    rtype: str, params: list[tuple[str, str]], where: str, kind: type[SearchError]
) -> None:
    with pytest.raises(kind) as info:
        search(rtype, *params)
    assert info.value.location == where
    assert info.value.http_status == 400
    for _, value in params:
        if len(value) > 4:  # values long enough to be data, not a word of the message
            assert value not in info.value.message


def test_everything_parameters() -> None:
    q = parse_everything("p1", [("_since", "2024-03-05T00:00:00Z"), ("_type", "Encounter,Condition"),
                                ("_count", "10")],
                         default_count=50, max_count=200, types=["Patient", "Encounter"])
    assert q.types == frozenset({"Encounter"}) and q.count == 10 and q.last_updated
    for params, where in [
        ([("_since", "2024-03-05")], "_since"),
        ([("_type", "Claim")], "_type"),
        ([("start", "2024")], "start"),
    ]:
        with pytest.raises(SearchError) as info:
            parse_everything("p1", params, default_count=50, max_count=200, types=["Patient"])
        assert info.value.location == where


def test_cursors_are_bound_to_their_query_and_authenticated() -> None:
    q = search("Encounter", ("patient", "p1"), ("date", "ge2024"))
    token = encode_cursor(KEY, q, snapshot=7, after=3)  # type: ignore[arg-type]
    resumed = search("Encounter", ("patient", "p1"), ("date", "ge2024"), ("_cursor", token))
    assert decode_cursor(KEY, resumed) == (7, 3)  # type: ignore[arg-type]
    other = search("Encounter", ("patient", "p2"), ("date", "ge2024"), ("_cursor", token))
    with pytest.raises(SearchError, match="another query"):
        decode_cursor(KEY, other)  # type: ignore[arg-type]
    with pytest.raises(SearchError, match="not issued"):
        decode_cursor(b"x" * 32, resumed)  # type: ignore[arg-type]
    tampered = search("Encounter", ("patient", "p1"), ("date", "ge2024"),
                      ("_cursor", token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]))
    with pytest.raises(SearchError) as info:
        decode_cursor(KEY, tampered)  # type: ignore[arg-type]
    assert info.value.location == "_cursor"
