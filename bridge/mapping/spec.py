"""Loading and checking declarative mapping files (``mappings/ws445/*.yaml``).

The format is documented key by key in ``mappings/README.md``. Everything a file says is
checked when it is loaded: unknown keys, unknown transforms or parameters, value sets
that do not exist, data elements that are not in the data set, and data-set elements the
file neither maps nor lists as unmapped. Every mistake raises
:class:`~bridge.errors.LoadError` naming ``file:line key``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import LoadError
from bridge.mapping.transforms import CODE_OUTPUTS, REGISTRY
from bridge.mapping.valuesets import ValueSetMap
from bridge.mapping.yamlsrc import SourceList, SourceMap, load_yaml
from bridge.records.catalog import DatasetCatalog, load_catalog
from bridge.records.fhir import element_specs

APPEND = -1
_SEGMENT = re.compile(r"^(?P<name>_?[a-zA-Z][A-Za-z0-9]*)(?:\[(?P<index>\d*)\])?\Z")
_RESOURCE_TYPES = frozenset(
    {"Patient", "Encounter", "Condition", "Procedure", "Coverage", "Claim", "Organization",
     "Practitioner", "Composition", "Observation", "AllergyIntolerance", "Immunization",
     "ServiceRequest", "Location", "MedicationRequest", "Medication", "DiagnosticReport",
     "Specimen"}
)
BUNDLE_TYPES = frozenset({"collection", "document"})
_TOP_KEYS = frozenset(
    {"mapping", "source", "target", "purpose", "resources", "groups", "ordered", "unmapped"}
)
_RESOURCE_KEYS = frozenset({"type", "name", "id_from", "id_within", "when", "rules"})
_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*\Z")
_GROUP_KEYS = frozenset({"name", "elements", "one_of", "min_items", "resources"})
_RULE_KEYS = frozenset(
    {"source", "transform", "value", "ref", "object", "when", "required", "each"}
)
_WHEN_KEYS = frozenset({"source", "present", "in", "not_in", "any_present", "none_present"})
_INDEX_TOKEN = "$index"


@dataclass(frozen=True, slots=True)
class Condition:
    """``when:`` — a rule or resource applies only if this holds for the record."""

    source: str | None = None
    present: bool | None = None
    within: frozenset[str] | None = None
    not_within: frozenset[str] | None = None
    any_present: tuple[str, ...] = ()
    # Holds when none of these elements is present (a fallback for when nothing else is).
    none_present: tuple[str, ...] = ()
    # A list of conditions in the file: all must hold.
    all_of: tuple[Condition, ...] = ()


@dataclass(slots=True)
class Rule:
    """One way to obtain a value for a FHIR element."""

    where: str
    source: str | None = None
    transform: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    has_value: bool = False
    ref: str | None = None
    obj: list[RuleSet] | None = None
    when: Condition | None = None
    required: bool = False
    each: str | None = None


@dataclass(slots=True)
class RuleSet:
    """A FHIR element and its rules: alternatives (first wins) or, for ``[]``, each appends."""

    key: str
    where: str
    target_type: str | None
    segments: list[tuple[str, int | None]]
    rules: list[Rule]

    @property
    def appends(self) -> bool:
        return self.segments[-1][1] == APPEND


@dataclass(slots=True)
class ResourceSpec:
    """A resource the mapping creates (once per record, or once per group item)."""

    type: str
    where: str
    id_from: list[str]
    id_within: str | None
    when: Condition | None
    rules: list[RuleSet]
    name: str = ""
    # Alternatives to ``id_from``: the first whose elements are all present names the
    # resource. ``id_from`` is the first alternative.
    id_alternatives: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.type
        if not self.id_alternatives:
            self.id_alternatives = [self.id_from]


@dataclass(slots=True)
class GroupSpec:
    """A repeating group of the record (``diagnoses``, ``operations``)."""

    name: str
    where: str
    elements: frozenset[str]
    one_of: tuple[str, ...]
    min_items: int
    resources: list[ResourceSpec]


@dataclass(slots=True)
class MappingSpec:
    """A loaded mapping file."""

    id: str
    file: str
    header: dict[str, Any]
    dataset: str
    catalog: DatasetCatalog
    valuesets: dict[str, ValueSetMap]
    resources: list[ResourceSpec]
    groups: dict[str, GroupSpec]
    unmapped: dict[str, str]
    top_level_elements: frozenset[str]
    used_elements: frozenset[str]
    ordered: list[tuple[str, str]] = field(default_factory=list)
    bundle_type: str = "collection"

    def coverage(self) -> dict[str, list[tuple[str, str]]]:
        """Data-set elements the mapping uses and those it leaves out (with the reason)."""
        mapped = [(eid, self.catalog.elements[eid].name) for eid in sorted(self.used_elements)]
        unmapped = [(eid, reason) for eid, reason in sorted(self.unmapped.items())]
        return {"mapped": mapped, "unmapped": unmapped}

    def one_way(self) -> list[str]:
        """Mapped elements that no invertible rule carries (FHIR cannot give them back).

        ``target_code`` alone is one-way when several codes share a target; zero fee rows
        are left out of the output and read back as absent.
        """
        invertible: set[str] = set()

        def walk(rulesets: list[RuleSet]) -> None:
            for rs in rulesets:
                for rule in rs.rules:
                    if rule.source is not None and not (
                        rule.transform == "code" and rule.params.get("output") == "target_code"
                    ):
                        invertible.add(rule.source)
                    for key in ("type_source", "display_from"):
                        if key in rule.params:
                            invertible.add(rule.params[key])
                    if rule.when is not None and rule.when.source and rule.when.within \
                            and len(rule.when.within) == 1:
                        invertible.add(rule.when.source)
                    walk(rule.obj or [])

        for r in [*self.resources, *(x for g in self.groups.values() for x in g.resources)]:
            walk(r.rules)
        return sorted(self.used_elements - invertible)


def parse_path(text: str, where: str) -> tuple[str | None, list[tuple[str, int | None]]]:
    """Split ``Patient.address[0].line[]`` into the resource type and segments."""
    parts = text.split(".")
    rtype: str | None = None
    if parts and parts[0] in _RESOURCE_TYPES:
        rtype = parts.pop(0)
    if not parts:
        raise LoadError("path names no element", location=where)
    segments: list[tuple[str, int | None]] = []
    for part in parts:
        match = _SEGMENT.match(part)
        if match is None:
            raise LoadError("malformed element path", location=where)
        index = match["index"]
        if index is None:
            segments.append((match["name"], None))
        elif index == "":
            segments.append((match["name"], APPEND))
        else:
            segments.append((match["name"], int(index)))
    return rtype, segments


class _Loader:
    def __init__(self, path: Path, valuesets: dict[str, ValueSetMap]) -> None:
        self.path = path
        self.valuesets = valuesets
        self.catalog: DatasetCatalog | None = None
        self.used: set[str] = set()
        self.group_names: set[str] = set()

    # -- helpers -----------------------------------------------------------------------

    def element(self, value: Any, where: str, *, use: bool = True) -> str:
        assert self.catalog is not None
        if not isinstance(value, str) or value not in self.catalog.elements:
            raise LoadError(f"not an element of data set {self.catalog.dataset}", location=where)
        if use:
            self.used.add(value)
        return value

    def keys(self, data: SourceMap, allowed: frozenset[str]) -> None:
        for key in data:
            if key not in allowed:
                raise LoadError("unknown key", location=data.where(key))

    def mapping(self, data: SourceMap, key: str) -> SourceMap:
        value = data.get(key)
        if not isinstance(value, SourceMap):
            where = data.where(key) if key in data else f"{data.where()} {key}"
            raise LoadError("must be a mapping", location=where)
        return value

    def text(self, data: SourceMap, key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            where = data.where(key) if key in data else f"{data.where()} {key}"
            raise LoadError("must be a non-empty string", location=where)
        return value

    def str_list(self, data: SourceMap, key: str) -> list[str]:
        value = data.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LoadError("must be a list of strings", location=data.where(key))
        return list(value)

    # -- file --------------------------------------------------------------------------

    def load(self) -> MappingSpec:
        data = load_yaml(self.path)
        if not isinstance(data, SourceMap):
            raise LoadError("mapping file must be a mapping", location=str(self.path))
        self.keys(data, _TOP_KEYS)
        mapping_id = self.text(data, "mapping")
        source = self.mapping(data, "source")
        self.keys(source, frozenset({"standard", "version", "dataset", "catalog"}))
        target = self.mapping(data, "target")
        self.keys(target, frozenset({"standard", "version", "bundle"}))
        for key in ("standard", "version"):
            self.text(source, key)
            self.text(target, key)
        if str(target["version"]) != "4.0.1":
            raise LoadError("target version must be FHIR R4 4.0.1", location=target.where("version"))
        bundle_type = target.get("bundle", "collection")
        if bundle_type not in BUNDLE_TYPES:
            raise LoadError("bundle must be collection or document", location=target.where("bundle"))
        self.text(data, "purpose")
        dataset = self.text(source, "dataset")
        catalog_path = self.path.parent / self.text(source, "catalog")
        self.catalog = load_catalog(catalog_path, dataset)

        groups: dict[str, GroupSpec] = {}
        raw_groups = data.get("groups", SourceList())
        if not isinstance(raw_groups, list):
            raise LoadError("groups must be a list", location=data.where("groups"))
        for raw in raw_groups:
            if not isinstance(raw, SourceMap):
                raise LoadError("group must be a mapping", location=data.where("groups"))
            name = self.text(raw, "name")
            if name in self.group_names:
                raise LoadError("duplicate group name", location=raw.where("name"))
            self.group_names.add(name)
        group_elements: set[str] = set()
        for raw in raw_groups:
            group = self.group(raw)
            groups[group.name] = group
            if group_elements & group.elements:
                raise LoadError("element belongs to two groups", location=raw.where("elements"))
            group_elements |= group.elements

        raw_resources = data.get("resources")
        if not isinstance(raw_resources, list) or not raw_resources:
            raise LoadError("resources must be a non-empty list", location=data.where("resources")
                            if "resources" in data else f"{data.where()} resources")
        resources = [self.resource(raw, group=None) for raw in raw_resources]
        names = [r.name for r in resources]
        for r in resources:
            if names.count(r.name) > 1:
                raise LoadError("resource created twice at record level (give each a name)",
                                location=r.where)
        if bundle_type == "document" and resources[0].type != "Composition":
            raise LoadError("a document starts with its Composition", location=resources[0].where)
        self.check_each(resources, groups)
        self.check_targets(resources, groups)

        ordered: list[tuple[str, str]] = []
        raw_ordered = data.get("ordered", SourceList())
        if not isinstance(raw_ordered, list):
            raise LoadError("ordered must be a list of [earlier, later] pairs",
                            location=data.where("ordered"))
        for pair in raw_ordered:
            where = data.where("ordered")
            if not isinstance(pair, list) or len(pair) != 2:
                raise LoadError("ordered must be a list of [earlier, later] pairs", location=where)
            for eid in pair:
                self.element(eid, where, use=False)
                assert self.catalog is not None
                if self.catalog.elements[eid].format not in ("D8", "DT15"):
                    raise LoadError("ordered names only D8 or DT15 elements", location=where)
                if eid in group_elements:
                    raise LoadError("ordered names only record-level elements", location=where)
            ordered.append((pair[0], pair[1]))
        unmapped_raw = data.get("unmapped", SourceMap())
        if not isinstance(unmapped_raw, SourceMap):
            raise LoadError("unmapped must be a mapping", location=data.where("unmapped"))
        unmapped: dict[str, str] = {}
        assert self.catalog is not None
        for eid, reason in unmapped_raw.items():
            if eid not in self.catalog.elements:
                raise LoadError(f"not an element of data set {dataset}", location=unmapped_raw.where(eid))
            if eid in self.used:
                raise LoadError("element is mapped and also listed as unmapped",
                                location=unmapped_raw.where(eid))
            if not isinstance(reason, str) or not reason.strip():
                raise LoadError("give the reason the element is not mapped",
                                location=unmapped_raw.where(eid))
            unmapped[eid] = reason
        missing = sorted(set(self.catalog.elements) - self.used - set(unmapped))
        if missing:
            raise LoadError(f"data-set element neither mapped nor listed as unmapped: {missing[0]}",
                            location=data.where("unmapped") if "unmapped" in data
                            else f"{data.where()} unmapped")
        used_top = self.used - group_elements
        top_level = frozenset((used_top | set(unmapped)) - group_elements)
        header = {
            "mapping": mapping_id,
            "source": dict(source),
            "target": dict(target),
            "purpose": data["purpose"],
        }
        return MappingSpec(
            id=mapping_id, file=str(self.path), header=header, dataset=dataset,
            catalog=self.catalog, valuesets=self.valuesets, resources=resources,
            groups=groups, unmapped=unmapped, top_level_elements=top_level,
            used_elements=frozenset(self.used - set(unmapped)), ordered=ordered,
            bundle_type=str(bundle_type),
        )

    def check_each(self, resources: list[ResourceSpec], groups: dict[str, GroupSpec]) -> None:
        """``each: <group>`` runs a rule once per item of a group, so the group must exist
        and the rule must append to a list."""
        def walk(rulesets: list[RuleSet]) -> None:
            for rs in rulesets:
                for rule in rs.rules:
                    if rule.each is not None:
                        if rule.each not in groups:
                            raise LoadError("each names no group of this mapping", location=rule.where)
                        if not rs.appends:
                            raise LoadError("each needs an appending path ([])", location=rule.where)
                        if rule.ref is not None and rule.ref not in {
                                r.name for r in groups[rule.each].resources}:
                            raise LoadError("each: ref names a resource of that group",
                                            location=rule.where)
                    walk(rule.obj or [])
        for r in resources:
            walk(r.rules)

    def check_targets(self, resources: list[ResourceSpec], groups: dict[str, GroupSpec]) -> None:
        top = {r.name for r in resources}
        for r in resources:
            for rs in r.rules:
                if rs.target_type not in (None, r.type):
                    raise LoadError("record-level rules fill only their own resource",
                                    location=rs.where)
        for g in groups.values():
            local = {r.type for r in g.resources}
            for r in g.resources:
                for rs in r.rules:
                    t = rs.target_type
                    if t not in (None, r.type) and t not in local and t not in top \
                            and t not in {x.type for x in resources}:
                        raise LoadError("rule targets a resource the mapping does not create",
                                        location=rs.where)
        for r in [*resources, *(gr for g in groups.values() for gr in g.resources)]:
            for ref in self.refs(r.rules):
                rtype, where = ref
                if rtype != "this" and rtype not in top and not any(
                    rtype in {x.name for x in g.resources} for g in groups.values()
                ):
                    raise LoadError("reference to a resource the mapping does not create",
                                    location=where)

    def refs(self, rulesets: list[RuleSet]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for rs in rulesets:
            for rule in rs.rules:
                if rule.ref is not None:
                    found.append((rule.ref, rule.where))
                if rule.obj:
                    found.extend(self.refs(rule.obj))
        return found

    # -- sections ----------------------------------------------------------------------

    def group(self, raw: SourceMap) -> GroupSpec:
        self.keys(raw, _GROUP_KEYS)
        name = self.text(raw, "name")
        elements = frozenset(self.element(e, raw.where("elements"), use=False)
                             for e in self.str_list(raw, "elements"))
        one_of: tuple[str, ...] = ()
        if "one_of" in raw:
            one_of = tuple(self.str_list(raw, "one_of"))
            for eid in one_of:
                if eid not in elements:
                    raise LoadError("one_of names an element outside the group",
                                    location=raw.where("one_of"))
        min_items = raw.get("min_items", 0)
        if not isinstance(min_items, int) or isinstance(min_items, bool) or min_items < 0:
            raise LoadError("min_items must be a whole number", location=raw.where("min_items"))
        raw_resources = raw.get("resources")
        if not isinstance(raw_resources, list) or not raw_resources:
            raise LoadError("resources must be a non-empty list", location=raw.where("resources")
                            if "resources" in raw else f"{raw.where()} resources")
        resources = [self.resource(r, group=elements) for r in raw_resources]
        return GroupSpec(name=name, where=raw.where("name"), elements=elements, one_of=one_of,
                         min_items=min_items, resources=resources)

    def resource(self, raw: Any, group: frozenset[str] | None) -> ResourceSpec:
        if not isinstance(raw, SourceMap):
            raise LoadError("resource must be a mapping", location=str(self.path))
        self.keys(raw, _RESOURCE_KEYS)
        rtype = self.text(raw, "type")
        if rtype not in _RESOURCE_TYPES:
            raise LoadError("resource type not supported", location=raw.where("type"))
        name = rtype
        if "name" in raw:
            name = self.text(raw, "name")
            if not _NAME.match(name) or (name in _RESOURCE_TYPES and name != rtype):
                raise LoadError("name is a capitalised word, not another resource type",
                                location=raw.where("name"))
        raw_ids = raw.get("id_from")
        alternatives: list[list[str]]
        if isinstance(raw_ids, list) and raw_ids and all(isinstance(a, list) for a in raw_ids):
            alternatives = [[str(e) for e in a] if all(isinstance(e, str) for e in a)
                            else self.str_list(raw, "id_from") for a in raw_ids]
        else:
            alternatives = [self.str_list(raw, "id_from")]
        for id_from in alternatives:
            if not id_from:
                raise LoadError("id_from needs at least one element", location=raw.where("id_from"))
            if all(":" in eid for eid in id_from):
                raise LoadError("id_from needs at least one element besides literals",
                                location=raw.where("id_from"))
            for eid in id_from:
                if eid == _INDEX_TOKEN:
                    if group is None:
                        raise LoadError("$index is only meaningful inside a group",
                                        location=raw.where("id_from"))
                    continue
                if ":" in eid:
                    # A literal (an identifier system URI) that tells apart keys made of
                    # different identifiers with the same values.
                    continue
                self.element(eid, raw.where("id_from"))
        id_within = raw.get("id_within")
        if id_within is not None and id_within not in _RESOURCE_TYPES:
            raise LoadError("id_within must name a resource type", location=raw.where("id_within"))
        when = self.condition(raw["when"], raw.where("when")) if "when" in raw else None
        rules_raw = self.mapping(raw, "rules")
        rules = [self.ruleset(key, value, rules_raw.where(key), rtype, top=True)
                 for key, value in rules_raw.items()]
        for rs in rules:
            self.check_path(rs, rs.target_type or rtype)
        return ResourceSpec(type=rtype, where=raw.where("type"), id_from=alternatives[0],
                            id_within=id_within, when=when, rules=rules, name=name,
                            id_alternatives=alternatives)

    def check_path(self, rs: RuleSet, base: str | None) -> None:
        """Every segment must be an element of the FHIR type it is applied to."""
        current = base
        for name, _ in rs.segments:
            if current is None:
                raise LoadError("a primitive element has no child elements", location=rs.where)
            if name.startswith("_"):
                # ``_gender``: the primitive's extension holder (an Element).
                if name[1:] not in element_specs(current):
                    raise LoadError(f"{current} has no element {name[1:]}", location=rs.where)
                current = "Element"
                continue
            specs = element_specs(current)
            if name not in specs:
                raise LoadError(f"{current} has no element {name}", location=rs.where)
            current = specs[name].type_name
        for rule in rs.rules:
            for sub in rule.obj or []:
                self.check_path(sub, current)

    def ruleset(self, key: str, value: Any, where: str, rtype: str, *, top: bool) -> RuleSet:
        target_type, segments = parse_path(key, where)
        if top and target_type is None:
            raise LoadError("rule keys start with the resource type", location=where)
        if not top and target_type is not None:
            raise LoadError("object keys are relative element paths", location=where)
        if isinstance(value, list):
            if not value:
                raise LoadError("empty list of rules", location=where)
            rules = [self.rule(v, where) for v in value]
        else:
            rules = [self.rule(value, where)]
        return RuleSet(key=key, where=where, target_type=target_type, segments=segments,
                       rules=rules)

    def condition(self, raw: Any, where: str) -> Condition:
        if isinstance(raw, list):
            if not raw:
                raise LoadError("a list of conditions must not be empty", location=where)
            return Condition(all_of=tuple(self.condition(item, where) for item in raw))
        if not isinstance(raw, SourceMap):
            raise LoadError("when must be a mapping or a list of them", location=where)
        self.keys(raw, _WHEN_KEYS)
        for key in ("any_present", "none_present"):
            if key in raw:
                ids = tuple(self.element(e, raw.where(key)) for e in self.str_list(raw, key))
                if len(raw) != 1:
                    raise LoadError(f"{key} stands alone", location=raw.where(key))
                return Condition(any_present=ids) if key == "any_present" \
                    else Condition(none_present=ids)
        source = self.element(raw.get("source"), raw.where("source") if "source" in raw
                              else f"{raw.where()} source")
        tests = [k for k in ("present", "in", "not_in") if k in raw]
        if len(tests) != 1:
            raise LoadError("when needs exactly one of present, in, not_in", location=raw.where())
        if "present" in raw:
            if not isinstance(raw["present"], bool):
                raise LoadError("present must be true or false", location=raw.where("present"))
            return Condition(source=source, present=raw["present"])
        key = tests[0]
        values = raw[key]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise LoadError("must be a list of strings (quote codes)", location=raw.where(key))
        if key == "in":
            return Condition(source=source, within=frozenset(values))
        return Condition(source=source, not_within=frozenset(values))

    def rule(self, raw: Any, where: str) -> Rule:
        if not isinstance(raw, SourceMap):
            raise LoadError("rule must be a mapping", location=where)
        transform = raw.get("transform")
        tdef = None
        if transform is not None:
            if transform not in REGISTRY:
                raise LoadError("unknown transform", location=raw.where("transform"))
            tdef = REGISTRY[transform]
        params: dict[str, Any] = {}
        for key in raw:
            if key in _RULE_KEYS:
                continue
            if tdef is None or key not in tdef.params:
                raise LoadError("unknown key", location=raw.where(key))
            params[key] = raw[key]
        rule = Rule(where=raw.where(), transform=transform, params=params)
        kinds = [k for k in ("source", "value", "ref", "object") if k in raw]
        if tdef is not None and not tdef.needs_source:
            if kinds:
                raise LoadError(f"transform {transform} takes no source", location=raw.where(kinds[0]))
        elif len(kinds) != 1:
            raise LoadError("a rule needs exactly one of source, value, ref, object",
                            location=raw.where())
        if "source" in raw:
            rule.source = self.element(raw["source"], raw.where("source"))
            if tdef is None:
                raise LoadError("a rule with a source names a transform",
                                location=f"{raw.where()} transform")
        elif transform is not None and tdef is not None and tdef.needs_source:
            raise LoadError(f"transform {transform} needs a source", location=raw.where("transform"))
        if "value" in raw:
            rule.value = raw["value"]
            rule.has_value = True
        if "ref" in raw:
            if not isinstance(raw["ref"], str):
                raise LoadError("ref names a resource type or 'this'", location=raw.where("ref"))
            rule.ref = raw["ref"]
        if "object" in raw:
            obj = self.mapping(raw, "object")
            rule.obj = [self.ruleset(k, v, obj.where(k), "", top=False) for k, v in obj.items()]
        if "when" in raw:
            rule.when = self.condition(raw["when"], raw.where("when"))
        if "each" in raw:
            if not isinstance(raw["each"], str):
                raise LoadError("each names a repeating group", location=raw.where("each"))
            if rule.ref is None and rule.obj is None:
                raise LoadError("each goes with ref or object", location=raw.where("each"))
            rule.each = raw["each"]
        if "required" in raw:
            if not isinstance(raw["required"], bool):
                raise LoadError("required must be true or false", location=raw.where("required"))
            rule.required = raw["required"]
        if tdef is not None:
            for name in tdef.required_params:
                if name not in params:
                    raise LoadError(f"transform {transform} needs {name}",
                                    location=f"{raw.where()} {name}")
            self.check_params(raw, params)
        return rule

    def check_params(self, raw: SourceMap, params: dict[str, Any]) -> None:
        for key in ("valueset", "type_valueset"):
            if key in params and params[key] not in self.valuesets:
                raise LoadError("no such value set in mappings/valuesets", location=raw.where(key))
        for key in ("display_from", "type_source", "within"):
            if key in params:
                self.element(params[key], raw.where(key))
        if "type_valueset" in params and "type_source" not in params:
            raise LoadError("type_valueset needs type_source", location=raw.where("type_valueset"))
        output = params.get("output")
        if output is not None and output not in CODE_OUTPUTS:
            raise LoadError("unknown output", location=raw.where("output"))
        if output == "extension" and "url" not in params:
            raise LoadError("output extension needs url", location=f"{raw.where()} url")
        for key in ("system", "url"):
            if key in params and (not isinstance(params[key], str) or ":" not in params[key]):
                raise LoadError("must be an absolute URI", location=raw.where(key))


def load_mapping(path: Path, valuesets: dict[str, ValueSetMap]) -> MappingSpec:
    """Load and check one mapping file against its catalog and the value sets."""
    return _Loader(path, valuesets).load()
