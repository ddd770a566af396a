"""Request bodies are read as I-JSON: a member name twice in one object is refused with
the name (never a value), whatever the document looks like around it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import ParseError
from bridge.messages import read_json

_NAMES = st.sampled_from(["a", "b", "resourceType", "\u5f20", 'q"x', "b\\", "e:", "", " "])
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=6) | st.sampled_from(['":', '\\"', "a\":1,\"a", "{}", "[]", ":", ":x"]))


def _object_text(draw: Any, depth: int, compact: bool = False) -> str:
    """JSON text of an object that may repeat a member name (drawn as pairs); ``compact``:
    no blanks between tokens, as a partner's serialiser writes it."""
    pairs = draw(st.lists(st.tuples(_NAMES, st.integers(0, 3)), max_size=4))
    members = []
    for name, kind in pairs:
        if kind == 0 and depth < 3:
            value = _object_text(draw, depth + 1, compact)
        elif kind == 1 and depth < 3:
            value = "[" + ",".join(_object_text(draw, depth + 1, compact)
                                   for _ in range(draw(st.integers(0, 2)))) + "]"
        else:
            value = json.dumps(draw(_SCALARS), ensure_ascii=draw(st.booleans()))
        space = "" if compact else draw(st.sampled_from(["", " ", "\n "]))
        members.append(f"{json.dumps(name, ensure_ascii=False)}{space}:{space}{value}")
    return "{" + ",".join(members) + "}"


def _has_duplicate(text: str) -> bool:
    found = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        names = [k for k, _ in pairs]
        found = found or len(set(names)) != len(names)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return found


@settings(max_examples=500)
@given(st.data())
def test_a_repeated_member_name_is_refused_and_nothing_else_is(data: st.DataObject) -> None:
    text = _object_text(data.draw, 0)
    body = text.encode("utf-8")
    if _has_duplicate(text):
        with pytest.raises(ParseError) as err:
            read_json(body)
        assert err.value.message == "a member name appears twice in one object"
        assert (err.value.location or "").startswith("body#")
    else:
        assert read_json(body) == json.loads(text)


@settings(max_examples=500)
@given(st.data())
def test_a_compact_body_with_a_repeated_member_name_is_refused(data: st.DataObject) -> None:
    """A compact body may be byte for byte what the parser's document writes back, once
    a repeated name has been dropped from it or not: only the latter is accepted."""
    text = _object_text(data.draw, 0, compact=True)
    body = text.encode("utf-8")
    if _has_duplicate(text):
        with pytest.raises(ParseError) as err:
            read_json(body)
        assert err.value.message == "a member name appears twice in one object"
    else:
        assert read_json(body) == json.loads(text)


def test_the_refusal_names_the_member() -> None:
    with pytest.raises(ParseError) as err:
        read_json(b'{"entry": [{"resource": {"id": "x", "id": "secret-value"}}]}')
    assert err.value.location == "body#id" and "secret" not in str(err.value)


_PLAIN = (st.none() | st.booleans() | st.integers(-(2**60), 2**60)
          | st.sampled_from([2**53 - 1, 2**53, -(2**53), 10**15, -(10**16), 1.5, 6600.0, 1e300])
          | st.text(max_size=6)
          | st.sampled_from(['":', '\\"', "{[", "]}", "}}}", "1234567890123456789", "null", ":", ":a"]))
_VALUES = st.recursive(
    _PLAIN,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=30,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth - 1):
        value = [value] if level % 2 else {"a": value, "b": "[{"}
    return value


@settings(max_examples=300)
@given(_VALUES)
def test_member_count_and_limits_read_from_bytes_match_the_walk(value: Any) -> None:
    """Member names, nesting and integer limits read from orjson's bytes are what walking
    the parsed document finds, whatever the strings hold."""
    from bridge.messages import _shape_keys, _walk_shape_keys

    assert _shape_keys(value) == _walk_shape_keys(value)


@pytest.mark.parametrize("depth", [1, 2, 63, 64, 65, 80])
@pytest.mark.parametrize("leaf", [{}, [], "x", 2**53, "}]"])
def test_nesting_limit_read_from_bytes_matches_the_walk(depth: int, leaf: Any) -> None:
    from bridge.messages import _shape_keys, _walk_shape_keys

    value = _nested(depth, leaf)
    assert _shape_keys(value) == _walk_shape_keys(value)


@pytest.mark.parametrize("body", [
    b'{"a":1,"a":2,"b":":x","c":"\\u0041"}',
    b'{"a":1,"\\u0061":2,"b":":"}',
    b'{"k":[":",":"],"a":{"x":1,"x":2},"e":"\\n"}',
])
def test_a_repeated_name_is_refused_when_values_begin_with_a_colon(body: bytes) -> None:
    """A string value that begins with ":" is not a member name: it cannot make up for
    a name the parser dropped as repeated."""
    with pytest.raises(ParseError) as err:
        read_json(body)
    assert err.value.message == "a member name appears twice in one object"


def _refused_or_read_as_json(body: bytes, refused: bool) -> None:
    """Refused with the bound named, or read exactly as the standard library reads it."""
    if refused:
        with pytest.raises(ParseError) as err:
            read_json(body)
        assert err.value.message == "integer beyond ±(2^53 - 1)"
    else:
        assert read_json(body) == json.loads(body)


@pytest.mark.parametrize(("body", "refused"), [
    (b'{"a":9007199254740991}', False), (b'{"a":-9007199254740991}', False),
    (b'{"a":9007199254740992}', True), (b'{"a":-9007199254740992}', True),
    (b'{"a":[1,10000000000000000]}', True), (b'[0,-1234567890123456789]', True),
    (b'{"a":"9007199254740992"}', False), (b'{"9007199254740992":1}', False),
    (b'{"a":"x","b":9007199254740993}', True), (b'{"a":1.0e16}', False),
    (b'{"a":"1234567890","b":123456}', False), (b'[1234567890123456]', False),
])
def test_an_integer_beyond_the_bound_is_refused_in_a_compact_body(body: bytes,
                                                                   refused: bool) -> None:
    """Compact bodies, digits inside and outside strings, either side of ±(2^53 - 1)."""
    _refused_or_read_as_json(body, refused)


@pytest.mark.parametrize(("body", "refused"), [
    # Beyond 64 bits the JSON parser reads an integer as a double: it is still an integer.
    (b"[18446744073709551616]", True), (b"[-9223372036854775809]", True),
    (b'{"a":100000000000000000000000}', True), (b'{"a" : [1, 2, 99999999999999999999999]}', True),
    (b'{"a\\u0041":{"b":-100000000000000000000}}', True),
    # Doubles written as such stay doubles, however large; text in strings is text.
    (b'{"a":1e23}', False), (b'{"a":1.8446744073709552e+19}', False),
    (b'{"a":100000000000000000000000.0}', False), (b'{"a":"1e+19","b":"7E400"}', False),
    (b'{"a\\u0041":-1E+30}', False),
])
def test_an_integer_beyond_64_bits_is_still_an_integer(body: bytes, refused: bool) -> None:
    _refused_or_read_as_json(body, refused)
