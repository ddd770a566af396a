"""The validation cache accepts exactly what full validation accepts.

Valid resources, collections and message bundles mapped from sample records of several
WS 445 datasets are mutated at random: a primitive replaced by an odd value of the same
Python class (the case a structure cache must catch: the shape is unchanged) or of another
kind, an element dropped, an unknown, choice, primitive-extension or resource-type key
added, list items duplicated, shared or nulled, containers emptied. Each mutant is
validated fully and through a warm cache: both must agree, and a refusal must be the same
error with the same location. Then a variant of the mutant with the same shape but other
primitive values is checked the same way, after the cache may have learnt the mutant's
shape. CI runs a fixed number of examples with a fixed seed (tests/conftest.py); set
``VALIDATION_CACHE_EXAMPLES`` to explore more locally.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import ValidationError
from bridge.mapping import map_record
from bridge.messages import wrap_message
from bridge.records import fhir
from bridge.records.fhir import ValidationCache, validate_resource
from bridge.samples import inpatient_records
from bridge.samples_documents import discharge_records, referral_records, summary_records
from bridge.samples_outpatient import lab_records, outpatient_records, prescription_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)
EXAMPLES = int(os.environ.get("VALIDATION_CACHE_EXAMPLES", "250"))

_COLLECTIONS = [map_record(r, now=NOW)
                for records in (inpatient_records(8, seed=8), outpatient_records(3, seed=8),
                                prescription_records(3, seed=8), lab_records(3, seed=8),
                                summary_records(2, seed=8), discharge_records(2, seed=8),
                                referral_records(2, seed=8))
                for r in records]
_MESSAGES = [wrap_message(c, message_id=f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                          event="claim-submit", sender="hospital-a", receiver="insurer-b",
                          source_endpoint="https://hospital-a.example/fhir",
                          destination_endpoint="https://insurer-b.example/fhir", now=NOW)
             for n, c in enumerate(_COLLECTIONS[:4])]
_RESOURCES = [e["resource"] for c in _COLLECTIONS for e in c["entry"]]
# Mostly single resources, as the engine and the receiver validate them; some whole bundles.
_ORIGINALS = _RESOURCES + _COLLECTIONS[:6] + _MESSAGES
_CACHE = ValidationCache()
for _r in _ORIGINALS:
    _CACHE.validate(_r)
# The receiver's way: documents as the JSON parser returns them, dicts known by text.
_PARSED = ValidationCache()
for _r in _ORIGINALS:
    _PARSED.validate(orjson.loads(orjson.dumps(_r)), parsed=True)


def _as_parsed(resource: dict[str, Any]) -> dict[str, Any] | None:
    """``resource`` as a JSON parser would return it after the wire; None if it has
    something JSON cannot carry."""
    try:
        return orjson.loads(orjson.dumps(resource))  # type: ignore[no-any-return]
    except (TypeError, orjson.JSONDecodeError):
        return None

_ODD_STRINGS = st.sampled_from([
    "", " ", "  x", "x ", "a  b", "\t", "\n", "\x01", "x" * 64, "x" * 65, "x" * 300,
    "1949-02-30", "2026-13-01", "2026-00", "2026", "2026-02", "2024-02-29", "2026-02-29",
    "2026-03-01", "2026-03-01T08:00:00", "2026-03-01T08:00:00+08:00", "2026-03-01T08:00:00Z",
    "2026-03-01T24:00:00+08:00", "2026-12-31T23:59:60+08:00", "2026-03-01T08:00:00+15:00",
    "2026-03-01T08:00:00.123+08:00", "20260301T083000", "08:30:00", "urn:oid:1.2",
    "urn:oid:1.02", "urn:uuid:5e0e8b6e-2c6a-5b0e-9d0a-000000000000", "http://x y",
    "/Patient/1", "a b", "1.5", "-0", "01", "+1", "1e5", "inf", "NaN", "true", "null", "{}",
    '{"text": "x"}', '{"reference": "x"}', "male", "bogus", "CNY", "Patient", "active",
    "finished", "claim", "collection", "张三", "Coding", "Reference", "CodeableConcept",
    "Identifier", "Money", "Period"])
_ODD_FLOATS = st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e400,
                               1e308, 1.5, 1e-7, 1e20, 2.0, -3.25, 12.345678901234567])
_ODD_INTS = st.sampled_from([0, -1, 1, 2, 7, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63,
                             10**30, -(10**40)])
_ODD_CONTAINERS = st.sampled_from([
    {}, [], [{}], [None], [[]], {"text": "x"}, [{"text": "x"}], {"system": "urn:x", "code": "c"},
    {"value": 1, "currency": "CNY"}, {"extension": []}, {"id": "a"}, {"fhir_comments": "c"},
    {"extension": [{"url": "http://x", "valueString": "y"}]}, [{"reference": "x"}, None],
    {"resourceType": "Patient"}, {"resourceType": "Bogus"}, {"resource_type": "Coding"},
    {"reference": "x", "resourceType": "Reference"}, {"resourceType": "Patient", "gender": "M"},
    {"resourceType": "Coding", "system": "urn:x", "code": "c"}, {"text": "x", "resource_type": "x"},
    [{"resourceType": "Organization", "name": "x"}],
    # Fresh containers for every example (the deepcopy below): a shared object mutated by a
    # later step would make generation depend on earlier examples.
]).map(copy.deepcopy)
_SAME_CLASS: dict[type, st.SearchStrategy[Any]] = {
    str: _ODD_STRINGS, float: _ODD_FLOATS, int: _ODD_INTS, bool: st.booleans()}
_ODD_LEAVES = st.one_of(_ODD_STRINGS, _ODD_FLOATS, _ODD_INTS, st.booleans(), st.none(),
                        _ODD_CONTAINERS)
_EXTRA_KEYS = st.sampled_from([
    "foo", "valueString", "valueQuantity", "performedPeriod", "onsetDateTime", "effectivePeriod",
    "diagnosisCodeableConcept", "text", "id", "meta", "extension", "modifierExtension",
    "contained", "class_fhir", "fhir_comments", "resourceType", "resource_type", "_status",
    "_birthDate", "_gender", "_created", "_id"])
_EXTENSIONS = st.sampled_from([
    {"extension": [{"url": "http://x", "valueString": "y"}]}, {"extension": []}, {"id": "a"}, {},
]).map(copy.deepcopy)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node[step]
    return node


def _mutate(draw: st.DrawFn, resource: dict[str, Any]) -> None:
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(resource)
        if not paths:  # everything was dropped already
            return
        path = draw(st.sampled_from(paths))
        parent, last = _at(resource, path[:-1]), path[-1]
        current = parent[last]
        action = draw(st.sampled_from(["same-class", "same-class", "replace", "drop", "extra",
                                       "choice", "null-item", "extra-item", "shared-item",
                                       "empty", "extension"]))
        if action == "same-class" and type(current) in _SAME_CLASS:
            parent[last] = draw(_SAME_CLASS[type(current)])
        elif action in ("replace", "same-class"):
            parent[last] = draw(_ODD_LEAVES)
        elif action == "drop":
            del parent[last]
        elif action == "extra" and isinstance(parent, dict):
            parent[draw(_EXTRA_KEYS)] = draw(_ODD_LEAVES)
        elif action == "choice" and isinstance(parent, dict):
            parent["performedString"] = "x"
            parent["diagnosisCodeableConcept"] = {"text": "x"}
        elif action == "null-item" and isinstance(parent, list):
            parent.append(None)
        elif action == "extra-item" and isinstance(parent, list):
            parent.append(copy.deepcopy(draw(st.sampled_from(parent))))
        elif action == "shared-item" and isinstance(parent, list):
            parent.append(draw(st.sampled_from(parent)))  # one object in two places
        elif action == "empty" and isinstance(current, (dict, list)):
            current.clear()
        elif action == "extension" and isinstance(last, str) and not last.startswith("_"):
            parent["_" + last] = draw(_EXTENSIONS)
            if draw(st.booleans()):
                del parent[last]


def _same_shape(draw: st.DrawFn, resource: dict[str, Any]) -> None:
    """Replace some primitives by odd values of the same class: the shape is unchanged."""
    leaves = [p for p in _paths(resource) if type(_at(resource, p)) in _SAME_CLASS]
    for path in draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=3)) if leaves else []:
        parent = _at(resource, path[:-1])
        parent[path[-1]] = draw(_SAME_CLASS[type(parent[path[-1]])])


@st.composite
def _mutants(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    resource = copy.deepcopy(draw(st.sampled_from(_ORIGINALS)))
    _mutate(draw, resource)
    twin = copy.deepcopy(resource)
    _same_shape(draw, twin)
    return resource, twin


def _outcome(fn: Callable[..., None], resource: dict[str, Any]) -> tuple[str, ...] | None:
    try:
        fn(copy.deepcopy(resource), path="R")
    except ValidationError as exc:
        return ("refused", exc.location or "?", str(exc))
    except Exception as exc:  # noqa: BLE001 - the models raise bare errors on some inputs
        return ("raised", type(exc).__name__)
    return None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutants())
def test_cached_and_full_validation_agree(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    mutant, twin = pair
    assert _outcome(_CACHE.validate, mutant) == _outcome(validate_resource, mutant)
    # The cache may have learnt the mutant's shape just now; the twin has that shape.
    assert _outcome(_CACHE.validate, twin) == _outcome(validate_resource, twin)
    # Parsed JSON, with the dicts met before known by their text: the same verdicts.
    by_text = functools.partial(_PARSED.validate, parsed=True)
    for value in (mutant, twin):
        received = _as_parsed(value)
        if received is not None:
            assert _outcome(by_text, received) == _outcome(validate_resource, received)


def test_infinite_amount_is_refused_after_a_valid_one() -> None:
    """The former shape cache accepted this: same structure and leaf class as 1.5."""
    good = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "x"},
            "payor": [{"reference": "y"}],
            "costToBeneficiary": [{"valueMoney": {"value": 1.5, "currency": "CNY"}}]}
    cache = ValidationCache()
    cache.validate(good)
    bad = copy.deepcopy(good)
    bad["costToBeneficiary"][0]["valueMoney"]["value"] = float("inf")
    with pytest.raises(ValidationError) as caught:
        cache.validate(bad)
    assert caught.value.location == "Coverage.costToBeneficiary[0].valueMoney.value"


def test_recurring_content_is_not_validated_again() -> None:
    cache = ValidationCache()
    bundles = [map_record(r, now=NOW) for r in inpatient_records(20, seed=31)]
    for b in bundles:
        for e in b["entry"]:
            cache.validate(e["resource"])
    size = len(cache)
    for b in bundles:
        for e in b["entry"]:
            cache.validate(e["resource"])
    assert len(cache) == size


def _break_birth_date(m: dict[str, Any]) -> int:
    m["entry"][2]["resource"]["birthDate"] = "1990-13-45"
    return 2


def _break_two_entries(m: dict[str, Any]) -> int:
    m["entry"][5]["resource"]["status"] = 7
    m["entry"][3]["resource"]["period"]["start"] = "2026-02-30"
    return 3


def _identifier_not_a_list(m: dict[str, Any]) -> int:
    m["entry"][1]["resource"]["identifier"] = {}
    return 1


def _total_is_a_list(m: dict[str, Any]) -> int:
    m["entry"][5]["resource"]["total"] = [{"value": 1.5, "currency": "CNY"}]
    return 5


def _required_element_dropped(m: dict[str, Any]) -> int:
    del m["entry"][3]["resource"]["status"]
    return 3


@pytest.mark.parametrize("breaks", [_break_birth_date, _break_two_entries,
                                    _identifier_not_a_list, _total_is_a_list,
                                    _required_element_dropped])
def test_refusal_in_a_known_message_names_the_entry_as_full_validation_does(
        breaks: Callable[[dict[str, Any]], int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A message of known shape with faulty entries is refused without validating the
    whole message again: the refusal is still full validation's first error, and it names
    the first faulty entry and its element."""
    message = copy.deepcopy(_MESSAGES[1])
    index = breaks(message)
    full = _outcome(validate_resource, message)

    def whole_message_validated(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the refusal validated the whole message again")

    monkeypatch.setattr(fhir, "validate_resource", whole_message_validated)
    refused = _outcome(_CACHE.validate, message)
    assert refused is not None and refused[0] == "refused"
    assert refused[1].startswith(f"R.entry[{index}].resource.")
    assert refused == full


@pytest.mark.parametrize("breaks", [_break_birth_date, _break_two_entries,
                                    _identifier_not_a_list, _total_is_a_list,
                                    _required_element_dropped])
def test_a_received_message_refused_among_known_parts_names_what_full_validation_names(
        breaks: Callable[[dict[str, Any]], int]) -> None:
    """Parts met before are known by their text; a faulty part among them is still
    refused with full validation's first error, and the good message stays accepted."""
    cache = ValidationCache()
    good = orjson.loads(orjson.dumps(_MESSAGES[1]))
    for _ in range(2):
        cache.validate(copy.deepcopy(good), path="R", parsed=True)
    message = copy.deepcopy(good)
    breaks(message)
    received = orjson.loads(orjson.dumps(message))
    full = _outcome(validate_resource, received)
    assert full is not None
    assert _outcome(functools.partial(cache.validate, parsed=True), received) == full
    cache.validate(copy.deepcopy(good), path="R", parsed=True)


def _received_patient_message(number: int, names: int) -> dict[str, Any]:
    bundle = {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:m-{number}"},
        "type": "message",
        "timestamp": "2026-03-01T08:30:00+08:00",
        "entry": [{"fullUrl": f"urn:uuid:p-{number}", "resource": {
            "resourceType": "Patient", "id": f"p{number}",
            "name": [{"text": f"name {number} {k} " + "x" * 40, "given": ["a" * 30]}
                     for k in range(names)]}}],
    }
    return orjson.loads(orjson.dumps(bundle))  # as the receiver's parser returns it


def test_memory_held_for_received_messages_is_bounded() -> None:
    """A partner that sends each message twice and then many large distinct ones does not
    make the receiver's validation cache hold their text without limit."""
    import gc
    import tracemalloc

    from bridge.link.server import validate_message

    cache = ValidationCache()
    tracemalloc.start()
    try:
        for number in range(130):  # every message sent twice, as retries do
            for _ in range(2):
                validate_message(_received_patient_message(number, 5), cache=cache, parsed=True)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        received = 0
        for number in range(1000, 1040):
            message = _received_patient_message(number, 8000)
            received += len(orjson.dumps(message))
            validate_message(message, cache=cache, parsed=True)
            del message
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert received > 30_000_000
    assert held < 64 * 1024 * 1024


def _claim() -> dict[str, Any]:
    return copy.deepcopy(next(r for r in _RESOURCES if r["resourceType"] == "Claim"))


def _put(resource: dict[str, Any], where: str, value: Any) -> None:
    if where == "sequence":
        resource["item"][0]["sequence"] = value
    elif where == "insurance":
        resource["insurance"][0]["sequence"] = value
    elif where == "net":
        resource["item"][0]["net"]["value"] = value
    elif where == "identifier":
        resource["identifier"][0]["value"] = value
    else:
        resource["total"]["value"] = value


# A value that passed one field's validator, then the same value (or one equal to it in
# Python: True == 1 == 1.0) in the same or another field, where full validation may refuse.
_REMEMBERED = [(seen, again, value, other)
               for seen, again in [("sequence", "sequence"), ("net", "sequence"),
                                   ("total", "insurance"), ("sequence", "identifier"),
                                   ("net", "identifier"), ("sequence", "net")]
               for value, other in [(1, True), (1, 1.0), (0, 0), (0, False), (-1, -1),
                                    (2**31 - 1, 2**31 - 1), (2**31, 2**31), (1, "1"),
                                    (2**53, 2**53), (2, 2.0), (5, 5.5)]]


@pytest.mark.parametrize(("seen", "again", "value", "other"), _REMEMBERED)
@pytest.mark.parametrize("parsed", [False, True])
def test_a_remembered_int_is_not_accepted_where_full_validation_refuses(
        seen: str, again: str, value: Any, other: Any, parsed: bool) -> None:
    cache = ValidationCache()
    check = functools.partial(cache.validate, parsed=True) if parsed else cache.validate
    for where, v in ((seen, value), (again, value), (again, other), (seen, other)):
        resource = _claim()
        check(_claim())
        _put(resource, where, v)
        if parsed:
            received = _as_parsed(resource)
            assert received is not None
            resource = received
        assert _outcome(check, resource) == _outcome(validate_resource, resource), (where, v)
