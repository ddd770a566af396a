"""Mapping room: DE records (WS 445 data sets) to FHIR R4, driven by files in ``mappings/``.

Public API:

- :func:`read_record` parses and shape-checks a DE record from JSON (:func:`read_records`
  one or an array of them).
- :func:`map_record` turns a DE record into a FHIR R4 ``collection`` Bundle.
- :func:`patient_identifiers` lists the Patient's identifiers in such a Bundle.
- :func:`unused_elements` lists what a record carried that the mapping holds back, and why.
- :func:`unmap_bundle` reads such a Bundle back into a DE record (same mapping files).
- :func:`mapping_for` / :func:`load_mapping` give the loaded mapping (coverage, header).

Errors never carry the values of the record, only where the problem is.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

from bridge.errors import LoadError, MappingError, ParseError
from bridge.mapping.engine import map_with
from bridge.mapping.spec import MappingSpec, load_mapping
from bridge.mapping.valuesets import valuesets_for
from bridge.resources import SHIPPED, MappingFiles, mappings_dir

__all__ = [
    "MappingSpec",
    "load_mapping",
    "map_record",
    "mapping_for",
    "patient_identifiers",
    "read_record",
    "read_records",
    "shipped_mappings",
    "unmap_bundle",
    "unused_elements",
]

_TOP_KEYS = frozenset({"dataset", "elements", "groups"})


@lru_cache(maxsize=8)
def _shipped(files: MappingFiles = SHIPPED) -> dict[str, MappingSpec]:
    valuesets = valuesets_for(files)
    specs: dict[str, MappingSpec] = {}
    for path in sorted((mappings_dir() / "ws445").glob("*.yaml")):
        spec = load_mapping(path, valuesets)
        if spec.dataset in specs:
            raise LoadError("two mapping files for one data set", location=str(path))
        specs[spec.dataset] = spec
    return specs


def shipped_mappings(files: MappingFiles = SHIPPED) -> dict[str, MappingSpec]:
    """Every WS 445 mapping, keyed by data set code (value sets as a site overlays them)."""
    return dict(_shipped(files))


def mapping_for(dataset: str, files: MappingFiles = SHIPPED) -> MappingSpec:
    """The mapping for a data set code (``WS445.10``)."""
    spec = _shipped(files).get(dataset)
    if spec is None:
        raise MappingError("no mapping for this data set", location="$.dataset")
    return spec


def read_record(data: bytes | str, *, source: str = "<input>") -> dict[str, Any]:
    """Parse a DE record from JSON and check its shape.

    Malformed JSON raises :class:`ParseError` naming ``source:line:column``; a wrong
    shape raises it naming the JSON path (``$.groups.diagnoses[2]``). A member named
    twice in one object (a data element given two values), nesting no record has, and a
    lone surrogate in a string are refused too, as I-JSON (RFC 7493) refuses them. Element
    values are checked later, by :func:`map_record`, against the data set's declared
    formats.
    """
    record = _parse(data, source)
    check_shape(record, source=source)
    return record  # type: ignore[no-any-return]


def read_records(data: bytes | str, *, source: str = "<input>") -> list[dict[str, Any]]:
    """A file of DE records: one record, or a JSON array of them (each read as
    :func:`read_record` reads one; an error names the item as ``source[i]``)."""
    parsed = _parse(data, source)
    if not isinstance(parsed, list):
        check_shape(parsed, source=source)
        return [parsed]
    for i, item in enumerate(parsed):
        check_shape(item, source=f"{source}[{i}]")
    return parsed


def _parse(data: bytes | str, source: str) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise ParseError("input is not UTF-8", location=f"{source}@byte {exc.start}") from None
    try:
        return json.loads(text, parse_int=_integer,
                          object_pairs_hook=functools.partial(_one_value_per_name, source))
    except json.JSONDecodeError as exc:
        raise ParseError(f"malformed JSON: {exc.msg}",
                         location=f"{source}:{exc.lineno}:{exc.colno}") from None
    except RecursionError:
        # A record is four levels deep; the parser gives up long before the stack does.
        raise ParseError("malformed JSON: nested far deeper than a DE record",
                         location=source) from None


class _LongInteger:
    """An integer written with more digits than Python converts (see
    :func:`sys.get_int_max_str_digits`): longer than any declared format, refused by
    :func:`check_shape` where it stands."""

    __slots__ = ()


_LONG_INTEGER = _LongInteger()


def _integer(digits: str) -> int | _LongInteger:
    if len(digits.lstrip("-")) > sys.get_int_max_str_digits() > 0:
        return _LONG_INTEGER
    return int(digits)


# How a member name is shown in an error: a data element identifier or a key as the
# format writes them; anything else could be a value (a name typed as a key).
_MEMBER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


def _one_value_per_name(source: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                label = name if _MEMBER_NAME.fullmatch(name) else "*"
                raise ParseError("a member name appears twice in one object",
                                 location=f"{source} {label}")
            seen.add(name)
    return result


def check_shape(record: Any, *, source: str = "<input>") -> None:
    """Raise :class:`ParseError` naming the path if ``record`` is not a DE record."""
    if not isinstance(record, dict):
        raise ParseError("a DE record is a JSON object", location=f"{source} $")
    for key in record:
        if key not in _TOP_KEYS:
            raise ParseError("unknown key in DE record", location=f"{source} $.{key}")
    if not isinstance(record.get("dataset"), str):
        raise ParseError("dataset must be a string", location=f"{source} $.dataset")
    elements = record.get("elements")
    if not isinstance(elements, dict):
        raise ParseError("elements must be an object", location=f"{source} $.elements")
    for key, value in elements.items():
        if type(value) not in _PLAIN:
            _check_value(value, f"{source} $.elements.{key}")
    groups = record.get("groups", {})
    if not isinstance(groups, dict):
        raise ParseError("groups must be an object", location=f"{source} $.groups")
    for name, items in groups.items():
        if not isinstance(items, list):
            raise ParseError("a group is a list of objects", location=f"{source} $.groups.{name}")
        for i, item in enumerate(items):
            where = f"{source} $.groups.{name}[{i}]"
            if not isinstance(item, dict):
                raise ParseError("a group item is an object", location=where)
            for key, value in item.items():
                if type(value) not in _PLAIN:
                    _check_value(value, f"{where}.{key}")
    _check_text(record, source)


def _check_text(record: dict[str, Any], source: str) -> None:
    """ParseError naming the place of a lone surrogate (a string that is no Unicode text,
    which JSON's ``\\ud800`` escape can write): no such string can be hashed, stored or
    sent. One write of the whole record proves the common case; only a record that cannot
    be written is walked (its integers too wide to write are left to the formats)."""
    try:
        orjson.dumps(record)
    except TypeError:
        pass
    else:
        return
    places: list[tuple[str, Any]] = [(f"{source} $.dataset", record["dataset"])]
    for key, value in record["elements"].items():
        places += [(f"{source} $.elements", key), (f"{source} $.elements.{key}", value)]
    for name, items in record.get("groups", {}).items():
        places.append((f"{source} $.groups", name))
        for i, item in enumerate(items):
            for key, value in item.items():
                where = f"{source} $.groups.{name}[{i}]"
                places += [(where, key), (f"{where}.{key}", value)]
    for where, text in places:
        if isinstance(text, str) and not _is_unicode(text):
            raise ParseError("text with a lone surrogate (not Unicode)", location=where)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
# Values that pass _check_value whatever they hold (its other cases are subclasses).
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _check_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if value is _LONG_INTEGER:
        raise ParseError("number longer than the declared format", location=where)
    raise ParseError("element values are strings, numbers or booleans", location=where)


def map_record(record: dict[str, Any], *, now: datetime | None = None,
               files: MappingFiles = SHIPPED) -> dict[str, Any]:
    """Map a DE record to a FHIR R4 ``collection`` Bundle and validate it.

    Resource ids are uuid5 values of the source identifiers, so the same record gives
    the same Bundle. ``now`` (timezone-aware) becomes ``Claim.created``; without it the
    discharge time is used. ``files`` names a site's overlay of the value sets. Raises :class:`MappingError` naming the data element
    (unknown, over-length, impossible date, code not in its value set, required but
    missing) or :class:`~bridge.errors.ValidationError` naming the FHIR path.
    """
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware")
    check_shape(record)
    return map_with(mapping_for(record["dataset"], files), record, now)


def patient_identifiers(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    """``(system, value)`` of every identifier of the Patient in a collection Bundle."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            # Only identifiers with both parts, non-empty: a received Patient may hold
            # anything FHIR validation lets through (a null list, an empty system).
            found = resource.get("identifier")
            return [(i["system"], i["value"]) for i in (found if isinstance(found, list) else [])
                    if isinstance(i, dict) and isinstance(i.get("system"), str) and i["system"]
                    and isinstance(i.get("value"), str) and i["value"]]
    raise MappingError("bundle holds no Patient", location="Bundle.entry")


def unused_elements(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(HDSD id, reason)`` for every filled element of ``record`` the mapping does not carry.

    This is the trace of what stays at the source: useful to find a gap in a mapping and
    to explain to an auditor what was held back. Group items are included.
    """
    check_shape(record)
    spec = mapping_for(record["dataset"])
    present = {k for k, v in record["elements"].items() if v not in (None, "")}
    for items in (record.get("groups") or {}).values():
        for item in items:
            present |= {k for k, v in item.items() if v not in (None, "")}
    return [(eid, spec.unmapped[eid]) for eid in sorted(present) if eid in spec.unmapped]


def unmap_bundle(bundle: dict[str, Any], *, dataset: str | None = None) -> dict[str, Any]:
    """Read a FHIR R4 collection Bundle back into a DE record (the reverse of :func:`map_record`).

    The same mapping file drives both ways. Without ``dataset`` every shipped mapping is
    tried. The record returned maps forward to the input's resources (one-way elements
    such as ``Claim.created`` from the clock aside); otherwise :class:`MappingError`
    names the first resource that cannot be read back.
    """
    from bridge.mapping.reverse import unmap_with

    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise MappingError("expected a FHIR Bundle", location="$.resourceType")
    specs = [mapping_for(dataset)] if dataset else list(_shipped().values())
    first: MappingError | None = None
    for spec in specs:
        try:
            return unmap_with(spec, bundle, functools.partial(_forward, spec))
        except MappingError as exc:
            first = first or exc
    assert first is not None
    raise first


def _forward(spec: MappingSpec, record: dict[str, Any]) -> dict[str, Any]:
    """Map a record forward with ``spec`` (the reverse checks its answer with it)."""
    return map_with(spec, record, None)
