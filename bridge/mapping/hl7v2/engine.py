"""Applying a message mapping: HL7 v2 message -> DE record.

Values are read lazily from the split message, transformed by the closed registry of
:data:`~bridge.mapping.hl7v2.spec.TRANSFORMS`, and checked against the target data set's
declared formats. Every refusal names the HL7 location (``PID[1]-7``), never the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.hl7v2.message import HL7Message, Loc, Segment, hl7_error
from bridge.mapping.hl7v2.schema import check_dtm, segment_spec
from bridge.mapping.hl7v2.spec import (
    ElementRules,
    MessageMapping,
    Path_,
    Rule,
    SumSpec,
    When,
)
from bridge.records.catalog import DatasetCatalog

CST = timezone(timedelta(hours=8))


def _repeats(version: str, segment: str, field: int) -> bool:
    spec = segment_spec(version, segment)
    if spec is None or field > len(spec.fields):
        return False
    return spec.fields[field - 1].repeats


class _Ctx:
    """The message being mapped and, inside a group, the current segment.

    ``context`` holds the values ``{context: ...}`` rules take from the caller;
    ``trace`` (when given) collects, per data element, the HL7 location its value was
    read from or, when it stayed empty, the first place it was looked for, so that a
    later refusal about the element can name the HL7 field.
    """

    __slots__ = ("context", "msg", "segment", "trace", "version")

    def __init__(self, msg: HL7Message, segment: Segment | None = None,
                 context: dict[str, str] | None = None,
                 trace: dict[str, str] | None = None) -> None:
        self.msg = msg
        self.version = msg.version
        self.segment = segment
        self.context = context or {}
        self.trace = trace

    def inner(self, segment: Segment) -> _Ctx:
        return _Ctx(self.msg, segment, self.context, self.trace)

    def loc(self, seg: Segment | None, path: Path_, rep: int) -> Loc:
        name = seg.name if seg is not None else path.segment
        seg_rep = seg.rep if seg is not None else 1
        field_rep = rep if _repeats(self.version, path.segment, path.field) else 0
        return Loc(name, seg_rep, path.field, field_rep, path.component, path.subcomponent)

    def segments(self, name: str) -> list[Segment]:
        if self.segment is not None and self.segment.name == name:
            return [self.segment]
        return self.msg.segment_list(name)

    def read(self, path: Path_, seg: Segment | None = None, rep: int = 1) -> tuple[str, _Where]:
        """The value at ``path`` (first segment repetition unless ``seg``) and where it is.

        The location is kept as a lazy :class:`_Where`; a :class:`Loc` is only built when
        an error names it.
        """
        if seg is None:
            segs = self.segments(path.segment)
            seg = segs[0] if segs else None
        if seg is None:
            return "", _Where(self, None, path, rep)
        value = seg.value(path.field, rep, path.component or 1, path.subcomponent or 1)
        if value == '""':  # HL7 "explicitly null"
            value = ""
        return value.strip(), _Where(self, seg, path, rep)

    def locate(self, rule: Rule) -> tuple[Segment | None, int]:
        """The segment repetition and field repetition a rule reads (after ``select``)."""
        path = rule.paths[0]
        segs = self.segments(path.segment)
        if not segs:
            return None, 1
        sel = rule.select
        if sel is None:
            return segs[0], 1
        if sel.path.field == path.field:
            for seg in segs:
                for rep in range(1, len(seg.repetitions(path.field)) + 1):
                    value = seg.value(sel.path.field, rep, sel.path.component or 1,
                                      sel.path.subcomponent or 1)
                    if value in sel.values:
                        return seg, rep
                if self.segment is not None:
                    break
            return None, 1
        for seg in segs:
            value = seg.value(sel.path.field, 1, sel.path.component or 1, sel.path.subcomponent or 1)
            if value in sel.values:
                return seg, 1
        return None, 1


class _Where:
    """Where a value was read; becomes a :class:`Loc` only when an error needs it."""

    __slots__ = ("ctx", "path", "rep", "seg")

    def __init__(self, ctx: _Ctx, seg: Segment | None, path: Path_, rep: int) -> None:
        self.ctx, self.seg, self.path, self.rep = ctx, seg, path, rep

    def loc(self) -> Loc:
        return self.ctx.loc(self.seg, self.path, self.rep)


def _holds(when: When | None, ctx: _Ctx) -> bool:
    """Whether a condition holds: ``in``/``present`` if any repetition of the field
    satisfies it, ``not_in`` if none of its values is listed (an absent field included),
    a list of conditions if every one holds."""
    if when is None:
        return True
    if when.all_of:
        return all(_holds(w, ctx) for w in when.all_of)
    segs = ctx.segments(when.path.segment)
    seg = segs[0] if segs else None
    count = len(seg.repetitions(when.path.field)) if seg is not None else 0
    values = ([ctx.read(when.path, seg, r)[0] for r in range(1, count + 1)] if count > 1
              else [ctx.read(when.path)[0]])
    if when.not_within is not None:
        return not any(v in when.not_within for v in values if v)
    return any(_test(when, v) for v in values)


def _test(when: When, value: str) -> bool:
    if when.present is not None:
        return bool(value) == when.present
    assert when.within is not None
    return value in when.within


def _dt15(value: str, loc: _Where) -> str:
    if not check_dtm(value) or len(value.split("+")[0].split("-")[0].split(".")[0]) < 12:
        raise hl7_error(MappingError, "date/time needs at least YYYYMMDDHHMM", loc.loc(), "102")
    try:
        local = _local(value)
    except OverflowError:  # year 1 or 9999 in a zone that moves it off the calendar
        raise hl7_error(MappingError, "date/time falls outside the calendar in China Standard"
                        " Time", loc.loc(), "102") from None
    return local.strftime("%Y%m%dT%H%M%S")


def _local(value: str) -> datetime:
    """An HL7 TS as a naive China Standard Time ``datetime``."""
    offset = None
    body = value
    for sign in ("+", "-"):
        if sign in value[4:]:
            body, _, zone = value.rpartition(sign)
            minutes = int(zone[:2]) * 60 + int(zone[2:4])
            offset = timezone(timedelta(minutes=minutes if sign == "+" else -minutes))
            break
    body = body.split(".")[0]
    parts = [int(body[:4]), int(body[4:6] or 1), int(body[6:8] or 1),
             int(body[8:10] or 0), int(body[10:12] or 0), int(body[12:14] or 0)]
    moment = datetime(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5])
    if offset is not None:
        moment = moment.replace(tzinfo=offset).astimezone(CST).replace(tzinfo=None)
    return moment


def _d8(value: str, loc: _Where) -> str:
    if not check_dtm(value) or len(value) < 8 or not value[:8].isdigit():
        raise hl7_error(MappingError, "date needs YYYYMMDD", loc.loc(), "102")
    return value[:8]


def _apply(rule: Rule, ctx: _Ctx) -> tuple[str | None, _Where | None]:
    """Run one rule: the value it yields (``None`` when it yields nothing) and where from."""
    if not _holds(rule.when, ctx):
        return None, None
    if rule.context is not None:
        return ctx.context.get(rule.context) or None, None
    if rule.value is not None:
        return rule.value, None
    seg, rep = ctx.locate(rule)
    if rule.select is not None and seg is None:
        return None, _Where(ctx, None, rule.paths[0], 1)
    if rule.transform == "concat":
        parts = [ctx.read(p, seg, rep) for p in rule.paths]
        text = "".join(v for v, _ in parts)
        return (text or None), parts[0][1]
    value, loc = ctx.read(rule.paths[0], seg, rep)
    if not value:
        return None, loc
    t = rule.transform
    if t == "string":
        return value, loc
    if t == "ts_to_dt15":
        return _dt15(value, loc), loc
    if t == "ts_to_d8":
        return _d8(value, loc), loc
    if t == "decimal":
        try:
            number = Decimal(value)
        except InvalidOperation:
            raise hl7_error(MappingError, "not a number", loc.loc(), "102") from None
        if not number.is_finite():
            raise hl7_error(MappingError, "not a number", loc.loc(), "102")
        return format(number.normalize() if number == number.to_integral_value()
                      else number, "f"), loc
    if t == "code":
        assert rule.valueset is not None
        concept = rule.valueset.concepts.get(value)
        if concept is None:
            try:
                concept = rule.valueset.lookup(value, location=rule.where)
            except MappingError:
                raise hl7_error(MappingError, f"code not in value set {rule.valueset.id}",
                                loc.loc(), "103") from None
        return (concept.target or concept.code), loc
    if t == "age_years":
        birth = _d8(value, loc)
        at_value = ""
        at_loc = loc
        for p in rule.at:
            at_value, at_loc = ctx.read(p)
            if at_value:
                break
        if not at_value:
            return None, loc
        when = _d8(at_value, at_loc)
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
        w = date(int(when[:4]), int(when[4:6]), int(when[6:]))
        years = w.year - b.year - ((w.month, w.day) < (b.month, b.day))
        if years < 0:
            raise hl7_error(MappingError, "birth date after the reference date", loc.loc(), "102")
        return str(years), loc
    if t == "stay_days":
        end = _local(_dt15_checked(value, loc))
        start_value, start_loc = "", loc
        for p in rule.at:
            start_value, start_loc = ctx.read(p)
            if start_value:
                break
        if not start_value:
            return None, loc
        start = _local(_dt15_checked(start_value, start_loc))
        days = (end.date() - start.date()).days
        if days < 0:
            raise hl7_error(MappingError, "discharge before admission", loc.loc(), "102")
        # A stay that begins and ends on one day counts as one day.
        return str(max(days, 1)), loc
    raise AssertionError(f"transform {t} not implemented")  # pragma: no cover - load checks


def _dt15_checked(value: str, loc: _Where) -> str:
    _dt15(value, loc)
    return value


def _apply_in_every(rule: Rule, ctx: _Ctx, element: str) -> tuple[str | None, _Where | None]:
    """Run a ``same_in_every`` rule on each repetition of its segment.

    The data element holds one value for the whole record, while the message may say it
    once per order or item (ORC-4 per order, RXR per drug). Equal values are that value;
    a repetition that differs from the first (a value against none included) is refused
    naming its location, rather than keeping the first one silently.
    """
    segment = rule.paths[0].segment
    first: tuple[str | None, _Where | None] | None = None
    for seg in _in_every(rule, ctx.msg):
        if isinstance(seg, Loc):  # an ``each`` segment followed by none of the rule's
            value, loc, where = None, None, seg
        else:
            value, loc = _apply(rule, ctx.inner(seg))
            value = value or None
            where = loc.loc() if loc is not None else Loc(segment, seg.rep, rule.paths[0].field)
        if first is None:
            first = (value, loc)
        elif value != first[0]:
            what = (f"{where.segment}[{where.seg_rep}] has no {segment}"
                    if isinstance(seg, Loc) else f"differs between {segment} segments")
            raise hl7_error(MappingError, f"{what}, but {element} holds one value for the "
                            "whole record", where, "100" if isinstance(seg, Loc) else "102")
    return first if first is not None else (None, None)


def _in_every(rule: Rule, msg: HL7Message) -> list[Segment | Loc]:
    """The segments a ``same_in_every`` rule reads, in message order.

    With ``each``, the rule's segments that follow each repetition of that segment (up to
    the next one or a segment in ``until``); an ``each`` segment followed by none stands
    as its own location, so that a drug without RXR is not given another drug's route.
    """
    segment = rule.paths[0].segment
    if rule.each is None:
        return list(msg.segment_list(segment))
    out: list[Segment | Loc] = []
    current: Segment | None = None
    found = False
    for seg in msg.segments:
        if seg.name == rule.each or seg.name in rule.until:
            if current is not None and not found:
                out.append(Loc(current.name, current.rep))
            current, found = (seg if seg.name == rule.each else None), False
        elif seg.name == segment and current is not None:
            out.append(seg)
            found = True
    if current is not None and not found:
        out.append(Loc(current.name, current.rep))
    return out


def element_label(catalog: DatasetCatalog, element: str) -> str:
    """``HDSD00.11.140 住院号``: the element id with its name, for refusals."""
    found = catalog.elements.get(element)
    return f"{element} {found.name}" if found is not None else element


def _first_path_loc(er: ElementRules, ctx: _Ctx) -> Loc | None:
    rule = next((r for r in er.rules if r.paths), None)
    return ctx.loc(None, rule.paths[0], 1) if rule is not None else None


def _element(er: ElementRules, ctx: _Ctx, catalog: DatasetCatalog,
             key: str | None = None) -> str | None:
    first_loc: _Where | None = None
    for rule in er.rules:
        if rule.same_in_every:
            value, loc = _apply_in_every(rule, ctx, er.element)
        else:
            value, loc = _apply(rule, ctx)
        if first_loc is None and loc is not None:
            first_loc = loc
        if value is None or value == "":
            continue
        if ctx.trace is not None:
            where = loc.loc() if loc is not None else _first_path_loc(er, ctx)
            ctx.trace[key or er.element] = str(where) if where is not None else "MSH"
        try:
            return catalog.elements[er.element].check(value, location=er.element)
        except MappingError as exc:
            raise hl7_error(MappingError,
                            f"{exc.message} for {element_label(catalog, er.element)}",
                            loc.loc() if loc is not None else Loc("MSH"), "102") from None
    where = first_loc.loc() if first_loc is not None else _first_path_loc(er, ctx)
    if ctx.trace is not None and where is not None:
        ctx.trace.setdefault(key or er.element, str(where))
    if er.required:
        why = f": {er.why}" if er.why else ""
        looked = [r.paths[0].text for r in er.rules if r.paths and r.paths[0].text]
        at = f" (looked for at {', '.join(dict.fromkeys(looked))})" if len(looked) > 1 else ""
        raise hl7_error(MappingError,
                        f"required for {element_label(catalog, er.element)} but missing"
                        f"{at}{why}", where or Loc("MSH"), "101")
    return None


@dataclass(frozen=True, slots=True)
class FeeLine:
    """One fee segment as counted: the rows its amount adds to, signed.

    ``transaction`` is the sender's transaction id (``FT1-2``, when the mapping's sums name
    one and the segment carries it) and ``kind`` its table 0017 type (``CG``, ``CD``,
    ``AJ``): together they identify the transaction, so a copy of it is counted once.
    """

    transaction: str
    kind: str
    rows: tuple[str, ...]
    amount: Decimal
    where: Loc  # the transaction id's field (the segment when there is none)

    def same(self, other: FeeLine) -> bool:
        return self.rows == other.rows and self.amount == other.amount


def fee_lines(spec: SumSpec, ctx: _Ctx, *,
              copies: list[FeeLine] | None = None) -> list[FeeLine]:
    """The counted fee segments of one message, a repeated transaction once.

    The fee class comes from the category (``FT1-7.1``, the charge item) through the
    charge-item table and the fee-class table; the transaction type (``FT1-6``, HL7 table
    0017) decides the sign: a charge adds, a credit subtracts its amount whatever sign it
    was sent with, an adjustment adds as signed, a payment is not a charge. An "of
    which" row also adds to its parent row; the grand total (``total``) counts each
    amount once. A segment repeating the transaction id and type of an earlier one is
    the same transaction: left out when it says the same (and appended to ``copies``,
    so the sender can be told), refused (table 0357 code 205) when its amount or fee row
    differs.
    """
    lines: list[FeeLine] = []
    seen: dict[tuple[str, str], FeeLine] = {}
    for seg in ctx.msg.segment_list(spec.segment):
        inner = ctx.inner(seg)
        if not _holds(spec.when, inner):
            continue
        kind = "CG"
        if spec.transaction is not None:
            code, tloc = inner.read(spec.transaction, seg)
            if not code:
                raise hl7_error(MappingError, "transaction type (HL7 table 0017) missing: "
                                "needed to add or subtract the amount", tloc.loc(), "101")
            assert spec.transaction_valueset is not None
            tconcept = spec.transaction_valueset.concepts.get(code)
            if tconcept is None:
                raise hl7_error(MappingError, "transaction type not in value set "
                                f"{spec.transaction_valueset.id} (CG, CD, AJ, PY)",
                                tloc.loc(), "103")
            kind = tconcept.target or tconcept.code
            if kind == "PY":
                continue
        code, cloc = inner.read(spec.category, seg)
        amount_text, aloc = inner.read(spec.amount, seg)
        if not code:
            raise hl7_error(MappingError, "charge item missing: needed for the fee class of "
                            "the front sheet's fee rows", cloc.loc(), "101")
        if not amount_text:
            raise hl7_error(MappingError, "amount missing: needed for the fee rows",
                            aloc.loc(), "101")
        concept = spec.valueset.concepts.get(code)
        element = spec.element_for(concept.target or concept.code) if concept else None
        if element is None:
            raise hl7_error(MappingError, f"charge item not in value set {spec.valueset.id}: "
                            "its fee class (and front-sheet fee row) is unknown",
                            cloc.loc(), "103")
        try:
            amount = Decimal(amount_text)
        except InvalidOperation:
            raise hl7_error(MappingError, "amount is not a number", aloc.loc(), "102") from None
        if not amount.is_finite():
            raise hl7_error(MappingError, "amount is not a number", aloc.loc(), "102")
        if kind == "CD":
            amount = -abs(amount)
        transaction, where = "", Loc(seg.name, seg.rep)
        if spec.transaction_id is not None:
            transaction, iloc = inner.read(spec.transaction_id, seg)
            where = iloc.loc()
        parent = spec.within.get(element)
        rows = (element,) + ((parent,) if parent is not None else ()) \
            + ((spec.total,) if spec.total else ())
        line = FeeLine(transaction, kind, rows, amount, where)
        if transaction:
            earlier = seen.get((transaction, kind))
            if earlier is not None:
                if not earlier.same(line):
                    raise conflicting_transaction(spec, where)
                if copies is not None:
                    copies.append(line)
                continue
            seen[(transaction, kind)] = line
        lines.append(line)
    return lines


def conflicting_transaction(spec: SumSpec, where: Loc | str) -> MappingError:
    """The refusal of a transaction sent again with another amount or fee row."""
    field = _id_field(spec)
    error = hl7_error(MappingError, f"transaction {field} was sent before with another "
                      f"amount or charge item: each transaction needs its own {field}, and "
                      "a transaction is not changed by sending it again; post a credit "
                      f"(FT1-6 CD) and a new charge, each under a new {field}", where, "205")
    assert isinstance(error, MappingError)
    return error


#: ERR-7 of the warning that a transaction was a copy of one already counted.
TRANSACTION_COUNTED = "transaction-counted"


def copied_transaction(spec: SumSpec, where: Loc | str) -> str:
    """The warning (``location code application-code: text``, for the ACK's ERR of
    severity W) that a transaction is a copy of one already counted and was left out."""
    field = _id_field(spec)
    return (f"{where} 205 {TRANSACTION_COUNTED}: transaction {field} already counted; not "
            f"counted again (a new transaction needs its own {field})")


def _id_field(spec: SumSpec) -> str:
    return spec.transaction_id.text if spec.transaction_id is not None else spec.segment


def fee_sums(spec: SumSpec, ctx: _Ctx) -> tuple[dict[str, Decimal], Decimal, int]:
    """Signed sums per data element of one message's fee segments (see
    :func:`fee_lines`), its grand total, and how many segments were counted."""
    totals: dict[str, Decimal] = {}
    grand = Decimal(0)
    lines = fee_lines(spec, ctx)
    for line in lines:
        for row in line.rows:
            if row == spec.total:
                continue
            totals[row] = totals.get(row, Decimal(0)) + line.amount
        grand += line.amount
    return totals, grand, len(lines)


def _sums(spec: SumSpec, ctx: _Ctx, catalog: DatasetCatalog) -> dict[str, str]:
    totals, grand, counted = fee_sums(spec, ctx)
    if not counted:
        return {}
    if spec.total:
        totals[spec.total] = grand
    out: dict[str, str] = {}
    for element, total in totals.items():
        text = format(total.quantize(Decimal("0.01")), "f")
        try:
            out[element] = catalog.elements[element].check(text, location=element)
        except MappingError as exc:
            raise hl7_error(MappingError, f"{exc.message} for the sum of "
                            f"{element_label(catalog, element)}",
                            Loc(spec.segment), "102") from None
    return out


def map_message(spec: MessageMapping, msg: HL7Message, *,
                context: dict[str, str] | None = None, trace: dict[str, str] | None = None,
                sums: bool = True) -> dict[str, Any]:
    """Map a validated message with ``spec`` (not a dispatching one) to a DE record.

    ``context`` supplies the values of ``{context: ...}`` rules; ``trace`` collects where
    each element came from (keys: element id, or ``$.groups.<name>[i] <element>``).
    ``sums=False`` leaves the fee sums out (a visit part keeps them signed instead).
    """
    assert spec.catalog is not None and spec.dataset is not None
    catalog = spec.catalog
    ctx = _Ctx(msg, None, context, trace)
    elements: dict[str, Any] = {}
    for er in spec.elements:
        value = _element(er, ctx, catalog)
        if value is not None:
            elements[er.element] = value
    if spec.sums is not None and sums:
        elements.update(_sums(spec.sums, ctx, catalog))
    groups: dict[str, list[dict[str, Any]]] = {}
    for group in spec.groups:
        items: list[dict[str, Any]] = []
        for seg in msg.segment_list(group.segment):
            inner = ctx.inner(seg)
            if not _holds(group.when, inner):
                continue
            item: dict[str, Any] = {}
            index = len(items)
            for er in group.elements:
                value = _element(er, inner, catalog, f"$.groups.{group.name}[{index}] {er.element}")
                if value is not None:
                    item[er.element] = value
            if item:
                items.append(item)
        if items:
            groups[group.name] = items
    return {"dataset": spec.dataset, "elements": elements, "groups": groups}



#: Public names for the visit assembler, which maps parts and reads conditions too.
MappingContext = _Ctx
holds = _holds
local_time = _local
