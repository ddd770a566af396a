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
            | st.text(max_size=6) | st.sampled_from(['":', '\\"', "a\":1,\"a", "{}", "[]"]))


def _object_text(draw: Any, depth: int) -> str:
    """JSON text of an object that may repeat a member name (drawn as pairs)."""
    pairs = draw(st.lists(st.tuples(_NAMES, st.integers(0, 3)), max_size=4))
    members = []
    for name, kind in pairs:
        if kind == 0 and depth < 3:
            value = _object_text(draw, depth + 1)
        elif kind == 1 and depth < 3:
            value = "[" + ",".join(_object_text(draw, depth + 1)
                                   for _ in range(draw(st.integers(0, 2)))) + "]"
        else:
            value = json.dumps(draw(_SCALARS), ensure_ascii=draw(st.booleans()))
        space = draw(st.sampled_from(["", " ", "\n "]))
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


def test_the_refusal_names_the_member() -> None:
    with pytest.raises(ParseError) as err:
        read_json(b'{"entry": [{"resource": {"id": "x", "id": "secret-value"}}]}')
    assert err.value.location == "body#id" and "secret" not in str(err.value)
