"""The closed registry of named transforms a mapping rule may use.

A transform turns one checked data-element value (a string, already validated against
its declared format) into a FHIR value. Mapping files name transforms; they cannot add
code. Each transform declares the parameters it accepts, so a misspelt parameter is a
load error, not a silent default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bridge.errors import MappingError
from bridge.records.catalog import parse_d8, parse_dt15

if TYPE_CHECKING:
    from bridge.mapping.engine import RuleContext
    from bridge.mapping.spec import Rule

# Hospital local times carry China Standard Time.
CST = "+08:00"


class _Nothing:
    """Marker: the transform produced no value (an amount of zero, an absent clock)."""

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING = _Nothing()


@dataclass(frozen=True, slots=True)
class TransformDef:
    """A transform, whether it needs a source element, and the parameters it accepts."""

    fn: Callable[[str | None, Rule, RuleContext], Any]
    needs_source: bool
    params: frozenset[str] = frozenset()
    required_params: frozenset[str] = frozenset()


def _number(text: str) -> int | float:
    # Plain decimals (the checked form of an N..p,s element) without Decimal: an integral
    # value is the int of its whole part, any other the nearest float to the text, which is
    # what the Decimal conversion gives (both round the same exact value once). Longer
    # texts than any declared format allows go the Decimal way: int() of a text refuses
    # more than sys.int_max_str_digits digits, the Decimal conversion does not.
    whole, dot, frac = text.partition(".")
    if len(text) <= 64 and whole.isascii() and whole.isdigit() and (
            not dot or (frac.isascii() and frac.isdigit())):
        if not frac.strip("0"):
            return int(whole)
        return float(text)
    value = Decimal(text)
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _string(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    return value


def _date_d8(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    return parse_d8(value, ctx.location).isoformat()


def _datetime_dt15(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    return parse_dt15(value, ctx.location).isoformat() + CST


def _decimal(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    return _number(value)


def _decimal_cny(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    return {"value": _number(value), "currency": "CNY"}


def _integer(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    if not value.isdigit():
        raise MappingError("not a whole number", location=ctx.location)
    return int(value)


def _duration_days(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    if not value.isdigit():
        raise MappingError("not a whole number of days", location=ctx.location)
    return {"value": int(value), "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"}


def _boolean_tf(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    if value == "T":
        return True
    if value == "F":
        return False
    raise MappingError("boolean data element must be T or F", location=ctx.location)


def _code(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    assert value is not None
    vs = ctx.valueset(rule.params["valueset"])
    concept = vs.lookup(value, location=ctx.location)
    display = ctx.lookup(rule.params["display_from"]) if "display_from" in rule.params else None
    original = vs.original_coding(concept, display)
    output = rule.params.get("output", "codeable_concept")
    if output == "codeable_concept":
        target = vs.target_coding(concept)
        return {"coding": [target, original] if target else [original]}
    if output == "coding":
        return original
    if output == "code":
        return concept.code
    if output == "target_code":
        if concept.target is None:
            raise MappingError(f"code has no target in value set {vs.id}", location=ctx.location)
        return concept.target
    if output == "extension":
        return {"url": rule.params["url"], "valueCoding": original}
    if output == "reference":
        ref: dict[str, Any] = {"identifier": {"system": vs.system, "value": concept.code}}
        if concept.display:
            ref["display"] = concept.display
        return ref
    raise MappingError("unknown code output", location=rule.where)  # pragma: no cover


CODE_OUTPUTS = frozenset(
    {"codeable_concept", "coding", "code", "target_code", "extension", "reference"}
)


def _identifier(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    ident: dict[str, Any] = {}
    if "type_valueset" in rule.params:
        type_value = ctx.lookup(rule.params["type_source"])
        if type_value is None:
            raise MappingError("identifier type missing", location=rule.params["type_source"])
        vs = ctx.valueset(rule.params["type_valueset"])
        concept = vs.lookup(type_value, location=rule.params["type_source"])
        ident["type"] = {"coding": [vs.original_coding(concept)]}
    ident["system"] = rule.params["system"]
    ident["value"] = value
    return ident


XHTML_NS = "http://www.w3.org/1999/xhtml"
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xhtml_div(text: str) -> str:
    """Free text as the XHTML ``div`` of a FHIR Narrative: markup characters escaped,
    line breaks as ``<br/>`` (a carriage return is kept as ``&#13;``)."""
    escaped = (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
               .replace("\r", "&#13;").replace("\n", "<br/>"))
    return f'<div xmlns="{XHTML_NS}">{escaped}</div>'


def _xhtml(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    """A free-text element as a Narrative (``section.text``): status ``generated``."""
    assert value is not None
    if _XML_FORBIDDEN.search(value):
        raise MappingError("text holds characters XML does not allow", location=ctx.location)
    return {"status": "generated", "div": xhtml_div(value)}


def _sequence(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    return ctx.seq


def _now(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    if ctx.now is None:
        return NOTHING
    return ctx.now.isoformat(timespec="seconds")


def _fee_item(value: str | None, rule: Rule, ctx: RuleContext) -> Any:
    """One fee row of the front sheet as a ``Claim.item`` (or a ``detail`` of its parent row).

    Rows of zero are left out. A row declared ``within`` another (抗菌药物费用 within
    西药费) is a part of that amount, so it becomes a ``detail`` of the parent item and
    the items still add up to the total.
    """
    assert value is not None and rule.source is not None
    amount = _number(value)
    if amount == 0:
        return NOTHING
    vs = ctx.valueset(rule.params["valueset"])
    concept = vs.lookup(rule.source, location=ctx.location)
    product = {"coding": [vs.original_coding(concept)]}
    net = {"value": amount, "currency": "CNY"}
    parent_id = rule.params.get("within")
    if parent_id is None:
        category = vs.target_coding(concept)
        item: dict[str, Any] = {"sequence": ctx.seq}
        if category is not None:
            item["category"] = {"coding": [category]}
        item["productOrService"] = product
        item["net"] = net
        return item
    items = ctx.target_list if ctx.target_list is not None else []
    for parent in items:
        codings = parent.get("productOrService", {}).get("coding", [])
        if codings and codings[0].get("code") == parent_id:
            details = parent.setdefault("detail", [])
            details.append({"sequence": len(details) + 1, "productOrService": product, "net": net})
            return NOTHING
    raise MappingError(f"fee row is a part of {parent_id}, which is missing or zero",
                       location=ctx.location)


REGISTRY: dict[str, TransformDef] = {
    "string": TransformDef(_string, True),
    "date_d8": TransformDef(_date_d8, True),
    "datetime_dt15": TransformDef(_datetime_dt15, True),
    "decimal": TransformDef(_decimal, True),
    "decimal_cny": TransformDef(_decimal_cny, True),
    "integer": TransformDef(_integer, True),
    "duration_days": TransformDef(_duration_days, True),
    "boolean_tf": TransformDef(_boolean_tf, True),
    "code": TransformDef(
        _code, True, frozenset({"valueset", "output", "url", "display_from"}),
        frozenset({"valueset"}),
    ),
    "identifier": TransformDef(
        _identifier, True, frozenset({"system", "type_valueset", "type_source"}),
        frozenset({"system"}),
    ),
    "fee_item": TransformDef(
        _fee_item, True, frozenset({"valueset", "within"}), frozenset({"valueset"})
    ),
    "xhtml": TransformDef(_xhtml, True),
    "sequence": TransformDef(_sequence, False),
    "now": TransformDef(_now, False),
}
