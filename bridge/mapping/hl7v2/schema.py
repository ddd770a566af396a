"""What each HL7 v2 field may hold, compiled once from hl7apy's reference tables.

hl7apy knows, per version, every message structure (which segments and groups are
required), every segment's fields (data type, required, repeating) and the data types'
components down to the base types, whose maximum lengths it declares (ST 199, IS 20,
NM 16 digits, SI 4, TX/FT 65536). Parsing with hl7apy builds an object per element and
costs about 10 ms per ADT^A01; reading the same tables once into tuples and checking the
split message against them costs a few tens of microseconds.

Checks (each raises :class:`~bridge.errors.MappingError` naming the HL7 location and the
HL7 table 0357 error code an ACK reports):

- required segments of the message structure present (100), MSH first;
- segments known to the declared version (Z-segments are passed over) (100);
- required fields present (101);
- non-repeating fields not repeated, no components beyond the data type's (102);
- base-type lengths (102), numbers in NM/SI (102), dates and times in DT/DTM/TS as real
  calendar dates and times (102); OBX-5 by the type OBX-2 declares.

hl7apy does not check table values, dates or segment order; code values are checked by
the mapping files' value sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

import hl7apy  # type: ignore[import-untyped]

from bridge.errors import BridgeError, MappingError
from bridge.mapping.hl7v2.message import HL7Message, Loc, Segment, hl7_error

SUPPORTED_VERSIONS = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"})

# Kinds of leaf check.
TEXT, DT, DTM, NM, SI, VARIES, ANY = range(7)

_DTM = re.compile(
    r"^([0-9]{4})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.[0-9]{1,4})?)?)?)?)?)?"
    r"(?:[+-]([0-9]{2})([0-9]{2}))?\Z"
)
_DT = re.compile(r"^([0-9]{4})(?:([0-9]{2})([0-9]{2})?)?\Z")
_NM = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)\Z")
_SI = re.compile(r"^[0-9]+\Z")


@dataclass(frozen=True, slots=True)
class Node:
    """A data type: a leaf with a check and maximum length, or components."""

    kind: int
    max_length: int | None
    children: tuple[Node, ...] = ()
    table: str | None = None


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a segment as the version defines it."""

    number: int
    datatype: str
    required: bool
    repeats: bool
    node: Node


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    name: str
    fields: tuple[FieldSpec, ...]  # fields[n - 1] is field n
    required: tuple[int, ...]


def check_dtm(text: str) -> bool:
    """True for a real HL7 DTM/TS time: ``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``."""
    m = _DTM.match(text)
    if m is None:
        return False
    y, mo, d, h, mi, s, zh, zm = m.groups()
    try:
        date(int(y), int(mo or 1), int(d or 1))
    except ValueError:
        return False
    if (h and int(h) > 23) or (mi and int(mi) > 59) or (s and int(s) > 59):
        return False
    return not (zh and (int(zh) > 14 or int(zm) > 59))


def check_dt(text: str) -> bool:
    """True for a real HL7 DT date: ``YYYY[MM[DD]]``."""
    m = _DT.match(text)
    if m is None:
        return False
    y, mo, d = m.groups()
    try:
        date(int(y), int(mo or 1), int(d or 1))
    except ValueError:
        return False
    return True


def _base_lengths(lib: Any) -> dict[str, int | None]:
    lengths: dict[str, int | None] = {}
    for name, cls in lib.get_base_datatypes().items():
        if name in ("DT", "DTM", "TM"):
            continue
        try:
            inst = cls(None) if name in ("NM", "SI") else cls("")
        except Exception:  # noqa: BLE001, S112 - a base type we cannot probe gets no limit
            continue
        lengths[name] = inst.max_length
    return lengths


def _leaf(name: str, datatype: str, table: str | None, lengths: dict[str, int | None]) -> Node:
    # In v2.4 TS.1 is typed ST although it carries the time; v2.5 types it DTM.
    if datatype in ("DTM", "TS") or name == "TS_1":
        return Node(DTM, None, table=table)
    if datatype == "DT":
        return Node(DT, None, table=table)
    if datatype == "NM":
        return Node(NM, lengths.get("NM"), table=table)
    if datatype == "SI":
        return Node(SI, lengths.get("SI"), table=table)
    if datatype == "varies":
        return Node(VARIES, None, table=table)
    if datatype in lengths:
        return Node(TEXT, lengths[datatype], table=table)
    return Node(ANY, None, table=table)


def _node(name: str, ref: Any, lengths: dict[str, int | None]) -> Node:
    kind, children, datatype = ref[0], ref[1], ref[2]
    table = ref[4] if len(ref) > 4 else None
    if kind == "leaf" or not children:
        return _leaf(name, datatype, table, lengths)
    subs = tuple(_node(child[0], child[1], lengths) for child in children)
    return Node(ANY, None, subs, table)


@lru_cache(maxsize=16)
def _library(version: str) -> tuple[Any, dict[str, int | None]]:
    lib = hl7apy.load_library(version)
    return lib, _base_lengths(lib)


@lru_cache(maxsize=1024)
def segment_spec(version: str, name: str) -> SegmentSpec | None:
    """The segment's fields in this version, or ``None`` if the version has no such segment."""
    lib, lengths = _library(version)
    try:
        ref = lib.SEGMENTS[name]
    except KeyError:
        return None
    fields = []
    for number, child in enumerate(ref[1], start=1):
        fname, fref, (lo, hi), _ = child
        fields.append(FieldSpec(number, fref[2], lo >= 1, hi != 1, _node(fname, fref, lengths)))
    required = tuple(f.number for f in fields if f.required and not (name == "MSH" and f.number <= 2))
    return SegmentSpec(name, tuple(fields), required)


def _required_in(children: Any) -> set[str]:
    found: set[str] = set()
    for child in children:
        cname, cref, (lo, _), kind = child
        if lo < 1:
            continue
        if kind == "SEG":
            found.add(cname)
        elif kind == "GRP":
            found |= _required_in(cref[1])
    return found


@lru_cache(maxsize=256)
def required_segments(version: str, structure: str) -> frozenset[str] | None:
    """Segments the message structure requires (inside required groups too)."""
    lib, _ = _library(version)
    ref = lib.MESSAGES.get(structure)
    if ref is None:
        return None
    return frozenset(_required_in(ref[1]))


def check_version(version: str) -> None:
    """Refuse versions the bridge does not read (HL7 error 203)."""
    if version not in SUPPORTED_VERSIONS:
        raise hl7_error(MappingError, "unsupported HL7 version", Loc("MSH", 1, 12), "203")


# Segment texts found faultless, oldest first (a bounded cache, see validate()).
_CLEAN: dict[tuple[str, str, str], None] = {}
_CLEAN_MAX = 4096
#: Field repetitions already found faultless, by version, segment, field and text: the
#: dates, codes and names an HIS repeats across messages are not taken apart again.
_CLEAN_FIELDS: dict[tuple[str, str, str, int, str], None] = {}
_CLEAN_FIELDS_MAX = 16384

def _forget_oldest(cache: dict[Any, None]) -> None:
    """Drop the oldest entry of a bounded cache. Messages are read on the event loop and
    (large ones) on the MLLP listener's reading thread: another thread may have dropped
    the same entry, or changed the cache, in between, and either is fine."""
    try:
        del cache[next(iter(cache))]
    except (KeyError, RuntimeError, StopIteration):
        pass


#: Fields a mapping reads, as ``(segment id, field number)``; None = every field.
ReadSet = frozenset[tuple[str, int]]


class _Checker:
    """Raise for problems in fields a mapping reads; record the others as warnings."""

    __slots__ = ("read", "warnings")

    def __init__(self, read: ReadSet | None, warnings: list[str] | None) -> None:
        self.read = read
        self.warnings = warnings

    def strict(self, segment: str, field: int | None = None) -> bool:
        if self.read is None or self.warnings is None:
            return True
        if field is None:
            return any(name == segment for name, _ in self.read)
        return (segment, field) in self.read

    def problem(self, exc: BridgeError, segment: str, field: int | None = None) -> None:
        if self.strict(segment, field):
            raise exc
        assert self.warnings is not None
        self.warnings.append(f"{exc.location} {exc.detail.get('hl7_code', '102')}: {exc.message}")


def validate(msg: HL7Message, structure: str | None, *, read: ReadSet | None = None,
             warnings: list[str] | None = None) -> None:
    """Check ``msg`` against its version's definitions; raise naming the first problem.

    With ``read`` and ``warnings``, only the fields a mapping reads (and the segments it
    reads from) are checked strictly: a problem anywhere else (a data type broken in a
    field nobody maps, a required field or segment no mapping needs, an unknown
    segment) is appended to ``warnings`` as ``location code: text`` instead, so a
    message is refused only for what the bridge actually uses.
    """
    version = msg.version
    check_version(version)
    checker = _Checker(read, warnings)
    if structure:
        needed = required_segments(version, structure)
        if needed is None:
            raise hl7_error(MappingError, "message structure unknown to this HL7 version",
                            Loc("MSH", 1, 9, 0, 3), "100")
        for seg_name in sorted(needed):
            if seg_name not in msg.by_name:
                checker.problem(hl7_error(MappingError, "required segment missing",
                                          Loc(seg_name), "100"), seg_name)
    delimiters = msg.delimiters.field + msg.delimiters.encoding_characters
    for seg in msg.segments:
        spec = segment_spec(version, seg.name)
        if spec is None:
            if seg.name.startswith("Z"):
                continue
            checker.problem(hl7_error(MappingError, "segment not defined in this HL7 version",
                                      Loc(seg.name, seg.rep), "100"), seg.name)
            continue
        # A segment text already found faultless (the PID and PV1 an HIS repeats in every
        # message of a stay) is faultless again: only its position differs, and no check
        # depends on it.
        key = (version, delimiters, seg.line) if seg.line else None
        if key is not None and key in _CLEAN:
            continue
        before = len(checker.warnings) if checker.warnings is not None else 0
        _check_segment(msg, seg, spec, checker, delimiters)
        if key is not None and (checker.warnings is None or len(checker.warnings) == before):
            if len(_CLEAN) >= _CLEAN_MAX:
                _forget_oldest(_CLEAN)
            _CLEAN[key] = None


def _check_segment(msg: HL7Message, seg: Segment, spec: SegmentSpec, checker: _Checker,
                   delimiters: str) -> None:
    raw = seg.raw_fields
    version = msg.version
    nfields = len(spec.fields)
    for number in spec.required:
        if number >= len(raw) or not raw[number] or raw[number] == '""':
            checker.problem(hl7_error(MappingError, "required field missing",
                                      Loc(seg.name, seg.rep, number), "101"), seg.name, number)
    d = msg.delimiters
    start = 3 if seg.name == "MSH" else 1
    for number in range(start, len(raw)):
        text = raw[number]
        if not text:
            continue
        try:
            if number > nfields:
                raise hl7_error(MappingError, "field not defined for this segment in this version",
                                Loc(seg.name, seg.rep, number), "102")
            fspec = spec.fields[number - 1]
            reps = text.split(d.repetition)
            if len(reps) > 1 and not fspec.repeats:
                raise hl7_error(MappingError, "field does not repeat",
                                Loc(seg.name, seg.rep, number, 2), "102")  # the second repetition
            node = fspec.node
            # OBX-5's data type is named in OBX-2: its text alone does not decide it.
            remember = not (node.kind == VARIES and seg.name == "OBX" and number == 5)
            if not remember:
                node = _obx_value_node(seg)
            for r, rep_text in enumerate(reps, start=1):
                if not rep_text:
                    continue
                key = (version, delimiters, seg.name, number, rep_text)
                if remember and key in _CLEAN_FIELDS:
                    continue
                _check_node(node, rep_text, d, 0,
                            (seg.name, seg.rep, number, r if fspec.repeats else 0))
                if remember:
                    if len(_CLEAN_FIELDS) >= _CLEAN_FIELDS_MAX:
                        _forget_oldest(_CLEAN_FIELDS)
                    _CLEAN_FIELDS[key] = None
        except MappingError as exc:
            checker.problem(exc, seg.name, number)


def _obx_value_node(seg: Segment) -> Node:
    value_type = seg.value(2)
    if value_type in ("NM",):
        return Node(NM, 16)
    if value_type in ("DT",):
        return Node(DT, None)
    if value_type in ("TS", "DTM"):
        return Node(DTM, None)
    return Node(ANY, None)


def _check_node(node: Node, text: str, d: Any, depth: int, where: tuple[Any, ...]) -> None:
    if node.children and depth >= 2:
        # ER7 has no separator below subcomponents: a composite there is read as its first part.
        node = node.children[0]
        while node.children:
            node = node.children[0]
    if node.children:
        sep = d.component if depth == 0 else d.subcomponent
        parts = text.split(sep) if sep in text else [text]
        if len(parts) > len(node.children):
            raise hl7_error(MappingError, "more components than the data type has",
                            Loc(*(where + (len(node.children) + 1,))), "102")
        for i, part in enumerate(parts):
            if part:
                child_where = where + (i + 1,)
                _check_node(node.children[i], part, d, depth + 1, child_where)
        return
    if depth == 0 and d.component in text and node.kind != ANY:
        # A leaf field written with components: only the first is the value.
        raise hl7_error(MappingError, "components in a field that has none",
                        Loc(*where), "102")
    if depth == 1 and d.subcomponent in text and node.kind != ANY:
        raise hl7_error(MappingError, "subcomponents in a component that has none",
                        Loc(*where), "102")
    if d.escape in text:
        text = d.unescape(text, Loc(*where))
    if text == '""':
        return
    kind = node.kind
    if kind == TEXT:
        if node.max_length is not None and len(text) > node.max_length:
            raise hl7_error(MappingError,
                            f"longer than the {node.max_length} characters the data type allows",
                            Loc(*where), "102")
    elif kind == DTM:
        if not check_dtm(text):
            raise hl7_error(MappingError, "not a valid HL7 date/time (DTM)", Loc(*where), "102")
    elif kind == DT:
        if not check_dt(text):
            raise hl7_error(MappingError, "not a valid HL7 date (DT)", Loc(*where), "102")
    elif kind == NM:
        if not _NM.match(text) or len(text.lstrip("+-").replace(".", "")) > (node.max_length or 16):
            raise hl7_error(MappingError, "not a number (NM)", Loc(*where), "102")
    elif kind == SI and (not _SI.match(text) or len(text) > (node.max_length or 4)):
        raise hl7_error(MappingError, "not a sequence number (SI)", Loc(*where), "102")
