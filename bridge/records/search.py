"""FHIR R4 search parameters for record pull: parsing, validation and date ranges.

Plain synchronous code over plain data (no I/O). The HTTP layer hands the query string
as ``(name, value)`` pairs; :func:`parse_search` and :func:`parse_everything` return a
:class:`SearchQuery` or raise :class:`SearchError` naming the parameter.

What is supported is declared in :data:`SEARCH_PARAMS` (per resource type) and
:data:`EVERYTHING_PARAMS`; the CapabilityStatement is generated from the same tables.
Everything else is refused with 400 — a parameter that was silently ignored would
widen the result, which for a disclosure is the wrong way to fail. Modifiers
(``date:missing``), chains (``patient.identifier``) and ``_revinclude`` are refused;
``_include`` is accepted only for the pairs in :data:`INCLUDES`.

Types (FHIR R4 §3.1.1.4 "Search"):

- **token** ``identifier=SYSTEM|VALUE``: both parts required (one patient per request);
- **reference** ``patient=Patient/ID`` (``ID`` or an absolute URL ending in
  ``Patient/ID`` are accepted);
- **date** with the prefixes ``eq ne gt lt ge le sa eb`` (``ap`` is refused): the
  value is a range at its precision (``2024`` is the whole year, ``2024-03-05`` the
  whole day, in China Standard Time when no zone is given) and the comparisons are
  those of R4, on the target's range (a Period, or an instant at its precision).

Date ranges are half-open ``[lo, hi)`` instants in UTC, written with
:func:`bridge.ledger.audit.format_time`-compatible text so a store compares them as
strings.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.errors import ParseError, is_fhir_id
from bridge.instants import LATEST, shifted, utc

__all__ = [
    "DATE_ELEMENTS",
    "EVERYTHING_PARAMS",
    "INCLUDES",
    "SEARCH_PARAMS",
    "SERVED_TYPES",
    "CursorExpired",
    "DateFilter",
    "SearchError",
    "SearchQuery",
    "UnsupportedParameter",
    "check_format",
    "date_range",
    "decode_cursor",
    "encode_cursor",
    "param_label",
    "parse_everything",
    "parse_search",
    "resource_date_range",
]


class SearchError(ParseError):
    """A search parameter with a value this bridge cannot accept (400)."""

    code = "search-invalid"
    issue_type = "invalid"


class UnsupportedParameter(SearchError):
    """A search parameter, modifier or include this bridge does not serve (400)."""

    code = "search-unsupported"
    issue_type = "not-supported"


class CursorExpired(SearchError):
    """A page cursor past its lifetime (410): the traversal starts again from the first
    page, whose answer is asked of consent afresh."""

    code = "cursor-expired"
    http_status = 410
    issue_type = "expired"


ParamKind = Literal["token", "reference", "date", "number", "string", "special"]

#: Resource types a pull link may serve (the link's profile narrows them further).
SERVED_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "Procedure",
    "Composition",
    "DocumentReference",
)

#: Per type, the date search parameter and the elements behind it (first present wins).
DATE_ELEMENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Encounter": ("date", ("period",)),
    "Condition": ("onset-date", ("onsetDateTime", "onsetPeriod")),
    "Observation": ("date", ("effectiveDateTime", "effectivePeriod", "effectiveInstant")),
    "DiagnosticReport": ("date", ("effectiveDateTime", "effectivePeriod")),
    "MedicationRequest": ("authoredon", ("authoredOn",)),
    "Procedure": ("date", ("performedDateTime", "performedPeriod")),
    "Composition": ("date", ("date",)),
    "DocumentReference": ("date", ("date",)),
}

_COMMON: dict[str, ParamKind] = {
    "_lastUpdated": "date",
    "_count": "number",
    "_cursor": "string",
    "_format": "special",
    "_pretty": "special",
}


def _type_params(rtype: str) -> dict[str, ParamKind]:
    params: dict[str, ParamKind] = dict(_COMMON)
    if rtype == "Patient":
        params.update({"identifier": "token", "_id": "token"})
        return params
    params["patient"] = "reference"
    params[DATE_ELEMENTS[rtype][0]] = "date"
    if any(src == rtype for src, _ in INCLUDES):
        params["_include"] = "special"
    return params


#: ``_include`` values served: (source type, search parameter) -> target type.
INCLUDES: dict[tuple[str, str], str] = {
    ("Condition", "encounter"): "Encounter",
    ("Observation", "encounter"): "Encounter",
    ("DiagnosticReport", "encounter"): "Encounter",
    ("Procedure", "encounter"): "Encounter",
    ("Composition", "encounter"): "Encounter",
    ("MedicationRequest", "encounter"): "Encounter",
}

#: Supported parameters per resource type and their kind.
SEARCH_PARAMS: dict[str, dict[str, ParamKind]] = {t: _type_params(t) for t in SERVED_TYPES}

#: Parameters of ``Patient/{id}/$everything``.
EVERYTHING_PARAMS: dict[str, ParamKind] = {
    "_since": "date",
    "_type": "token",
    "_count": "number",
    "_cursor": "string",
    "_format": "special",
    "_pretty": "special",
}

_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"})
Prefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]

# China Standard Time: a date or time without a zone is a hospital's local time.
_CST = timezone(timedelta(hours=8))
_FOREVER = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
# ASCII digits only: ``\d`` would also take other scripts' digits, which FHIR does not.
_DATE_RE = re.compile(
    r"^(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?P<f>\.[0-9]{1,9})?)?"
    r"(?P<z>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?\Z"
)


def _text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class DateFilter:
    """One date comparison: ``prefix`` applied to the search range ``[lo, hi)``."""

    param: str
    prefix: Prefix
    lo: str
    hi: str

    def matches(self, target: tuple[str, str] | None) -> bool:
        """Does a target range ``[tl, th)`` (None: no date) satisfy this filter (R4)?"""
        if target is None:
            return False
        tl, th = target
        inside = tl >= self.lo and th <= self.hi
        match self.prefix:
            case "eq":
                return inside
            case "ne":
                return not inside
            case "gt":
                return th > self.hi
            case "lt":
                return tl < self.lo
            case "ge":
                return th > self.hi or inside
            case "le":
                return tl < self.lo or inside
            case "sa":
                return tl >= self.hi
            case "eb":
                return th <= self.lo
        return False  # pragma: no cover - Prefix is closed


@dataclass(frozen=True)
class SearchQuery:
    """A validated request: what to find, how many per page, where to resume.

    ``patient`` is a Patient id (from ``patient=`` or the ``$everything`` path);
    ``identifier`` a ``(system, value)`` for ``Patient?identifier=``. ``dates`` filter on
    the type's clinical date, ``last_updated`` on ``meta.lastUpdated`` (``_since`` is
    ``ge`` on it). ``types`` limits ``$everything``. ``fingerprint`` identifies the query
    apart from the cursor, so a cursor cannot be replayed against another query.
    """

    resource_type: str
    operation: Literal["search", "read", "everything"]
    count: int
    patient: str | None = None
    identifier: tuple[str, str] | None = None
    ids: tuple[str, ...] = ()
    dates: tuple[DateFilter, ...] = ()
    last_updated: tuple[DateFilter, ...] = ()
    types: frozenset[str] | None = None
    includes: tuple[tuple[str, str], ...] = ()
    cursor: str | None = None
    params: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def fingerprint(self) -> str:
        kept = (f"{k}={v}" for k, v in self.params if k != "_cursor")
        body = [self.resource_type, self.operation, str(self.patient), *kept]
        return hashlib.sha256("\x1f".join(body).encode()).hexdigest()[:32]

    def page_params(self, cursor: str | None) -> list[tuple[str, str]]:
        """The query string of this query at ``cursor`` (for ``Bundle.link``)."""
        out = [(k, v) for k, v in self.params if k != "_cursor"]
        if cursor is not None:
            out.append(("_cursor", cursor))
        return out


# --- dates ---------------------------------------------------------------------------------


def date_range(text: str, *, where: str) -> tuple[datetime, datetime]:
    """The half-open UTC range ``[lo, hi)`` a FHIR date, dateTime or instant denotes.

    A value without a zone is China Standard Time. Raises :class:`SearchError` naming
    ``where`` for anything that is not such a value (never echoing it). A value at the
    edge of the calendar (``0001``, ``9999-12-31``) is still a value: its range ends at
    the first or last representable instant rather than past it.
    """
    m = _DATE_RE.match(text)
    if not m:
        raise SearchError("not a FHIR date or dateTime", location=where)
    tz = _CST
    z = m.group("z")
    if z == "Z":
        tz = UTC
    elif z:
        sign = 1 if z[0] == "+" else -1
        hours, minutes = int(z[1:3]), int(z[4:6])
        if hours > 14 or minutes > 59:
            raise SearchError("time zone offset out of range", location=where)
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        y = int(m.group("y"))
        if m.group("m") is None:
            lo = datetime(y, 1, 1, tzinfo=tz)
            return utc(lo), _end(lambda: datetime(y + 1, 1, 1, tzinfo=tz))
        mo = int(m.group("m"))
        if m.group("d") is None:
            lo = datetime(y, mo, 1, tzinfo=tz)
            return utc(lo), _end(lambda: datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=tz))
        d = int(m.group("d"))
        if m.group("H") is None:
            lo = datetime(y, mo, d, tzinfo=tz)
            return utc(lo), shifted(lo, timedelta(days=1))
        hh, mm = int(m.group("H")), int(m.group("M"))
        if m.group("S") is None:
            lo = datetime(y, mo, d, hh, mm, tzinfo=tz)
            return utc(lo), shifted(lo, timedelta(minutes=1))
        ss = int(m.group("S"))
        frac = m.group("f")
        micro = int((frac[1:] + "000000")[:6]) if frac else 0
        lo = datetime(y, mo, d, hh, mm, ss, micro, tzinfo=tz)
        step = timedelta(microseconds=1) if frac else timedelta(seconds=1)
        return utc(lo), shifted(lo, step)
    except ValueError:
        raise SearchError("not a real calendar date or time", location=where) from None


def _end(first_after: Callable[[], datetime]) -> datetime:
    """The first instant after a year or month, in UTC; the calendar's end after 9999."""
    try:
        return utc(first_after())
    except ValueError:  # the year after 9999
        return LATEST


def _value_range(value: Any) -> tuple[datetime, datetime] | None:
    if isinstance(value, str):
        try:
            return date_range(value, where="-")
        except SearchError:
            return None
    if isinstance(value, dict):  # a Period
        start = _value_range(value.get("start")) if value.get("start") else None
        end = _value_range(value.get("end")) if value.get("end") else None
        if start is None and end is None:
            return None
        lo = start[0] if start else datetime(1, 1, 1, tzinfo=UTC)
        hi = end[1] if end else _FOREVER
        return lo, max(hi, lo)
    return None


def resource_date_range(resource: dict[str, Any]) -> tuple[str, str] | None:
    """``[lo, hi)`` of the element behind the type's date parameter, as stored text."""
    spec = DATE_ELEMENTS.get(str(resource.get("resourceType")))
    if spec is None:
        return None
    for element in spec[1]:
        found = _value_range(resource.get(element))
        if found is not None:
            return _text(found[0]), _text(found[1])
    return None


def _date_filter(name: str, raw: str) -> DateFilter:
    prefix = raw[:2]
    if prefix.isalpha():
        if prefix == "ap":
            raise UnsupportedParameter("the ap (approximately) prefix is not supported",
                                       location=name)
        if prefix not in _PREFIXES:
            raise SearchError("unknown date prefix", location=name)
        value = raw[2:]
    else:
        prefix, value = "eq", raw
    lo, hi = date_range(value, where=name)
    return DateFilter(name, prefix, _text(lo), _text(hi))  # type: ignore[arg-type]


# --- parsing -------------------------------------------------------------------------------


#: Names a refusal may repeat: FHIR R4's common search parameters, those of the types
#: served and $everything's (what a client means to send). A name is otherwise what the client wrote, which
#: may be a value: a client that percent-encodes the ``=`` sends
#: ``identifier=SYSTEM|VALUE`` as a name, and ``Patient/ID?VALUE`` sends a bare value.
_NAMEABLE = frozenset({
    "_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_text", "_content",
    "_list", "_has", "_type", "_query", "_filter", "_sort", "_count", "_include",
    "_revinclude", "_summary", "_total", "_elements", "_contained", "_containedType",
    "_format", "_pretty", "_since", "_at", "_cursor",
    "identifier", "patient", "subject", "encounter", "code", "category", "status", "date",
    "name", "family", "given", "birthdate", "gender", "address", "telecom", "phone", "email",
    "active", "organization", "general-practitioner", "link", "deceased",
    "clinical-status", "verification-status", "severity", "onset-date", "abatement-date",
    "recorded-date", "body-site", "evidence", "asserter", "stage",
    "class", "type", "period", "length", "location", "participant", "practitioner",
    "service-provider", "reason-code", "reason-reference", "episode-of-care", "account",
    "diagnosis", "based-on", "performer", "result", "issued", "conclusion", "specimen",
    "value-quantity", "value-concept", "value-string", "value-date", "component-code",
    "combo-code", "combo-value-quantity", "data-absent-reason", "has-member", "derived-from",
    "focus", "method", "device", "medication", "intent", "authoredon", "requester",
    "priority", "author", "title", "section", "attester", "related-id", "related-ref",
    "confidentiality", "description", "relatesto", "security-label", "setting",
    "custodian", "contenttype", "format", "language", "facility", "event", "reason",
    "partof", "instantiates-canonical",
    # Patient/$everything's own parameters in R4.
    "start", "end",
    *(name for params in SEARCH_PARAMS.values() for name in params),
    *EVERYTHING_PARAMS,
})


def param_label(name: str, position: int) -> str:
    """How a refusal names the query parameter ``name`` at ``position`` (from 0): the
    name when it is a search parameter's (a modifier or a chain reduced to the name before
    it), else its position, ``query[N]``: never text of the client's that may be a value
    (PROTOCOL P-PULL-19)."""
    if name in _NAMEABLE:
        return name
    base = re.split(r"[:.]", name, maxsplit=1)[0]
    return base if base in _NAMEABLE else f"query[{position}]"


def _check_names(
    params: Sequence[tuple[str, str]], allowed: dict[str, ParamKind], rtype: str
) -> None:
    for position, (name, _) in enumerate(params):
        base, colon, _modifier = name.partition(":")
        where = param_label(name, position)
        if base == "_revinclude":
            raise UnsupportedParameter("_revinclude is not supported", location=where)
        if colon:
            raise UnsupportedParameter("search modifiers are not supported", location=where)
        if "." in base:
            raise UnsupportedParameter("chained search is not supported", location=where)
        if base not in allowed:
            raise UnsupportedParameter(
                f"search parameter not supported for {rtype}", location=where
            )
    _bound_dates(params, allowed)


#: How often one date parameter may stand in a query. Its values are ANDed: a range is
#: two, and no meaningful query needs more than a few; each is a comparison the store
#: makes, so a query repeating one without bound is refused here, naming it, and never
#: reaches the store. (Other parameters repeat harmlessly: a repeated ``_type`` adds
#: types, a repeated ``patient`` must name the same one.)
MAX_DATE_REPEATS = 8


def _bound_dates(params: Sequence[tuple[str, str]], allowed: dict[str, ParamKind]) -> None:
    seen: dict[str, int] = {}
    for name, _ in params:
        if allowed.get(name) != "date":
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > MAX_DATE_REPEATS:
            raise SearchError(
                f"a date parameter may be given at most {MAX_DATE_REPEATS} times",
                location=name)


def _single(params: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in params if k == name]
    if not values:
        return None
    if len(values) > 1:
        raise SearchError("parameter given more than once", location=name)
    return values[0]


def _count(params: Sequence[tuple[str, str]], *, default: int, limit: int) -> int:
    raw = _single(params, "_count")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
        raise SearchError("_count must be a whole number", location="_count")
    count = int(raw)
    if count < 1:
        raise SearchError("_count must be at least 1 (totals are not offered)",
                          location="_count")
    if count > limit:
        raise SearchError(f"_count may be at most {limit}", location="_count")
    return count


def check_format(params: Sequence[tuple[str, str]]) -> None:
    """Refuse a ``_format`` other than JSON, a ``_pretty`` other than true or false, or
    either given twice (SearchError naming it)."""
    fmt = _single(params, "_format")
    if fmt is not None and fmt not in _FORMATS:
        raise SearchError("only JSON is served", location="_format")
    pretty = _single(params, "_pretty")
    if pretty is not None and pretty not in ("true", "false"):
        raise SearchError("_pretty is true or false", location="_pretty")


def patient_reference(raw: str, *, where: str, base: str | None = None) -> str:
    """The Patient id of a reference search value (``Patient/ID``, ``ID`` or a URL).

    An absolute URL is a reference to a resource on that server: with ``base`` (this
    server's base URL) given, one on any other server is refused, since it names a
    patient this server does not hold.
    """
    value = raw.rstrip("/")
    if "://" in value and base is not None and not value.startswith(base.rstrip("/") + "/"):
        raise SearchError("the reference is to another server", location=where)
    if "/" in value:
        parts = value.split("/")
        if len(parts) < 2 or parts[-2] != "Patient":
            raise SearchError("the reference must be to a Patient", location=where)
        if "://" not in value and len(parts) != 2:
            raise SearchError("the reference must be to a Patient", location=where)
        value = parts[-1]
    if not is_fhir_id(value):
        raise SearchError("not a FHIR id", location=where)
    return value


def check_id(raw: str, *, where: str) -> str:
    """A FHIR id, or SearchError naming ``where``."""
    if not is_fhir_id(raw):
        raise SearchError("not a FHIR id", location=where)
    return raw


def _includes(rtype: str, params: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for name, value in params:
        if name != "_include":
            continue
        source, _, rest = value.partition(":")
        param, _, target = rest.partition(":")
        if source != rtype or (source, param) not in INCLUDES or (
            target and target != INCLUDES[(source, param)]
        ):
            raise UnsupportedParameter("this _include is not supported", location="_include")
        out.append((source, param))
    return tuple(dict.fromkeys(out))


def parse_search(
    rtype: str,
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    offered: Iterable[str] | None = None,
    base: str | None = None,
) -> SearchQuery:
    """Validate ``GET [base]/{rtype}?...``; raise :class:`SearchError` naming the parameter.

    ``offered`` narrows the declared parameters to those the link offers (a date
    parameter whose element the link's profile withholds is not offered); ``base`` is
    this server's base URL, the only one an absolute ``patient`` reference may name.
    """
    declared = SEARCH_PARAMS.get(rtype)
    if declared is None:
        raise UnsupportedParameter("resource type not served", location=rtype)
    allowed = {k: v for k, v in declared.items() if offered is None or k in set(offered)}
    _check_names(params, allowed, rtype)
    check_format(params)
    count = _count(params, default=default_count, limit=max_count)
    cursor = _single(params, "_cursor")
    last_updated = tuple(_date_filter("_lastUpdated", v) for k, v in params if k == "_lastUpdated")
    if rtype == "Patient":
        identifier: tuple[str, str] | None = None
        raw = _single(params, "identifier")
        if raw is not None:
            system, bar, value = raw.partition("|")
            if not bar or not system or not value or "," in raw:
                raise SearchError("identifier takes one SYSTEM|VALUE", location="identifier")
            identifier = (system, value)
        ids: tuple[str, ...] = ()
        raw_id = _single(params, "_id")
        if raw_id is not None:
            ids = (check_id(raw_id, where="_id"),)
        if identifier is None and not ids:
            raise SearchError("a Patient search names the patient (identifier or _id)",
                              location="identifier")
        if identifier is not None and ids:
            # Both would have to match (FHIR ANDs parameters): one patient, named once.
            raise SearchError("a Patient search names the patient once: identifier or _id",
                              location="_id")
        return SearchQuery(
            rtype, "search", count, identifier=identifier, ids=ids,
            last_updated=last_updated, cursor=cursor, params=tuple(params),
        )
    patients = {patient_reference(v, where="patient", base=base)
                for k, v in params if k == "patient"}
    if not patients:
        raise SearchError("a search names its patient (patient=Patient/ID)", location="patient")
    if len(patients) > 1:
        raise SearchError("a search concerns one patient", location="patient")
    date_name = DATE_ELEMENTS[rtype][0]
    dates = tuple(_date_filter(date_name, v) for k, v in params if k == date_name)
    return SearchQuery(
        rtype, "search", count, patient=patients.pop(), dates=dates,
        last_updated=last_updated, includes=_includes(rtype, params), cursor=cursor,
        params=tuple(params),
    )


def parse_everything(
    patient_id: str,
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    types: Iterable[str],
) -> SearchQuery:
    """Validate ``GET [base]/Patient/{id}/$everything?...`` (``types``: what the link serves)."""
    served = set(types)
    _check_names(params, EVERYTHING_PARAMS, "Patient/$everything")
    check_format(params)
    count = _count(params, default=default_count, limit=max_count)
    since = _single(params, "_since")
    last_updated: tuple[DateFilter, ...] = ()
    if since is not None:
        if "T" not in since or not (since.endswith("Z") or re.search(r"[+-][0-9]{2}:[0-9]{2}\Z", since)):
            raise SearchError("_since is an instant with a time zone", location="_since")
        last_updated = (_date_filter("_since", "ge" + since),)
        # ge on an instant: everything updated at or after it.
        last_updated = (DateFilter("_since", "ge", last_updated[0].lo, last_updated[0].lo),)
    wanted: frozenset[str] | None = None
    raw_types = [v for k, v in params if k == "_type"]
    if raw_types:
        names = {t.strip() for raw in raw_types for t in raw.split(",")}
        for name in sorted(names):
            if name not in SERVED_TYPES:
                raise SearchError("_type names a type that is not served", location="_type")
        wanted = frozenset(names & served)
    return SearchQuery(
        "Patient", "everything", count, patient=check_id(patient_id, where="Patient.id"),
        last_updated=last_updated, types=wanted, cursor=_single(params, "_cursor"),
        params=tuple(params),
    )


# --- cursors -------------------------------------------------------------------------------


def encode_cursor(key: bytes, query: SearchQuery, *, snapshot: int, after: int,
                  holder: str = "", expires: float | None = None) -> str:
    """An opaque, authenticated page cursor: the snapshot the traversal reads and the
    position after which the next page starts, bound to this query and to ``holder``
    (who asked and why: a traversal continues for the same partner and purpose only).

    Encrypted (AES-GCM under ``key``), not only authenticated: the snapshot is a position
    in the whole store, and how it grows between two pulls would count what the source
    keeps about other patients.

    ``expires`` (POSIX seconds) is sealed with it: :func:`decode_cursor` refuses the
    cursor after that instant."""
    fields: dict[str, Any] = {"s": snapshot, "a": after, "q": query.fingerprint, "h": holder}
    if expires is not None:
        fields["e"] = int(expires)
    body = orjson.dumps(fields)
    nonce = os.urandom(12)
    sealed = AESGCM(_cursor_aead_key(key)).encrypt(nonce, body, b"pull-cursor")
    return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")


def decode_cursor(key: bytes, query: SearchQuery, *, holder: str = "",
                  now: float | None = None) -> tuple[int, int] | None:
    """``(snapshot, after)`` of the query's cursor (None on a first page), or SearchError.

    With ``now`` (POSIX seconds) a cursor must carry an expiry that has not passed
    (:class:`CursorExpired` otherwise, checked only once the cursor is known to be this
    bridge's, for this query and holder)."""
    token = query.cursor
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raise SearchError("malformed cursor", location="_cursor") from None
    try:
        body = AESGCM(_cursor_aead_key(key)).decrypt(raw[:12], raw[12:], b"pull-cursor")
    except (InvalidTag, ValueError):
        raise SearchError("cursor was not issued by this bridge", location="_cursor") from None
    data = orjson.loads(body)
    if data.get("q") != query.fingerprint:
        raise SearchError("cursor belongs to another query", location="_cursor")
    if data.get("h", "") != holder:
        raise SearchError("cursor was issued for another partner or purpose", location="_cursor")
    if now is not None and not (isinstance(data.get("e"), int) and now <= data["e"]):
        raise CursorExpired("cursor has expired; start again from the first page",
                            location="_cursor")
    return int(data["s"]), int(data["a"])


def _cursor_aead_key(key: bytes) -> bytes:
    """A 256-bit AES key for cursors, derived from the bridge's cursor key."""
    return hashlib.sha256(b"ws-fhir-bridge pull cursor\x00" + key).digest()
