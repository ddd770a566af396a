"""Apply a loaded mapping to a DE record and produce a FHIR R4 collection Bundle.

The engine knows nothing about WS 445: which resources exist, where each value goes and
how it is converted is read from the mapping file. What lives here is the generic
machinery: checking the record against the data-set catalog, deterministic ids,
references, element paths, and validation of the output.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.spec import (
    APPEND,
    Condition,
    GroupSpec,
    MappingSpec,
    ResourceSpec,
    Rule,
    RuleSet,
)
from bridge.mapping.transforms import NOTHING, REGISTRY
from bridge.mapping.valuesets import ValueSetMap
from bridge.records.fhir import validate_resource_cached
from bridge.uuids import uuid5_text

# Resource ids are uuid5 values in this namespace, named by the resource type and the
# source identifiers, so the same record always yields the same ids.
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ws-fhir-bridge:resource-id")

@dataclass(slots=True)
class RuleContext:
    """What a transform may see: the record's values, value sets, clock and position."""

    values: dict[str, str]
    item: dict[str, str] | None
    valuesets: dict[str, ValueSetMap]
    now: datetime | None
    location: str = ""
    seq: int = 1
    target_list: list[Any] | None = None
    # Group elements present in at least one item: ``any_present`` at record level sees them.
    group_present: frozenset[str] = frozenset()

    def lookup(self, element_id: str) -> str | None:
        if self.item is not None and element_id in self.item:
            return self.item[element_id]
        return self.values.get(element_id)

    def valueset(self, vs_id: str) -> ValueSetMap:
        return self.valuesets[vs_id]


@dataclass(slots=True)
class _Built:
    spec: ResourceSpec
    resource: dict[str, Any]
    item: dict[str, str] | None
    item_location: str | None
    local: dict[str, str]


def check_record(spec: MappingSpec, record: dict[str, Any]) -> tuple[dict[str, str], dict[str, list[dict[str, str]]]]:
    """Check every element against the catalog and the mapping; return normalised values."""
    if record.get("dataset") != spec.dataset:
        raise MappingError(f"record is not a {spec.dataset} record", location="$.dataset")
    catalog = spec.catalog
    values: dict[str, str] = {}
    for eid, raw in record.get("elements", {}).items():
        element = catalog.get(eid)
        if eid not in spec.top_level_elements:
            raise MappingError("data element does not belong at the top level of this mapping "
                               "(it is part of a group)", location=eid)
        if raw is None or raw == "":
            continue
        value = element.check(raw)
        if value != "":  # blank text (spaces, an ideographic space) is no value
            values[eid] = value
    for earlier, later in spec.ordered:
        a, b = values.get(earlier), values.get(later)
        # D8 against DT15 compares the dates; two DT15 values compare to the second.
        if a is not None and b is not None:
            width = min(len(a), len(b))
            if a[:width] > b[:width]:
                raise MappingError(f"date is before {earlier}", location=later)
    groups: dict[str, list[dict[str, str]]] = {}
    for name, items in (record.get("groups") or {}).items():
        group = spec.groups.get(name)
        if group is None:
            raise MappingError("unknown repeating group", location=f"$.groups.{name}")
        checked: list[dict[str, str]] = []
        for i, item in enumerate(items):
            out: dict[str, str] = {}
            for eid, raw in item.items():
                element = catalog.get(eid)
                if eid not in group.elements:
                    raise MappingError(f"data element is not part of group {name}", location=eid)
                if raw is None or raw == "":
                    continue
                value = element.check(raw)
                if value != "":  # blank text is no value (see above)
                    out[eid] = value
            if group.one_of:
                present = [e for e in group.one_of if e in out]
                if len(present) != 1:
                    raise MappingError("item needs exactly one of these data elements",
                                       location=f"$.groups.{name}[{i}] " + "|".join(group.one_of))
            checked.append(out)
        groups[name] = checked
    for name, group in spec.groups.items():
        if len(groups.get(name, [])) < group.min_items:
            raise MappingError(f"group needs at least {group.min_items} item(s)",
                               location=f"$.groups.{name}")
    return values, groups


def _holds(cond: Condition | None, ctx: RuleContext) -> bool:
    if cond is None:
        return True
    if cond.all_of:
        return all(_holds(c, ctx) for c in cond.all_of)
    if cond.none_present:
        return not any(ctx.lookup(e) is not None
                       or (ctx.item is None and e in ctx.group_present) for e in cond.none_present)
    if cond.any_present:
        # At record level a group element is present when any item carries it (a
        # discharge-diagnosis section exists when one diagnosis is a discharge diagnosis).
        return any(ctx.lookup(e) is not None
                   or (ctx.item is None and e in ctx.group_present) for e in cond.any_present)
    assert cond.source is not None
    value = ctx.lookup(cond.source)
    if cond.present is not None:
        return (value is not None) is cond.present
    if cond.within is not None:
        return value is not None and value in cond.within
    assert cond.not_within is not None
    # An absent value is not in the list: the rule applies and reports what it misses.
    return value is None or value not in cond.not_within


def _resource_id(spec: ResourceSpec, ctx: RuleContext, prefix: str, index: int | None,
                 item_location: str | None) -> str:
    """uuid5 of the type, the parent's id and the values of the first complete key.

    ``id_from`` alternatives are tried in order; an entry with a ``:`` is a literal (an
    identifier system) that keeps keys made of different identifiers apart. Named
    resources of one type add their name, so two Observations of a record never clash.
    """
    first_missing: str | None = None
    for id_from in spec.id_alternatives:
        parts = [spec.type]
        if spec.name != spec.type:
            parts.append(spec.name)
        if prefix:
            parts.append(prefix)
        complete = True
        for eid in id_from:
            if eid == "$index":
                parts.append(str(index))
                continue
            if ":" in eid:
                parts.append(eid)
                continue
            value = ctx.lookup(eid)
            if value is None:
                first_missing = first_missing or eid
                complete = False
                break
            parts.append(value)
        if complete:
            return uuid5_text(ID_NAMESPACE, "|".join(parts))
    assert first_missing is not None
    raise MappingError(f"identifying data element missing for {spec.type}",
                       location=f"{item_location} {first_missing}" if item_location
                       else first_missing)


class _Mapper:
    def __init__(self, spec: MappingSpec, values: dict[str, str],
                 groups: dict[str, list[dict[str, str]]], now: datetime | None) -> None:
        self.spec = spec
        self.values = values
        self.groups = groups
        self.now = now
        self.top: dict[str, dict[str, Any]] = {}
        self.built: list[_Built] = []
        self.group_present = frozenset(
            eid for items in groups.values() for item in items for eid in item)
        self.group_built: dict[str, list[_Built]] = {}

    def ctx(self, item: dict[str, str] | None) -> RuleContext:
        return RuleContext(values=self.values, item=item, valuesets=self.spec.valuesets,
                           now=self.now, group_present=self.group_present)

    def run(self) -> list[dict[str, Any]]:
        # Ids first, so that any rule can refer to any resource.
        for rspec in self.spec.resources:
            ctx = self.ctx(None)
            if not _holds(rspec.when, ctx):
                continue
            rid = _resource_id(rspec, ctx, "", None, None)
            resource = {"resourceType": rspec.type, "id": rid}
            self.top[rspec.name] = resource
            self.built.append(_Built(rspec, resource, None, None, {}))
        for gspec in self.spec.groups.values():
            self.prepare_group(gspec)
        for built in self.built:
            self.apply(built)
        # A resource named by the same identifiers twice (one surgeon, two operations)
        # is one resource.
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        for built in self.built:
            rid = built.resource["id"]
            if rid in seen:
                continue
            seen.add(rid)
            out.append(built.resource)
        return out

    def prepare_group(self, gspec: GroupSpec) -> None:
        self.group_built[gspec.name] = []
        for index, item in enumerate(self.groups.get(gspec.name, []), start=1):
            location = f"$.groups.{gspec.name}[{index - 1}]"
            ctx = self.ctx(item)
            local: dict[str, str] = {}
            group_built: list[_Built] = []
            for rspec in gspec.resources:
                if not _holds(rspec.when, ctx):
                    continue
                prefix = ""
                if rspec.id_within is not None:
                    parent = self.top.get(rspec.id_within)
                    if parent is None:  # pragma: no cover - checked by the mapping's own rules
                        raise MappingError("parent resource missing", location=location)
                    prefix = parent["id"]
                rid = _resource_id(rspec, ctx, prefix, index, location)
                resource = {"resourceType": rspec.type, "id": rid}
                local[rspec.name] = rid
                group_built.append(_Built(rspec, resource, item, location, local))
            self.built.extend(group_built)
            self.group_built[gspec.name].extend(group_built)

    def ref(self, name: str, built: _Built) -> dict[str, str]:
        if name == "this":
            return {"reference": f"urn:uuid:{built.resource['id']}"}
        if name in built.local:
            return {"reference": f"urn:uuid:{built.local[name]}"}
        target = self.top.get(name)
        if target is None:
            raise MappingError(f"referenced {name} was not created (its data is missing)",
                               location=built.item_location or built.spec.where)
        return {"reference": f"urn:uuid:{target['id']}"}

    def target(self, rs: RuleSet, built: _Built) -> dict[str, Any]:
        t = rs.target_type
        if t is None or t == built.spec.type:
            return built.resource
        if t in built.local:
            for other in self.built:
                if other.resource["id"] == built.local[t]:
                    return other.resource
        resource = self.top.get(t)
        if resource is None:
            # A record-level resource with a name is still addressed by its type.
            named = [b.resource for b in self.built if b.item is None and b.spec.type == t]
            resource = named[0] if len(named) == 1 else None
        if resource is None:
            raise MappingError(f"{t} was not created (its data is missing)",
                               location=built.item_location or rs.where)
        return resource

    def apply(self, built: _Built) -> None:
        ctx = self.ctx(built.item)
        own_type = built.spec.type
        for rs in built.spec.rules:
            t = rs.target_type
            obj = built.resource if t is None or t == own_type else self.target(rs, built)
            self.apply_ruleset(rs, obj, ctx, built)

    def apply_ruleset(self, rs: RuleSet, obj: dict[str, Any], ctx: RuleContext,
                      built: _Built) -> None:
        segments = rs.segments
        # A path of one element (``identifier[]``, ``status``) is most rules' case: it is
        # read and written here, as _peek, _container and _assign would.
        name, index = segments[0] if len(segments) == 1 else (None, None)
        if segments[-1][1] == APPEND:  # RuleSet.appends, without the property call
            for rule in rs.rules:
                if rule.each is not None:
                    self.apply_each(rule, rs, obj, ctx)
                    continue
                if name is not None and isinstance(obj, dict):
                    existing = obj.get(name)
                    if not isinstance(existing, list):
                        existing = None
                else:
                    existing = _peek(obj, segments)
                ctx.seq = len(existing) + 1 if existing is not None else 1
                ctx.target_list = existing
                value = self.evaluate(rule, ctx, built)
                if value is not NOTHING:
                    _container(obj, segments).append(value)
            return
        for rule in rs.rules:
            value = self.evaluate(rule, ctx, built)
            if value is not NOTHING:
                if name is not None and index is None:
                    obj[name] = value
                else:
                    _assign(obj, segments, value)
                return

    def apply_each(self, rule: Rule, rs: RuleSet, obj: dict[str, Any], ctx: RuleContext) -> None:
        """``each: <group>``: the rule once per item of the group, in the item's context
        (its ``when`` reads the item; ``ref`` names that item's resource)."""
        assert rule.each is not None
        seen: set[str] = set()
        for member in self.group_built.get(rule.each, []):
            if member.item_location in seen:
                continue
            if rule.ref is not None and member.spec.name != rule.ref:
                continue
            seen.add(member.item_location or "")
            item_ctx = self.ctx(member.item)
            existing = _peek(obj, rs.segments)
            item_ctx.seq = len(existing) + 1 if existing is not None else 1
            item_ctx.target_list = existing
            value = self.evaluate(rule, item_ctx, member)
            if value is not NOTHING:
                _container(obj, rs.segments).append(value)

    def evaluate(self, rule: Rule, ctx: RuleContext, built: _Built) -> Any:
        if rule.required and rule.source is not None and ctx.lookup(rule.source) is None:
            where = (f"{built.item_location} {rule.source}" if built.item_location
                     else rule.source)
            raise MappingError("required data element missing", location=where)
        if rule.when is not None and not _holds(rule.when, ctx):
            return NOTHING
        if rule.has_value:
            value = rule.value
            return _copy(value) if isinstance(value, (dict, list)) else value
        if rule.ref is not None:
            return self.ref(rule.ref, built)
        if rule.obj is not None:
            seq, target_list = ctx.seq, ctx.target_list
            result: dict[str, Any] = {}
            for sub in rule.obj:
                ctx.seq, ctx.target_list = seq, target_list
                self.apply_ruleset(sub, result, ctx, built)
            return result
        assert rule.transform is not None
        tdef = REGISTRY[rule.transform]
        raw: str | None = None
        source = rule.source
        if source is not None:
            item = ctx.item  # RuleContext.lookup, without the call
            raw = item[source] if item is not None and source in item else ctx.values.get(source)
            if raw is None:
                return NOTHING
            ctx.location = (f"{built.item_location} {source}" if built.item_location
                            else source)
        return tdef.fn(raw, rule, ctx)


# Values a fixed value may hold that are kept as they are (not containers).
_ATOMS = frozenset({str, int, float, bool, type(None)})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v if type(v) in _ATOMS else _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in _ATOMS else _copy(v) for v in value]
    return value


def _step(obj: Any, name: str, index: int | None, last: bool) -> Any:
    if index is None:
        if last:
            return obj
        return obj.setdefault(name, {})
    lst = obj.setdefault(name, [])
    if index == APPEND:
        return lst
    while len(lst) <= index:
        lst.append({})
    return lst[index]


def _peek(obj: Any, segments: list[tuple[str, int | None]]) -> list[Any] | None:
    """The list an appending path points at, if it exists; creates nothing."""
    for name, index in segments[:-1]:
        obj = obj.get(name) if isinstance(obj, dict) else None
        if obj is None:
            return None
        if index is not None:
            if not isinstance(obj, list) or index == APPEND or index >= len(obj):
                return None
            obj = obj[index]
    found = obj.get(segments[-1][0]) if isinstance(obj, dict) else None
    return found if isinstance(found, list) else None


def _container(obj: dict[str, Any], segments: list[tuple[str, int | None]]) -> list[Any]:
    for name, index in segments[:-1]:
        obj = _step(obj, name, index, False)
    name, _ = segments[-1]
    lst: list[Any] = obj.setdefault(name, [])
    return lst


def _assign(obj: dict[str, Any], segments: list[tuple[str, int | None]], value: Any) -> None:
    for name, index in segments[:-1]:
        obj = _step(obj, name, index, False)
    name, index = segments[-1]
    if index is None:
        obj[name] = value
        return
    lst = obj.setdefault(name, [])
    while len(lst) <= index:
        lst.append({})
    lst[index] = value


def validate_cached(resource: dict[str, Any], path: str) -> None:
    """Validate one output resource; identical content and recurring elements are proven
    once (see :class:`bridge.records.fhir.ValidationCache`)."""
    validate_resource_cached(resource, path=path)


DOCUMENT_IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"


def map_with(spec: MappingSpec, record: dict[str, Any], now: datetime | None) -> dict[str, Any]:
    """Map a shape-checked DE record with ``spec``; see :func:`bridge.mapping.map_record`.

    A ``collection`` holds the resources in the file's order. A ``document`` (FHIR R4
    bdl-9, bdl-10, bdl-11) starts with its Composition; ``Bundle.identifier`` is the
    Composition's id as a urn:uuid and ``Bundle.timestamp`` its ``date``, so the same
    record gives the same document.
    """
    values, groups = check_record(spec, record)
    resources = _Mapper(spec, values, groups, now).run()
    entries = []
    for i, resource in enumerate(resources):
        try:
            validate_cached(resource, f"Bundle.entry[{i}].resource")
        except MappingError as exc:
            # Callers that speak another language than FHIR (HL7 v2) translate the
            # failure back to their own terms from the resource type.
            exc.detail.setdefault("resource_type", resource.get("resourceType"))
            raise
        entries.append({"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource})
    if spec.bundle_type == "document":
        composition = resources[0]
        if composition.get("resourceType") != "Composition":  # pragma: no cover - loader
            raise MappingError("a document starts with its Composition", location="Bundle.entry[0]")
        return {"resourceType": "Bundle",
                "identifier": {"system": DOCUMENT_IDENTIFIER_SYSTEM,
                               "value": f"urn:uuid:{composition['id']}"},
                "type": "document", "timestamp": composition["date"], "entry": entries}
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
