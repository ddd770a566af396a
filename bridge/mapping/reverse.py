"""FHIR R4 collection -> DE record, driven by the same mapping files as the forward way.

Each rule of a mapping file is read backwards: the FHIR element it fills is looked up in
the Bundle and its transform is inverted (a FHIR date back to ``YYYYMMDD``, a coding back
to its WS 364 code, an identifier back to its value, a fee item back to its row).
Constants (``value:``), references (``ref:``) and the systems of identifiers and codings
discriminate which list item belongs to which rule. A rule whose ``when`` tests a single
code (``in: ["01"]``) gives that code back when it matched.

Transforms that lose information are one-way: ``target_code`` (GB/T 2261.1 ``0`` and ``9``
both become ``unknown``) is read back only when a single code maps to the target, which is
why the mapping also carries the original coding. ``sequence`` and ``now`` carry no data
element. :data:`ONE_WAY_TRANSFORMS` lists them; :meth:`MappingSpec.one_way` lists elements
that only one-way rules carry.

The result is checked by mapping it forward again: if that does not give back the
resources of the input (same ids, same content), the Bundle was not produced by this
mapping (or was altered) and :class:`MappingError` names the first differing resource.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.spec import APPEND, Condition, MappingSpec, ResourceSpec, Rule, RuleSet

ONE_WAY_TRANSFORMS = frozenset({"sequence", "now"})
_CST = timezone(timedelta(hours=8))


class _Miss(Exception):
    """The FHIR node does not match the rule (a different constant, system or reference)."""


def _number_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MappingError("not a number", location=where)
    return format(Decimal(str(value)), "f")


def _fhir_date(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) != 10:
        raise MappingError("not a FHIR date (YYYY-MM-DD)", location=where)
    return value.replace("-", "")


def _fhir_datetime(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MappingError("not a FHIR dateTime", location=where)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise MappingError("not a FHIR dateTime", location=where) from None
    if moment.tzinfo is None:
        raise MappingError("dateTime without a time zone", location=where)
    try:
        return moment.astimezone(_CST).strftime("%Y%m%dT%H%M%S")
    except OverflowError:  # beyond year 9999 in China Standard Time
        raise MappingError("dateTime beyond the year 9999 in China Standard Time",
                           location=where) from None


class _Reader:
    def __init__(self, spec: MappingSpec, bundle: dict[str, Any]) -> None:
        self.spec = spec
        entries = bundle.get("entry")
        if bundle.get("resourceType") != "Bundle" or not isinstance(entries, list):
            raise MappingError("expected a FHIR Bundle with entries", location="Bundle.entry")
        self.resources: list[dict[str, Any]] = []
        self.by_url: dict[str, dict[str, Any]] = {}
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                raise MappingError("entry without a resource", location=f"Bundle.entry[{i}]")
            self.resources.append(resource)
            url = entry.get("fullUrl") or f"urn:uuid:{resource.get('id')}"
            self.by_url[url] = resource
        self.top: dict[str, dict[str, Any]] = {}
        taken: set[int] = set()
        for rspec in spec.resources:
            # Record-level resources of one type (named vital-sign Observations) are told
            # apart by their constants (the Observation.code each rule writes).
            found = [r for r in self.resources if r.get("resourceType") == rspec.type
                     and id(r) not in taken and _fits(rspec, r)]
            if found:
                self.top[rspec.name] = found[0]
                self.top.setdefault(rspec.type, found[0])
                taken.add(id(found[0]))
        self.hints: set[str] = set()
        self.current: dict[str, str] = {}
        self.item_no = -1
        self.choices: dict[tuple[int, str], int] = {}
        self.choice_points: dict[tuple[int, str], int] = {}

    # -- values ------------------------------------------------------------------------

    def invert(self, rule: Rule, node: Any, where: str, out: dict[str, str],
               anchor: dict[str, Any] | None) -> None:
        """Read ``node`` back through ``rule`` into ``out``; raise _Miss if it does not fit."""
        if rule.has_value:
            if node != rule.value:
                raise _Miss
            self.implied(rule.when, out)
            return
        if rule.ref is not None:
            if not isinstance(node, dict) or not isinstance(node.get("reference"), str):
                raise _Miss
            self.implied(rule.when, out)
            return
        if rule.obj is not None:
            if not isinstance(node, dict):
                raise _Miss
            local: dict[str, str] = {}
            for sub in rule.obj:
                self.invert_ruleset(sub, node, where, local, anchor, strict=True)
            out.update(local)
            self.implied(rule.when, out)
            return
        assert rule.transform is not None
        if rule.transform in ONE_WAY_TRANSFORMS or rule.source is None:
            return
        value = self.transform_back(rule, node, where, out)
        if value is None:
            return
        out.setdefault(rule.source, value)
        self.implied(rule.when, out)

    def implied(self, cond: Condition | None, out: dict[str, str]) -> None:
        if cond is not None and cond.all_of:
            for part in cond.all_of:
                self.implied(part, out)
            return
        if cond is None or not cond.source:
            return
        if cond.within and len(cond.within) == 1:
            out.setdefault(cond.source, next(iter(cond.within)))
        if cond.present is True:
            self.hints.add(cond.source)

    def transform_back(self, rule: Rule, node: Any, where: str,
                       out: dict[str, str]) -> str | None:
        t = rule.transform
        p = rule.params
        if t in ("string",):
            if not isinstance(node, str):
                raise _Miss
            return node
        if t == "xhtml":
            return _xhtml_text(node)
        if t == "date_d8":
            return _fhir_date(node, where)
        if t == "datetime_dt15":
            return _fhir_datetime(node, where)
        if t in ("decimal", "integer"):
            return _number_text(node, where)
        if t in ("decimal_cny", "duration_days"):
            if not isinstance(node, dict) or "value" not in node:
                raise _Miss
            return _number_text(node["value"], where)
        if t == "boolean_tf":
            if not isinstance(node, bool):
                raise _Miss
            return "T" if node else "F"
        if t == "identifier":
            if not isinstance(node, dict) or node.get("system") != p["system"]:
                raise _Miss
            if "type_valueset" in p:
                vs = self.spec.valuesets[p["type_valueset"]]
                codings = (node.get("type") or {}).get("coding") or []
                codes = [c.get("code") for c in codings if c.get("system") == vs.system]
                if not codes:
                    raise _Miss
                out.setdefault(p["type_source"], codes[0])
            value = node.get("value")
            return value if isinstance(value, str) else None
        if t == "code":
            return self.code_back(rule, node, out)
        if t == "fee_item":
            return self.fee_back(rule, node)
        raise MappingError(f"transform {t} has no inverse", location=rule.where)  # pragma: no cover

    def code_back(self, rule: Rule, node: Any, out: dict[str, str]) -> str | None:
        p = rule.params
        vs = self.spec.valuesets[p["valueset"]]
        output = p.get("output", "codeable_concept")
        coding: Any
        if output == "codeable_concept":
            if not isinstance(node, dict):
                raise _Miss
            found = [c for c in node.get("coding") or [] if c.get("system") == vs.system]
            if not found:
                raise _Miss
            coding = found[0]
        elif output == "coding":
            coding = node
        elif output == "extension":
            if not isinstance(node, dict) or node.get("url") != p["url"]:
                raise _Miss
            coding = node.get("valueCoding")
        elif output == "reference":
            ident = node.get("identifier") if isinstance(node, dict) else None
            if not isinstance(ident, dict) or ident.get("system") != vs.system:
                raise _Miss
            return ident.get("value") if isinstance(ident.get("value"), str) else None
        elif output == "code":
            return node if isinstance(node, str) else None
        else:  # target_code: one-way unless a single code maps to the target
            codes = [c.code for c in vs.concepts.values() if c.target == node]
            return codes[0] if len(codes) == 1 else None
        if not isinstance(coding, dict) or coding.get("system") != vs.system:
            raise _Miss
        code = coding.get("code")
        if not isinstance(code, str):
            raise _Miss
        display = coding.get("display")
        source_display = p.get("display_from")
        if source_display and isinstance(display, str):
            concept = vs.concepts.get(code)
            if concept is None or display != concept.display:
                out.setdefault(source_display, display)
        return code

    def fee_back(self, rule: Rule, node: Any) -> str | None:
        assert rule.source is not None
        parent = rule.params.get("within")
        items = [node] if isinstance(node, dict) else []
        if parent is not None:
            if not isinstance(node, dict) or _item_code(node) != parent:
                raise _Miss
            items = node.get("detail") or []
        for item in items:
            if _item_code(item) == rule.source:
                net = item.get("net") or {}
                return _number_text(net.get("value"), rule.where)
        raise _Miss

    # -- paths -------------------------------------------------------------------------

    def invert_ruleset(self, rs: RuleSet, obj: dict[str, Any], where: str, out: dict[str, str],
                       anchor: dict[str, Any] | None, *, strict: bool = False) -> None:
        node = _walk(obj, rs.segments[:-1] if rs.appends else rs.segments)
        if node is _ABSENT:
            return
        if rs.appends:
            name = rs.segments[-1][0]
            items = node.get(name) if isinstance(node, dict) else None
            if not isinstance(items, list):
                return
            used: set[int] = set()
            for rule in rs.rules:
                for i, item in enumerate(items):
                    if i in used and rule.transform != "fee_item":
                        continue
                    local: dict[str, str] = {}
                    try:
                        self.invert(rule, item, f"{where}.{name}[{i}]", local, anchor)
                    except _Miss:
                        continue
                    if rule.ref == "this" or _refers(item, anchor):
                        pass
                    out.update({k: v for k, v in local.items() if k not in out})
                    if rule.transform != "fee_item":
                        used.add(i)
                    if rule.source is not None or rule.obj is not None:
                        break
            return
        matches: list[tuple[Rule, dict[str, str]]] = []
        for rule in rs.rules:
            found: dict[str, str] = {}
            try:
                self.invert(rule, node, where, found, anchor)
            except _Miss:
                continue
            if not found and rule.source is not None and rule.transform not in ONE_WAY_TRANSFORMS:
                continue
            matches.append((rule, found))
        if matches:
            hinted = [m for m in matches if m[0].source in self.hints]
            if hinted:
                matches = hinted
            if len(matches) > 1:
                # Several alternatives fit the same FHIR value (the admission condition of
                # the main or of another diagnosis). Try first the one whose element sits
                # nearest, in the data set's numbering, to the elements already read for
                # this record or item: WS 445 numbers related elements together.
                known = {**self.current, **out}
                matches.sort(key=lambda m: _distance(m[0].source, known))
                # Alternatives the Bundle alone cannot tell apart: a choice point that
                # the forward check settles.
                key = (self.item_no, rs.where)
                self.choice_points[key] = len(matches)
                matches = [matches[min(self.choices.get(key, 0), len(matches) - 1)]]
            out.update({k: v for k, v in matches[0][1].items() if k not in out})
            return
        if strict and any(r.has_value or r.ref is not None for r in rs.rules):
            raise _Miss

    def resource_back(self, rspec: ResourceSpec, resource: dict[str, Any],
                      out: dict[str, str], anchor: dict[str, Any] | None) -> None:
        for rs in rspec.rules:
            target = resource
            if rs.target_type not in (None, rspec.type):
                target = self.top.get(rs.target_type, {})
                if anchor is not None:
                    target = _only_items_for(target, rs, anchor)
            self.invert_ruleset(rs, target, rs.key, out, anchor)


_ABSENT = object()
_DIV_OPEN = '<div xmlns="http://www.w3.org/1999/xhtml">'


def _xhtml_text(node: Any) -> str:
    """The free text a Narrative written by the ``xhtml`` transform holds."""
    if not isinstance(node, dict) or node.get("status") != "generated":
        raise _Miss
    div = node.get("div")
    if not isinstance(div, str) or not div.startswith(_DIV_OPEN) or not div.endswith("</div>"):
        raise _Miss
    body = div[len(_DIV_OPEN):-len("</div>")]
    if "<" in body.replace("<br/>", ""):
        raise _Miss
    return (body.replace("<br/>", "\n").replace("&#13;", "\r").replace("&lt;", "<")
            .replace("&gt;", ">").replace("&amp;", "&"))


def _fits(rspec: ResourceSpec, resource: dict[str, Any]) -> bool:
    """Whether the constants the resource's own rules write (at fixed paths) are there."""
    for rs in rspec.rules:
        if rs.target_type not in (None, rspec.type) or rs.appends:
            continue
        if not all(r.has_value and r.when is None for r in rs.rules):
            continue
        node = _walk(resource, rs.segments)
        if node is _ABSENT or node not in [r.value for r in rs.rules]:
            return False
    return True


def _distance(source: str | None, known: dict[str, str]) -> int:
    if source is None or not known:
        return 0
    def number(eid: str) -> int:
        tail = eid.rsplit(".", 1)[-1]
        return int(tail) if tail.isdigit() else 0
    return min(abs(number(source) - number(k)) for k in known)


def _walk(obj: Any, segments: list[tuple[str, int | None]]) -> Any:
    for name, index in segments:
        if not isinstance(obj, dict) or name not in obj:
            return _ABSENT
        obj = obj[name]
        if index is not None and index != APPEND:
            if not isinstance(obj, list) or index >= len(obj):
                return _ABSENT
            obj = obj[index]
    return obj


def _item_code(item: Any) -> str | None:
    codings = ((item or {}).get("productOrService") or {}).get("coding") or []
    return codings[0].get("code") if codings else None


def _refers(node: Any, anchor: dict[str, Any] | None) -> bool:
    if anchor is None:
        return False
    want = f"urn:uuid:{anchor.get('id')}"
    if isinstance(node, dict):
        if node.get("reference") == want:
            return True
        return any(_refers(v, anchor) for v in node.values())
    if isinstance(node, list):
        return any(_refers(v, anchor) for v in node)
    return False


def _only_items_for(resource: dict[str, Any], rs: RuleSet, anchor: dict[str, Any]) -> dict[str, Any]:
    """The record-level resource with the appended list cut to the items about ``anchor``
    (the Claim.diagnosis entry that points at this Condition)."""
    if not rs.appends:
        return resource
    name = rs.segments[-1][0]
    parent = _walk(resource, rs.segments[:-1])
    if parent is _ABSENT or not isinstance(parent, dict):
        return {}
    items = [i for i in parent.get(name) or [] if _refers(i, anchor)]
    cut: dict[str, Any] = {name: items}
    for seg_name, index in reversed(rs.segments[:-1]):
        cut = {seg_name: [cut] if index is not None else cut}
    return cut


def _read(spec: MappingSpec, bundle: dict[str, Any],
          choices: dict[tuple[int, str], int]) -> tuple[dict[str, Any], dict[tuple[int, str], int]]:
    reader = _Reader(spec, bundle)
    reader.choices = choices
    elements: dict[str, str] = {}
    for _ in range(2):  # the first pass gathers hints (``when: present``) for the second
        elements = {}
        for rspec in spec.resources:
            resource = reader.top.get(rspec.name)
            if resource is not None:
                reader.resource_back(rspec, resource, elements, None)
    groups: dict[str, list[dict[str, str]]] = {}
    for gspec in spec.groups.values():
        anchors = [r for r in gspec.resources
                   if any("$index" in alt for alt in r.id_alternatives)]
        if not anchors:
            continue
        anchor_spec = anchors[0]
        items: list[dict[str, str]] = []
        for resource in reader.resources:
            if resource.get("resourceType") != anchor_spec.type:
                continue
            reader.item_no += 1
            item: dict[str, str] = {}
            reader.hints = set()
            for _ in range(2):
                item = {}
                reader.current = item
                reader.resource_back(anchor_spec, resource, item, resource)
                for other in gspec.resources:
                    if other is anchor_spec:
                        continue
                    for ref_node in _references(resource):
                        target = reader.by_url.get(ref_node)
                        if target is not None and target.get("resourceType") == other.type:
                            reader.resource_back(other, target, item, resource)
            reader.current = {}
            items.append({k: v for k, v in item.items() if k in gspec.elements})
            elements.update({k: v for k, v in item.items() if k not in gspec.elements
                             and k in spec.top_level_elements and k not in elements})
        if items:
            groups[gspec.name] = items
    top = {k: _scaled(spec, k, v) for k, v in elements.items() if k in spec.top_level_elements}
    for items in groups.values():
        for i, item in enumerate(items):
            items[i] = {k: _scaled(spec, k, v) for k, v in item.items()}
    record: dict[str, Any] = {"dataset": spec.dataset, "elements": top}
    if groups:
        record["groups"] = groups
    return record, reader.choice_points


def _scaled(spec: MappingSpec, eid: str, value: str) -> str:
    # FHIR decimals lose trailing zeros; WS 445 amounts are written with their scale.
    element = spec.catalog.elements.get(eid)
    if element is not None and element.format.startswith("N") and "," in element.format:
        scale = int(element.format.rsplit(",", 1)[1])
        try:
            return format(Decimal(value).quantize(Decimal(1).scaleb(-scale)), "f")
        except ArithmeticError:
            return value
    return value


_MAX_TRIES = 256


def unmap_with(spec: MappingSpec, bundle: dict[str, Any],
               forward: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Read a collection Bundle back into a DE record of ``spec``'s data set.

    ``forward`` maps a record to a Bundle (the forward mapping); the record returned is
    the one whose forward mapping gives back the input's resources.
    """
    _check_kind(spec, bundle)
    want = _comparable(spec, bundle)
    record, points = _read(spec, bundle, {})
    keys = sorted(points)
    ranges = [range(points[k]) for k in keys]
    first_error: MappingError | None = None
    for n, combo in enumerate(itertools.product(*ranges)):
        if n >= _MAX_TRIES:
            break
        if n:
            record, _ = _read(spec, bundle, dict(zip(keys, combo, strict=True)))
        try:
            got = _comparable(spec, forward(record))
        except MappingError as exc:
            first_error = first_error or exc
            continue
        if got == want:
            return record
        first_error = first_error or _difference(got, want)
    raise first_error or MappingError("Bundle is not the output of this mapping",
                                      location="Bundle.entry")


def _check_kind(spec: MappingSpec, bundle: dict[str, Any]) -> None:
    """Refuse at once, naming the entry, a Bundle this mapping cannot have produced: a
    document for a collection mapping (or the reverse), or a resource type it never writes."""
    entries = bundle.get("entry") or []
    first = (entries[0].get("resource") or {}) if entries and isinstance(entries[0], dict) else {}
    if spec.bundle_type == "document" and (bundle.get("type") != "document"
                                           or first.get("resourceType") != "Composition"):
        raise MappingError(f"{spec.dataset} is read from a document that starts with its "
                           "Composition", location="Bundle.entry[0].resource")
    if spec.bundle_type != "document" and bundle.get("type") == "document":
        raise MappingError(f"{spec.dataset} is not read from a document",
                           location="Bundle.entry[0].resource")
    types = {r.type for r in spec.resources} | {
        r.type for g in spec.groups.values() for r in g.resources}
    for i, entry in enumerate(entries):
        rtype = ((entry or {}).get("resource") or {}).get("resourceType") \
            if isinstance(entry, dict) else None
        if rtype not in types:
            raise MappingError(f"{spec.dataset} mapping writes no resource of this type",
                               location=f"Bundle.entry[{i}].resource")


def _comparable(spec: MappingSpec, bundle: dict[str, Any]) -> list[dict[str, Any]]:
    one_way = _one_way_paths(spec)
    out = []
    for entry in bundle.get("entry") or []:
        resource = dict(entry.get("resource") or {})
        for rtype, key in one_way:
            if resource.get("resourceType") == rtype:
                resource.pop(key, None)
        out.append(_normal(resource))
    return out


def _normal(node: Any) -> Any:
    # Numbers compare by value: 250.10 and 250.1 are the same amount.
    if isinstance(node, dict):
        return {k: _normal(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normal(v) for v in node]
    if isinstance(node, float) and node == int(node):
        return int(node)
    return node


def _one_way_paths(spec: MappingSpec) -> set[tuple[str, str]]:
    paths = set()
    for rspec in [*spec.resources, *(r for g in spec.groups.values() for r in g.resources)]:
        for rs in rspec.rules:
            if any(r.transform == "now" for r in rs.rules):
                paths.add((rs.target_type or rspec.type, rs.segments[0][0]))
    return paths


def _difference(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> MappingError:
    for i, resource in enumerate(want):
        if i >= len(got) or got[i] != resource:
            rtype = resource.get("resourceType", "?")
            return MappingError(f"{rtype} cannot be read back with this mapping "
                                "(not produced by it, or altered)",
                                location=f"Bundle.entry[{i}].resource")
    return MappingError("Bundle holds more resources than the mapping produces",
                        location=f"Bundle.entry[{len(want)}]")


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []
