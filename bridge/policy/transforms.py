"""De-identification transforms for link profiles (GB/T 39725-2020 §10.2, Appendix G).

A closed registry of named functions; a link profile names them per element
(``transforms: {birthDate: year_only}``) and the loader checks that each name exists and
fits the element's FHIR type. Keys never live in a profile file: the caller passes the
controller's de-identification key (§10.2 f: parameters such as time-drift ranges and
pseudonym rules stay confidential inside the controller), and everything keyed is
derived from it with HMAC-SHA256, separated by purpose:

* ``pseudonym`` (Identifier): each identifier becomes
  ``{system: urn:ws-fhir-bridge:pseudonym, value: HMAC(key, system|value)}`` — the same
  person gets the same pseudonym in every batch, so records can still be linked
  (§10.2 e, table 6 "Number"), but the value cannot be reversed without the key;
* ``date_shift`` (date, dateTime, instant, Period): every date of one patient moves by
  the same keyed number of days (1-365, either direction), so intervals such as the
  length of stay survive (table 6 "Date", time-shifting method);
* ``year_only`` (same types): keep only the year (§10.2 b 3);
* ``county_address`` (Address): keep country, province, city and county/district;
  street, house number, postal code and free text go (table 6 "Contact", table G.1
  DE02.01.009.04-06).

Each transform declares the grade of what it produces (3: partially de-identified data
that may still be re-identified, §6.2 c), which is what a link's ``grades`` are checked
against.

:func:`enforce_k_anonymity` works on a batch: it releases only records whose
quasi-identifier values are shared by at least ``k`` records (§10.2 d: at least 5).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cached_property, lru_cache
from typing import Any

import orjson

PSEUDONYM_SYSTEM = "urn:ws-fhir-bridge:pseudonym"
MAX_SHIFT_DAYS = 365
MIN_KEY_BYTES = 16

_DATE_RE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T.+)?)?)?\Z")


@dataclass(frozen=True)
class DeidContext:
    """The controller's key and the patient a bundle is about."""

    key: bytes
    patient: str  # a stable key of the patient, e.g. "system|value" of an identifier

    def _mac(self, purpose: str, text: str) -> bytes:
        """HMAC-SHA256 (RFC 2104) of ``purpose``, a NUL and ``text`` under the key."""
        mac = _keyed(self.key).copy()
        mac.update(f"{purpose}\x00{text}".encode())
        return mac.digest()

    def pseudonym(self, text: str) -> str:
        """A keyed, irreversible stand-in for ``text`` (hex, 128 bits)."""
        return self._mac("pseudonym", text)[:16].hex()

    def pseudonym_uuid(self, text: str) -> str:
        """A keyed stand-in for a resource id, shaped as a UUID: what
        ``str(uuid.UUID(bytes=mac[:16], version=4))`` gives, written directly (the
        UUID class checks and converts what is known to fit, once per resource)."""
        raw = bytearray(self._mac("id", text)[:16])
        raw[6] = raw[6] & 0x0F | 0x40  # version 4
        raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    @cached_property
    def shift_days(self) -> int:
        """This patient's date offset: 1-365 days, earlier or later, fixed by the key."""
        raw = int.from_bytes(self._mac("date-shift", self.patient)[:8], "big")
        days = raw % MAX_SHIFT_DAYS + 1
        return days if (raw >> 32) & 1 else -days


@lru_cache(maxsize=16)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 already keyed with ``key``: copying it skips the key schedule that
    every record would otherwise repeat."""
    return hmac.new(key, digestmod=hashlib.sha256)


Transform = Callable[[Any, DeidContext | None], Any]


@dataclass(frozen=True)
class TransformSpec:
    """A named transform, the FHIR types it applies to, and the grade of its output."""

    name: str
    fn: Transform
    types: frozenset[str]  # complex type names and primitive type names
    needs_key: bool
    grade: int


# --- the transforms --------------------------------------------------------------------


def _pseudonym(value: Any, ctx: DeidContext | None) -> Any:
    assert ctx is not None
    if isinstance(value, list):
        out = [_pseudonym(v, ctx) for v in value]
        return [v for v in out if v is not None] or None
    if not isinstance(value, dict) or not value.get("value"):
        return None
    source = f"{value.get('system') or ''}|{value['value']}"
    return {"system": PSEUDONYM_SYSTEM, "value": ctx.pseudonym(source)}


def _map_dates(value: Any, fn: Callable[[str, int], str | None], days: int) -> Any:
    """``fn(text, days)`` of every date in ``value`` (a date, a list, a Period); what is
    not a date, or what ``fn`` refuses, goes."""
    if isinstance(value, str):
        return fn(value, days) if _DATE_RE.match(value) else None
    if isinstance(value, list):
        out = [_map_dates(v, fn, days) for v in value]
        return [v for v in out if v is not None] or None
    if isinstance(value, dict):
        # A Period: its start and end; anything else in it (extensions) goes.
        kept = {}
        for k in ("start", "end"):
            if k in value:
                moved = _map_dates(value[k], fn, days)
                if moved is not None:
                    kept[k] = moved
        return kept or None
    return None


def _year(text: str, days: int) -> str | None:
    return text[:4]


# The time of day of a dateTime as ``datetime.isoformat`` writes it: hours, minutes and
# seconds, then no offset, ``Z`` or an offset in hours and minutes (``-00:00`` aside,
# which it writes ``+00:00``).
_PLAIN_TIME = re.compile(r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?")


# One stay repeats its dates (admission and discharge on the Encounter, the Claim, the
# diagnoses): each is parsed once.
@lru_cache(maxsize=4096)
def _shift(text: str, days: int) -> str | None:
    """``text`` moved by ``days``, to the day: a time of day is dropped. Kept to the
    second, an admission and a discharge time would pick out the stay in the original
    records whatever the shift (the length of stay in days survives)."""
    try:
        if "T" in text:
            if _PLAIN_TIME.fullmatch(text[10:]) is None:
                datetime.fromisoformat(text)  # not a time of day: ValueError
            return (date.fromisoformat(text[:10]) + timedelta(days=days)).isoformat()
        parts = text.split("-")
        first = date(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1,
                     int(parts[2]) if len(parts) > 2 else 1)
        moved_day = first + timedelta(days=days)
        return moved_day.isoformat()[: len(text)]
    except (ValueError, OverflowError):  # OverflowError: shifted beyond year 1 or 9999
        return None


def _year_only(value: Any, ctx: DeidContext | None) -> Any:
    return _map_dates(value, _year, 0)


def _date_shift(value: Any, ctx: DeidContext | None) -> Any:
    assert ctx is not None
    return _map_dates(value, _shift, ctx.shift_days)


_COUNTY_KEEP = ("use", "type", "country", "state", "city", "district")


def _county_address(value: Any, ctx: DeidContext | None) -> Any:
    if isinstance(value, list):
        out = [_county_address(v, ctx) for v in value]
        return [v for v in out if v is not None] or None
    if not isinstance(value, dict):
        return None
    kept = {k: value[k] for k in _COUNTY_KEEP if k in value and isinstance(value[k], str)}
    return kept or None


def _care_end(value: Any, ctx: DeidContext | None) -> Any:
    # Replaced after pruning by the (shifted) end of the resource's own period: see
    # ANCHORED below. Until then the value is shifted like any date.
    return _date_shift(value, ctx)


# Dates a transform may cut to the day (or the year). An instant must keep its time of
# day (FHIR), so neither applies to one.
_DATE_TYPES = frozenset({"date", "dateTime", "Period"})

#: Transforms whose output is anchored to another element of the same resource once it
#: is pruned: ``care_end`` puts the shifted end (or start) of ``billablePeriod`` in place
#: of a date that merely records when the message was made (``Claim.created``), since a
#: shifted "now" next to the real send time (``Bundle.timestamp``, the signature's
#: ``iat``) would give the shift away.
ANCHORED: dict[str, str] = {"care_end": "billablePeriod"}

#: Identifier systems in the order the person key of a date shift prefers them: the
#: identity document first (the same on every record of the person), then the cards,
#: then the hospital's own numbers, which differ from stay to stay.
PERSON_KEY_PREFERENCE = (
    "urn:oid:2.16.156.10011.1.3",  # resident identity card
    "urn:ws-fhir-bridge:id-document",  # another identity document (passport ...)
    "urn:oid:2.16.156.10011.1.19",  # health card
    "urn:oid:2.16.156.10011.1.13",  # medical-record number
)


def person_key(identifiers: Sequence[tuple[str, str]]) -> str:
    """The ``system|value`` that keys one person's date shift and pseudonymous ids: the
    most stable identifier (see :data:`PERSON_KEY_PREFERENCE`), never the per-stay
    inpatient number when a better one exists."""

    def rank(ident: tuple[str, str]) -> tuple[int, str, str]:
        system, value = ident
        order = (PERSON_KEY_PREFERENCE.index(system) if system in PERSON_KEY_PREFERENCE
                 else len(PERSON_KEY_PREFERENCE))
        return (order, system, value)

    system, value = min(identifiers, key=rank)
    return f"{system}|{value}"

TRANSFORMS: dict[str, TransformSpec] = {
    spec.name: spec
    for spec in (
        TransformSpec("pseudonym", _pseudonym, frozenset({"Identifier"}), True, 3),
        TransformSpec("date_shift", _date_shift, _DATE_TYPES, True, 3),
        TransformSpec("year_only", _year_only, _DATE_TYPES, False, 3),
        TransformSpec("county_address", _county_address, frozenset({"Address"}), False, 3),
        TransformSpec("care_end", _care_end, frozenset({"dateTime"}), True, 3),
    )
}


def check_key(key: bytes | None) -> bytes:
    """Return ``key`` if it is long enough to key HMAC-SHA256, else raise ValueError."""
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a de-identification key has at least {MIN_KEY_BYTES} bytes")
    return key


# --- resource ids --------------------------------------------------------------------


def id_stand_ins(
    entries: Any, ctx: DeidContext
) -> tuple[dict[str, str], list[tuple[str, str | None] | None]]:
    """The stand-in of every reference form of the entries' resources (``urn:uuid:id``,
    ``Type/id``, the entry's fullUrl), and per entry its new id and fullUrl (None for a
    resource without an id), in entry order: the first entry to claim a fullUrl keeps it."""
    mapping: dict[str, str] = {}
    plan: list[tuple[str, str | None] | None] = []
    for entry in entries:
        resource = entry.get("resource") or {}
        old = resource.get("id")
        if not isinstance(old, str):
            plan.append(None)
            continue
        new = ctx.pseudonym_uuid(old)
        rtype = resource.get("resourceType")
        mapping[f"urn:uuid:{old}"] = f"urn:uuid:{new}"
        mapping[f"{rtype}/{old}"] = f"{rtype}/{new}"
        full = entry.get("fullUrl")
        if isinstance(full, str):
            mapping.setdefault(full, f"urn:uuid:{new}")
            plan.append((new, mapping[full]))
        else:
            plan.append((new, None))
    return mapping, plan


def pseudonymise_ids(bundle: dict[str, Any], ctx: DeidContext) -> None:
    """Replace every resource id, fullUrl and in-bundle reference with a keyed stand-in.

    Resource ids are derived from source identifiers (uuid5 over the hospital code and
    record number), so they would let anyone holding a record number confirm a match;
    the stand-ins keep the references of one bundle resolving. Works in place (the
    entries' resources may be replaced by rewritten equal copies).
    """
    entries = bundle.get("entry") or ()
    mapping, plan = id_stand_ins(entries, ctx)
    for entry, ids in zip(entries, plan, strict=True):
        if ids is not None:
            new, full = ids
            if full is not None:
                entry["fullUrl"] = full
            entry["resource"]["id"] = new
    if not mapping or not _rewrite_text(entries, mapping):
        for entry in entries:
            _rewrite_refs(entry.get("resource"), mapping)


# Only plain JSON values: anything orjson would turn into another value (a datetime, a
# dataclass, a str subclass) raises instead, and the walk below handles it.
_PLAIN = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | (
    orjson.OPT_PASSTHROUGH_SUBCLASS)
_MEMBER = b'"reference":"'


def _json_text(text: str) -> bytes:
    """``text`` as orjson writes it inside a JSON string: UTF-8 as it is, unless it
    holds a quote, a backslash or a control character (orjson escapes those)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text.encode()
    return orjson.dumps(text)[1:-1]


def encoded_stand_ins(mapping: dict[str, str]) -> dict[bytes, bytes]:
    """``mapping`` as JSON text: orjson writes a string one way only, so equal strings
    have equal texts."""
    # Ids, fullUrls and stand-ins are mostly plain text: one check over all of them
    # (a character is plain or not wherever it stands) settles the common case.
    every = "".join(mapping) + "".join(mapping.values())
    if every.isprintable() and '"' not in every and "\\" not in every:
        return {k.encode(): v.encode() for k, v in mapping.items()}
    return {_json_text(k): _json_text(v) for k, v in mapping.items()}


def rewrite_references(
    text: bytes, encoded: dict[bytes, bytes], found: list[bytes] | None = None
) -> bytes | None:
    """``text`` (JSON as orjson writes it) with every ``reference`` member's value that
    ``encoded`` names replaced (``text`` itself when none is). None when a reference is
    written with escapes: the caller walks the objects instead.

    ``found`` receives, in order, the JSON text of each ``reference`` member's value in
    the result, so the caller need not split the result again; text that merely holds
    the words (never in orjson's output) then gives None too."""
    if b"\\" not in text:
        return _rewrite_plain(text, encoded, found)
    parts = text.split(_MEMBER)
    changed = False
    for i in range(1, len(parts)):
        part = parts[i]
        end = part.find(b'"')
        value = part[:end]
        # A member name follows "{" or "," outside any string (inside a string every
        # quote is escaped): anything else is text that merely contains the words.
        if parts[i - 1][-1:] not in (b"{", b","):
            if found is not None:
                return None
            continue
        if b"\\" in value:
            return None
        new = encoded.get(value)
        if new is not None:
            parts[i] = new + part[end:]
            changed = True
            value = new
        if found is not None:
            found.append(value)
    return _MEMBER.join(parts) if changed else text


def _rewrite_plain(
    text: bytes, encoded: dict[bytes, bytes], found: list[bytes] | None
) -> bytes | None:
    """:func:`rewrite_references` for a text without escapes (most): every value ends
    at the next quote, so the text is searched member by member instead of split."""
    size = len(_MEMBER)
    pieces: list[bytes] = []
    start = 0
    at = text.find(_MEMBER)
    while at >= 0:
        begin = at + size
        if text[at - 1:at] not in (b"{", b","):
            if found is not None:
                return None
            at = text.find(_MEMBER, begin)
            continue
        end = text.find(b'"', begin)
        if end < 0:
            return None
        value = text[begin:end]
        new = encoded.get(value)
        if new is not None:
            pieces.append(text[start:begin])
            pieces.append(new)
            start = end
            value = new
        if found is not None:
            found.append(value)
        at = text.find(_MEMBER, begin)
    if not pieces:
        return text
    pieces.append(text[start:])
    return b"".join(pieces)


def _rewrite_text(entries: Any, mapping: dict[str, str]) -> bool:
    """Rewrite the references of every entry's resource in one pass over their JSON
    (a walk in Python visits every object; this splits the text at the references).
    False when the resources are not plain JSON, or a reference is written with escapes
    (nothing changed then: the walk does it)."""
    resources = [entry.get("resource") for entry in entries]
    try:
        text = orjson.dumps(resources, option=_PLAIN)
    except (TypeError, orjson.JSONEncodeError):
        return False
    rewritten = rewrite_references(text, encoded_stand_ins(mapping))
    if rewritten is None:
        return False
    if rewritten is not text:
        for entry, resource in zip(entries, orjson.loads(rewritten), strict=True):
            if "resource" in entry:
                entry["resource"] = resource
    return True


def _rewrite_refs(node: Any, mapping: dict[str, str]) -> None:
    if isinstance(node, dict):
        _rewrite_object(node, mapping)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value, mapping)


def _rewrite_object(node: dict[str, Any], mapping: dict[str, str]) -> None:
    # Arrays of objects are walked here rather than by a call per element: most array
    # items are objects or strings, and a call for each costs more than its check.
    ref = node.get("reference")
    if isinstance(ref, str) and ref in mapping:
        node["reference"] = mapping[ref]
    for value in node.values():
        if isinstance(value, dict):
            _rewrite_object(value, mapping)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _rewrite_object(item, mapping)
                elif isinstance(item, list):
                    _rewrite_refs(item, mapping)


# --- k-anonymity ----------------------------------------------------------------------


def path_values(bundle: dict[str, Any], path: str) -> tuple[str, ...]:
    """Sorted string values at a FHIR path (``Patient.address.city``) across the bundle."""
    rtype, *segs = path.split(".")
    found: list[str] = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            continue
        _collect(resource, segs, found)
    return tuple(sorted(found))


def resource_values(resource: dict[str, Any], segs: Sequence[str]) -> tuple[str, ...]:
    """Sorted string values at the path ``segs`` below one resource (``["address",
    "city"]`` of a Patient): :func:`path_values` of a bundle holding that resource alone."""
    found: list[str] = []
    _collect(resource, segs, found)
    return tuple(sorted(found))


def _collect(resource: dict[str, Any], segs: Sequence[str], found: list[str]) -> None:
    current: list[Any] = [resource]
    for seg in segs:
        nxt: list[Any] = []
        for value in current:
            inner = value.get(seg) if isinstance(value, dict) else None
            if isinstance(inner, list):
                nxt.extend(inner)
            elif inner is not None:
                nxt.append(inner)
        current = nxt
    found.extend(str(v) for v in current if not isinstance(v, (dict, list)))


def quasi_key(bundle: dict[str, Any], quasi: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The combination of quasi-identifier values of one record (its equivalence class)."""
    return tuple(path_values(bundle, path) for path in quasi)


def enforce_k_anonymity(
    bundles: Sequence[dict[str, Any]], *, k: int = 5, quasi: Sequence[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a batch into (released, suppressed) so that every released record shares its
    quasi-identifier values with at least ``k - 1`` other released records.

    Records in an equivalence class smaller than ``k`` are suppressed whole (§10.2 d);
    nothing is generalised here — generalisation is the profile's transforms
    (``year_only``, ``county_address``), applied before this step. Order is kept.
    """
    if k < 1:
        raise ValueError("k is at least 1")
    if not quasi:
        raise ValueError("name at least one quasi-identifier path")
    keys = [quasi_key(b, quasi) for b in bundles]
    sizes = Counter(keys)
    released = [b for b, key in zip(bundles, keys, strict=True) if sizes[key] >= k]
    suppressed = [b for b, key in zip(bundles, keys, strict=True) if sizes[key] < k]
    return released, suppressed
