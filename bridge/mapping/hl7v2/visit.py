"""Visit assembly: the messages of one visit in, one data-set record out (pure code).

A front sheet (WS 445.10) or an outpatient record (WS 445.2) is said by the HIS in
several messages over days. ``mappings/hl7v2/visits/<kind>.yaml`` says which messages
belong to a kind of visit, how each is mapped to its *part* of the record, which
message completes the visit and how the parts are put together; the format is in
``mappings/hl7v2/README.md``. This module holds the rule, over plain data:

- :func:`make_part` maps one message to a :class:`VisitPart` (elements, group items,
  signed fee sums, and where each element came from);
- :func:`assemble` puts the parts of one visit together. It sorts them by a total
  order of their own content (event time, message-type precedence, control id), so
  the same set of messages gives the same record whatever order they arrived in, and
  it counts each message once (sender and MSH-10), so a duplicate changes nothing, and
  each charge transaction once (sender, FT1-2 transaction id and FT1-6 type), so a
  DFT^P03 resent under a new MSH-10 changes nothing either;
- :func:`check_filing` refuses a part that cannot belong to the visit as known so far
  (another patient, a discharge before the admission, a message after the visit
  closed, a transaction sent before with another amount or fee row), naming the HL7
  field, and warns of a transaction sent again as it was (counted once);
- :func:`upgrade_part` and :func:`adopt_parts` take over the parts a version without
  transaction ids filed (all their FT1s summed in ``fees``): their transactions are
  re-derived from the stored message, so a transaction resent after the upgrade is
  recognised as a copy.

State (which parts a visit has, whether it is complete) lives in the ledger; nothing
here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from bridge.errors import BridgeError, LoadError, MappingError
from bridge.mapping.hl7v2.engine import (
    MappingContext,
    conflicting_transaction,
    copied_transaction,
    element_label,
    fee_lines,
    holds,
    local_time,
    map_message,
)
from bridge.mapping.hl7v2.message import HL7Message, Loc, hl7_error
from bridge.mapping.hl7v2.schema import check_dtm
from bridge.mapping.hl7v2.spec import (
    MessageMapping,
    When,
    condition_loader,
    hl7_valuesets,
    load_message_mapping,
    shipped_mappings,
)
from bridge.mapping.yamlsrc import SourceMap, load_yaml
from bridge.resources import SHIPPED, MappingFiles

_TOP_KEYS = frozenset({"visit", "title", "dataset", "members", "member_when",
                       "member_when_absent", "parts", "precedence", "number", "completed_by",
                       "completed_when", "admitted", "discharged", "patient", "groups"})
_GROUP_KEYS = frozenset({"kinds", "principal"})


@dataclass(frozen=True)
class GroupRule:
    """How the items of one group are taken from the parts."""

    kinds: tuple[tuple[str, ...], ...]
    principal: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class VisitSpec:
    """A loaded ``visits/<kind>.yaml``."""

    kind: str
    file: str
    title: str
    dataset: str
    members: tuple[str, ...]
    member_when: When | None
    member_when_absent: bool
    parts: dict[str, MessageMapping] = field(hash=False)
    precedence: tuple[str, ...]
    number: str
    completed_by: frozenset[str]
    completed_when: When | None
    admitted: str | None
    discharged: str | None
    patient: tuple[str, ...]
    groups: dict[str, GroupRule] = field(hash=False)

    def label(self, element: str) -> str:
        catalog = next(iter(self.parts.values())).catalog
        return element_label(catalog, element) if catalog is not None else element


def _load_visit(path: Any, files: MappingFiles, valuesets: dict[str, Any],
                own: dict[str, MessageMapping]) -> VisitSpec:
    data = load_yaml(path)
    if not isinstance(data, SourceMap):
        raise LoadError("a visit file is a mapping", location=str(path))
    for key in data:
        if key not in _TOP_KEYS:
            raise LoadError("unknown key", location=data.where(key))

    def text(key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise LoadError("must be a non-empty string",
                            location=data.where(key) if key in data else f"{data.where()} {key}")
        return value

    def types(key: str) -> tuple[str, ...]:
        value = data.get(key)
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and len(v) == 7 and v[3] == "^" for v in value):
            raise LoadError("a non-empty list of message types like ADT^A01",
                            location=data.where(key) if key in data else f"{data.where()} {key}")
        return tuple(value)

    kind = text("visit")
    if kind != path.stem:
        raise LoadError("visit must equal the file name", location=data.where("visit"))
    dataset = text("dataset")
    members = types("members")
    loader = condition_loader(path, valuesets)
    member_when = loader.when(data["member_when"], data.where("member_when")) \
        if data.get("member_when") is not None else None
    absent = data.get("member_when_absent", False)
    if not isinstance(absent, bool):
        raise LoadError("true or false", location=data.where("member_when_absent"))
    raw_parts = data.get("parts")
    if not isinstance(raw_parts, SourceMap):
        raise LoadError("parts maps each member message type to its part file",
                        location=data.where("parts") if "parts" in data else data.where())
    parts: dict[str, MessageMapping] = {}
    for message_type in members:
        name = raw_parts.get(message_type)
        where = raw_parts.where(message_type) if message_type in raw_parts \
            else f"{raw_parts.where()} {message_type}"
        if name == "message":
            spec = own.get(message_type)
            if spec is None or spec.dataset != dataset:
                raise LoadError(f"the message's own mapping does not map to {dataset}",
                                location=where)
        elif isinstance(name, str) and name.endswith(".yaml") and "/" not in name:
            part_path = files.file(f"hl7v2/visits/{name}")
            if not part_path.is_file():
                raise LoadError("no such part file in hl7v2/visits", location=where)
            spec = load_message_mapping(part_path, valuesets, part=True)
            if spec.dataset != dataset or message_type not in spec.message_types:
                raise LoadError(f"the part file must map {message_type} to {dataset}",
                                location=where)
        else:
            raise LoadError("a part file name in hl7v2/visits, or message", location=where)
        parts[message_type] = spec
    for key in raw_parts:
        if key not in members:
            raise LoadError("not one of the members", location=raw_parts.where(key))
    precedence = types("precedence")
    if sorted(precedence) != sorted(members):
        raise LoadError("lists every member once", location=data.where("precedence"))
    catalog = next(iter(parts.values())).catalog
    assert catalog is not None

    def element(key: str, *, optional: bool = False) -> str | None:
        value = data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in catalog.elements:
            raise LoadError(f"an element of {dataset}",
                            location=data.where(key) if key in data else f"{data.where()} {key}")
        return value

    number = element("number")
    assert number is not None
    completed_by = frozenset(types("completed_by")) if "completed_by" in data else frozenset()
    completed_when = loader.when(data["completed_when"], data.where("completed_when")) \
        if "completed_when" in data else None
    if not completed_by and completed_when is None:
        raise LoadError("a visit needs completed_by or completed_when", location=data.where())
    patient = data.get("patient", [])
    if not isinstance(patient, list) or not all(
            isinstance(p, str) and p in catalog.elements for p in patient):
        raise LoadError(f"a list of elements of {dataset}", location=data.where("patient"))
    groups: dict[str, GroupRule] = {}
    raw_groups = data.get("groups") or SourceMap()
    if not isinstance(raw_groups, SourceMap):
        raise LoadError("groups is a mapping", location=data.where("groups"))
    for name, gdata in raw_groups.items():
        if not isinstance(gdata, SourceMap) or set(gdata) - _GROUP_KEYS:
            raise LoadError("a group takes kinds and principal", location=raw_groups.where(name))
        kinds = gdata.get("kinds")
        if not isinstance(kinds, list) or not kinds or not all(
                isinstance(k, list) and k and all(isinstance(e, str) and e in catalog.elements
                                                  for e in k) for k in kinds):
            raise LoadError(f"kinds is a list of lists of elements of {dataset}",
                            location=gdata.where("kinds") if "kinds" in gdata else gdata.where())
        principal = gdata.get("principal") or {}
        if not isinstance(principal, dict) or not all(
                k in catalog.elements and v in catalog.elements for k, v in principal.items()):
            raise LoadError(f"principal maps elements of {dataset} to elements",
                            location=gdata.where("principal"))
        groups[name] = GroupRule(tuple(tuple(k) for k in kinds), dict(principal))
    return VisitSpec(
        kind=kind, file=str(path), title=text("title"), dataset=dataset, members=members,
        member_when=member_when, member_when_absent=absent, parts=parts,
        precedence=precedence, number=number, completed_by=completed_by,
        completed_when=completed_when, admitted=element("admitted", optional=True),
        discharged=element("discharged", optional=True), patient=tuple(patient),
        groups=groups)


@lru_cache(maxsize=8)
def load_visits(files: MappingFiles = SHIPPED) -> dict[str, VisitSpec]:
    """Every visit file in ``hl7v2/visits`` (a site's on top), keyed by kind."""
    valuesets = hl7_valuesets(files)
    own = shipped_mappings(files)
    visits: dict[str, VisitSpec] = {}
    part_files: set[str] = set()
    for path in files.folder("hl7v2/visits"):
        data = load_yaml(path)
        if isinstance(data, SourceMap) and "mapping" in data:
            part_files.add(path.name)
            continue
        spec = _load_visit(path, files, valuesets, own)
        visits[spec.kind] = spec
    for kind, spec in visits.items():
        for other in visits.values():
            if other.kind < kind and set(other.members) & set(spec.members) \
                    and (other.member_when is None or spec.member_when is None):
                raise LoadError("two visit kinds claim the same message types without "
                                "member_when", location=spec.file)
    return visits


def member_of(visits: dict[str, VisitSpec], message_type: str,
              msg: HL7Message) -> VisitSpec | None:
    """The kind of visit ``msg`` belongs to, or None."""
    ctx = MappingContext(msg)
    for spec in visits.values():
        if message_type not in spec.members:
            continue
        when = spec.member_when
        if when is None:
            return spec
        if not ctx.read(when.path)[0]:
            if spec.member_when_absent:
                return spec
            continue
        if holds(when, ctx):
            return spec
    return None


# --- parts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisitPart:
    """What one message contributes to its visit (JSON-serialisable; see :meth:`to_json`)."""

    kind: str
    facility: str
    number: str
    sender: str
    control_id: str
    message_type: str
    event_time: str  # YYYYMMDDHHMMSS, China Standard Time
    completes: bool
    elements: dict[str, str]
    groups: dict[str, list[dict[str, str]]]
    fees: dict[str, str]  # element -> signed sum of the FT1s without FT1-2, two decimals
    provenance: dict[str, str]  # element (or "$.groups.g[i] element") -> HL7 location
    # The FT1s with a transaction id, each counted once per visit and sender:
    # {"id": FT1-2, "type": CG|CD|AJ, "amount": signed, "rows": [elements], "at": Loc}.
    charges: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> VisitPart:
        return cls(**orjson.loads(data))

    @property
    def identity(self) -> tuple[str, str]:
        return (self.sender, self.control_id)


def event_time(msg: HL7Message) -> str:
    """EVN-2 (recorded date/time), else MSH-7, as ``YYYYMMDDHHMMSS`` in China Standard Time."""
    for path in ("EVN-2", "MSH-7"):
        value = msg.get(path).strip()
        if value and check_dtm(value):
            return local_time(value).strftime("%Y%m%d%H%M%S")
    return ""


def _fees(mapping: MessageMapping, msg: HL7Message, context: dict[str, str],
          trace: dict[str, str], warnings: list[str] | None,
          ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The signed sums of ``msg``'s FT1s without a transaction id, and its transactions."""
    fees: dict[str, str] = {}
    charges: list[dict[str, Any]] = []
    if mapping.sums is None:
        return fees, charges
    totals: dict[str, Decimal] = {}
    copies: list[Any] = []
    for line in fee_lines(mapping.sums, MappingContext(msg, None, context), copies=copies):
        if line.transaction:
            charges.append({"id": line.transaction, "type": line.kind,
                            "amount": format(line.amount, "f"), "rows": list(line.rows),
                            "at": list(line.where)})
        else:
            for row in line.rows:
                totals[row] = totals.get(row, Decimal(0)) + line.amount
        for row in line.rows:
            trace.setdefault(row, f"{mapping.sums.segment}-{mapping.sums.amount.field}")
    if warnings is not None:
        warnings.extend(copied_transaction(mapping.sums, line.where) for line in copies)
    fees = {e: format(v.quantize(Decimal("0.01")), "f") for e, v in totals.items()}
    return fees, charges


def make_part(spec: VisitSpec, msg: HL7Message, message_type: str, *, sender: str,
              facility: str, context: dict[str, str],
              warnings: list[str] | None = None) -> VisitPart:
    """Map ``msg`` to its part of a ``spec`` visit; refusals name the HL7 field.

    A transaction repeated as it was within ``msg`` is counted once and, with
    ``warnings`` (a list), said there (``location 205 transaction-counted: text``).
    """
    mapping = spec.parts[message_type]
    trace: dict[str, str] = {}
    record = map_message(mapping, msg, context=context, trace=trace, sums=False)
    fees, charges = _fees(mapping, msg, context, trace, warnings)
    number = record["elements"].get(spec.number)
    if not number:  # pragma: no cover - the part files require the number
        raise hl7_error(MappingError, f"required for {spec.label(spec.number)} but missing",
                        Loc("PV1", 1, 19), "101")
    completes = message_type in spec.completed_by or (
        spec.completed_when is not None and holds(spec.completed_when, MappingContext(msg)))
    return VisitPart(
        kind=spec.kind, facility=facility, number=str(number), sender=sender,
        control_id=msg.control_id, message_type=message_type, event_time=event_time(msg),
        completes=completes, elements={k: str(v) for k, v in record["elements"].items()},
        groups=record["groups"], fees=fees, provenance=trace, charges=charges)


def upgrade_part(spec: VisitSpec, part: VisitPart, msg: HL7Message | None) -> VisitPart | None:
    """``part`` as filed by a version that kept no transactions (every FT1 summed in
    ``fees``), with its transactions re-derived from ``msg``, the message it was made
    of; None when they cannot be: the message is gone or no longer maps, or it maps to
    other sums than the part was filed with (the charge-item table changed since).
    """
    mapping = spec.parts.get(part.message_type)
    if mapping is None or mapping.sums is None:
        return replace(part, charges=[])
    if msg is None:
        return None
    try:
        fees, charges = _fees(mapping, msg, {}, {}, None)
    except BridgeError:
        return None
    derived = {e: Decimal(v) for e, v in fees.items()}
    for charge in charges:
        for row in charge["rows"]:
            derived[row] = derived.get(row, Decimal(0)) + Decimal(charge["amount"])
    cent = Decimal("0.01")
    if any(Decimal(part.fees.get(e, "0")).quantize(cent) != derived.get(e, Decimal(0))
           .quantize(cent) for e in set(part.fees) | set(derived)):
        return None
    return replace(part, fees=fees, charges=charges)


def adopt_parts(summary: VisitSummary, parts: list[tuple[VisitPart, VisitPart | None]],
                ) -> tuple[VisitSummary, list[VisitPart | None]]:
    """A visit a version without transaction ids filed, taken over.

    ``parts`` are its parts in the order they were filed, each with its
    :func:`upgrade_part` (None when it could not be upgraded). Returns the summary with
    every transaction known, and per part the part to store instead (None: it stays as
    filed, its FT1s counted once per message as before). A part whose transactions
    contradict one filed before it (the same FT1-2 and type with another amount or fee
    row, which that version took) stays as filed too, so no amount it was counted with
    is dropped; a part repeating them as they were is upgraded, and each transaction is
    then counted once.
    """
    after = replace(summary, patient=dict(summary.patient), charges=dict(summary.charges))
    out: list[VisitPart | None] = []
    for _filed, upgraded in parts:
        if upgraded is None:
            out.append(None)
            continue
        said = {f"{upgraded.sender}\x1f{c['id']}\x1f{c['type']}": [str(c["amount"]), *c["rows"]]
                for c in upgraded.charges}
        if any(key in after.charges and not _same(after.charges[key], value)
               for key, value in said.items()):
            out.append(None)
            continue
        for key, value in said.items():
            after.charges.setdefault(key, value)
        out.append(upgraded)
    return after, out


def _same(filed: list[str], said: list[str]) -> bool:
    return Decimal(filed[0]) == Decimal(said[0]) and filed[1:] == said[1:]


# --- assembly ------------------------------------------------------------------------------


def _order(spec: VisitSpec, parts: list[VisitPart]) -> list[VisitPart]:
    unique = {p.identity: p for p in sorted(parts, key=lambda p: p.identity)}

    def key(p: VisitPart) -> tuple[str, int, str, str]:
        rank = spec.precedence.index(p.message_type) if p.message_type in spec.precedence \
            else -1
        return (p.event_time, rank, p.control_id, p.sender)

    return sorted(unique.values(), key=key)


def assemble(spec: VisitSpec, parts: list[VisitPart]) -> tuple[dict[str, Any], dict[str, str]]:
    """The record of a visit from its parts, and where each element came from.

    Independent of the order of ``parts`` and of duplicates among them (see the module
    docstring for the rule).
    """
    ordered = _order(spec, parts)
    elements: dict[str, str] = {}
    provenance: dict[str, str] = {}
    for part in ordered:
        for eid, value in part.elements.items():
            elements[eid] = value
            provenance[eid] = f"{part.message_type} {part.control_id} " \
                              f"{part.provenance.get(eid, '')}".rstrip()
        for eid, where in part.provenance.items():
            if not eid.startswith("$.") and eid not in elements:
                provenance.setdefault(eid, f"{part.message_type} {where}")
    fees: dict[str, Decimal] = {}
    counted: set[tuple[str, str, str]] = set()
    for part in ordered:
        for eid, amount in part.fees.items():
            fees[eid] = fees.get(eid, Decimal(0)) + Decimal(amount)
            provenance[eid] = f"{part.message_type} {part.provenance.get(eid, '')}".rstrip()
        for charge in part.charges:
            # A transaction is counted once, from the first part that carries it: filing
            # refused any copy that says otherwise (check_filing).
            key = (part.sender, str(charge["id"]), str(charge["type"]))
            if key in counted:
                continue
            counted.add(key)
            for eid in charge["rows"]:
                fees[eid] = fees.get(eid, Decimal(0)) + Decimal(charge["amount"])
                provenance[eid] = f"{part.message_type} " \
                                  f"{part.provenance.get(eid, '')}".rstrip()
    for eid, total in fees.items():
        elements[eid] = format(total.quantize(Decimal("0.01")), "f")
    groups: dict[str, list[dict[str, str]]] = {}
    for name, rule in spec.groups.items():
        items: list[dict[str, str]] = []
        for kind in rule.kinds:
            source: VisitPart | None = None
            for part in ordered:
                if any(any(e in item for e in kind) for item in part.groups.get(name, [])):
                    source = part
            if source is None:
                continue
            chosen = [(i, item) for i, item in enumerate(source.groups.get(name, []))
                      if any(e in item for e in kind)]
            if rule.principal and not any(kind[0] in item for _, item in chosen):
                # No item names the main one: the first of the others is.
                for i, (index, item) in enumerate(chosen):
                    if any(e in rule.principal for e in item):
                        chosen[i] = (index, {rule.principal.get(e, e): v
                                             for e, v in item.items()})
                        break
            for index, item in chosen:
                position = len(items)
                for eid in item:
                    where = source.provenance.get(f"$.groups.{name}[{index}] {eid}", "")
                    provenance[f"$.groups.{name}[{position}] {eid}"] = \
                        f"{source.message_type} {source.control_id} {where}".rstrip()
                items.append(dict(item))
        if items:
            groups[name] = items
    return {"dataset": spec.dataset, "elements": elements, "groups": groups}, provenance


def is_complete(parts: list[VisitPart]) -> bool:
    return any(p.completes for p in parts)


# --- filing ---------------------------------------------------------------------------------


@dataclass
class VisitSummary:
    """What filing checks need to know of a visit so far (kept sealed in the store)."""

    number: str
    patient: dict[str, str] = field(default_factory=dict)
    admitted: str | None = None
    discharged: str | None = None
    completed: bool = False
    # Each charge transaction filed so far ("sender\x1fFT1-2\x1ftype") -> [amount, rows...].
    charges: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> VisitSummary:
        return cls(**orjson.loads(data))


def _where(part: VisitPart, element: str, fallback: Loc) -> Loc | str:
    text = part.provenance.get(element)
    return text if text else fallback


def check_filing(spec: VisitSpec, summary: VisitSummary | None, part: VisitPart, *,
                 correction_days: int, warnings: list[str] | None = None) -> VisitSummary:
    """Check ``part`` against the visit as known so far; return the visit after it.

    Refused (``MappingError`` with the HL7 location and table 0357 code): a part naming
    another patient than the visit's earlier messages; a discharge before the visit's
    admission or an admission after its discharge; any message dated more than
    ``correction_days`` after the visit's discharge (the visit is closed); a charge
    transaction (FT1-2 and FT1-6, from the same sender) filed before with another amount
    or fee row (205, naming FT1-2). A transaction filed before as it is now is a copy,
    counted once: with ``warnings`` (a list) that is said there, naming FT1-2, so a
    sender that meant a new transaction learns that it needs its own FT1-2.
    """
    after = VisitSummary(number=part.number) if summary is None else VisitSummary(
        summary.number, dict(summary.patient), summary.admitted, summary.discharged,
        summary.completed, dict(summary.charges))
    for element in spec.patient:
        value = part.elements.get(element)
        known = after.patient.get(element)
        if value and known and value != known:
            raise hl7_error(MappingError, f"this visit belongs to another patient: "
                            f"{spec.label(element)} differs from the visit's earlier messages",
                            _where(part, element, Loc("PID", 1, 3)), "204")
    admitted = part.elements.get(spec.admitted) if spec.admitted else None
    discharged = part.elements.get(spec.discharged) if spec.discharged else None
    if discharged and after.admitted and discharged < after.admitted:
        raise hl7_error(MappingError, f"discharge before the visit's admission "
                        f"({spec.label(spec.discharged or '')})",
                        _where(part, spec.discharged or "", Loc("PV1", 1, 45)), "102")
    if admitted and after.discharged and admitted > after.discharged:
        raise hl7_error(MappingError, f"admission after the visit's discharge "
                        f"({spec.label(spec.admitted or '')})",
                        _where(part, spec.admitted or "", Loc("PV1", 1, 44)), "102")
    closing = discharged or after.discharged
    if closing and part.event_time and correction_days >= 0:
        closed = datetime.strptime(closing, "%Y%m%dT%H%M%S") + timedelta(days=correction_days)
        if datetime.strptime(part.event_time[:14].ljust(14, "0"), "%Y%m%d%H%M%S") > closed:
            raise hl7_error(MappingError, f"the visit closed {correction_days} days after "
                            "its discharge; corrections after that are not taken",
                            Loc("MSH", 1, 7), "102")
    sums = spec.parts[part.message_type].sums if part.message_type in spec.parts else None
    for charge in part.charges:
        key = f"{part.sender}\x1f{charge['id']}\x1f{charge['type']}"
        said = [str(charge["amount"]), *charge["rows"]]
        filed = after.charges.get(key)
        if filed is None:
            after.charges[key] = said
            continue
        assert sums is not None
        if not _same(filed, said):
            raise conflicting_transaction(sums, Loc(*charge["at"]))
        if warnings is not None:
            warnings.append(copied_transaction(sums, Loc(*charge["at"])))
    for element in spec.patient:
        if part.elements.get(element):
            after.patient.setdefault(element, part.elements[element])
    if admitted:
        after.admitted = min(after.admitted or admitted, admitted)
    if discharged:
        after.discharged = max(after.discharged or discharged, discharged)
    after.completed = after.completed or part.completes
    return after
