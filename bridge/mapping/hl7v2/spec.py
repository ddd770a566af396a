"""Loading and checking the HL7 v2 message mapping files (``mappings/hl7v2/messages/*.yaml``).

One file per message type maps HL7 paths to the data elements of one WS 445 data set.
The format is documented key by key in ``mappings/hl7v2/README.md``. Everything a file
says is checked when it is loaded — unknown keys, malformed HL7 paths, unknown
transforms and parameters, value sets that do not exist, data-element ids that are not in
the target data set — and every mistake raises :class:`~bridge.errors.LoadError` naming
``file:line key``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from bridge.errors import LoadError, MappingError
from bridge.mapping.hl7v2.biometric import DIGEST_CHARS
from bridge.mapping.valuesets import ValueSetMap, load_valuesets, valuesets_for
from bridge.mapping.yamlsrc import SourceMap, load_yaml
from bridge.records.catalog import DatasetCatalog, load_catalog
from bridge.resources import SHIPPED, MappingFiles, mappings_dir

_PATH = re.compile(r"^(?P<seg>[A-Z][A-Z0-9]{2})-(?P<field>[1-9]\d*)"
                   r"(?:\.(?P<comp>[1-9]\d*)(?:\.(?P<sub>[1-9]\d*))?)?\Z")
_TOP_KEYS = frozenset({"mapping", "source", "target", "purpose", "required_segments",
                       "elements", "groups", "sums", "dispatch", "unused"})
_SOURCE_KEYS = frozenset({"standard", "versions", "message", "structure"})
_TARGET_KEYS = frozenset({"standard", "dataset", "subset", "catalog"})
_RULE_KEYS = frozenset({"path", "select", "transform", "valueset", "at", "from", "value",
                        "when", "required", "same_in_every", "each", "until", "context",
                        "biometric"})
_GROUP_KEYS = frozenset({"segment", "when", "elements"})
_SUMS_KEYS = frozenset({"segment", "transaction", "transaction_id", "category", "fee_class",
                        "amount", "total", "within", "when"})
_WHEN_KEYS = frozenset({"path", "present", "in", "not_in", "valueset"})
_SELECT_KEYS = frozenset({"path", "in", "valueset"})

#: Values a rule may take from the caller instead of the message (``{context: ...}``):
#: what the controller's configuration and the site's facility table say about the
#: sending facility, for messages whose MSH-4 does not carry it.
CONTEXT_KEYS = frozenset({"organization_code", "organization_name"})

#: HL7 table 0017 transaction types and what each does to a fee sum.
TRANSACTION_TYPES = {"CG": "charge", "CD": "credit", "AJ": "adjustment", "PY": "payment"}

# The closed registry of transforms: name -> (parameters it requires, parameters allowed).
TRANSFORMS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "string": (frozenset(), frozenset()),
    "concat": (frozenset(), frozenset()),
    "ts_to_dt15": (frozenset(), frozenset()),
    "ts_to_d8": (frozenset(), frozenset()),
    "decimal": (frozenset(), frozenset()),
    "code": (frozenset({"valueset"}), frozenset({"valueset"})),
    "age_years": (frozenset({"at"}), frozenset({"at"})),
    "stay_days": (frozenset({"from"}), frozenset({"from"})),
}


@dataclass(frozen=True, slots=True)
class Path_:
    """An HL7 path ``SEG-field[.component[.subcomponent]]``."""

    segment: str
    field: int
    component: int = 0
    subcomponent: int = 0
    text: str = ""


def _codes_of(valueset: ValueSetMap | None, targets: frozenset[str]) -> frozenset[str]:
    """The source codes of ``valueset`` whose target is one of ``targets`` (or ``targets``)."""
    if valueset is None:
        return targets
    return frozenset(c.code for c in valueset.concepts.values()
                     if (c.target or c.code) in targets)


@dataclass(frozen=True, slots=True)
class Select:
    """Pick the first repetition whose ``path`` value is one of ``values``.

    With ``valueset``, ``values`` are the codes of that table whose target is listed in
    the file's ``in`` (``in: [inpatient-number]`` through ``hl70203-identifier-type``), so
    a site that overlays the table with its own codes changes what is selected.
    """

    path: Path_
    values: frozenset[str]
    valueset: ValueSetMap | None = None


@dataclass(frozen=True, slots=True)
class When:
    """A condition on a value of the message (codes through ``valueset`` as for select)."""

    path: Path_
    present: bool | None = None
    within: frozenset[str] | None = None
    not_within: frozenset[str] | None = None
    valueset: ValueSetMap | None = None
    # A list of conditions in the file: every one must hold (``path`` is the first's).
    all_of: tuple[When, ...] = ()


@dataclass(slots=True)
class Rule:
    """One way to obtain a data element's value from the message."""

    where: str
    paths: tuple[Path_, ...] = ()
    select: Select | None = None
    transform: str | None = None
    valueset: ValueSetMap | None = None
    at: tuple[Path_, ...] = ()
    value: str | None = None
    when: When | None = None
    required: bool = False
    # Why the element cannot be left empty; the refusal says it (a constant of the file).
    why: str | None = None
    # Read from every repetition of the segment, which must all give the same value:
    # for record-level elements that a message may carry once per order or item.
    same_in_every: bool = False
    # A value the caller supplies (CONTEXT_KEYS) instead of one read from the message.
    context: str | None = None
    # With ``same_in_every``: every repetition of this segment must be followed by one
    # (the rule's segments between it and the next one, or a segment in ``until``).
    each: str | None = None
    until: frozenset[str] = frozenset()
    # The element is biometric data: its paths are replaced by a keyed digest before the
    # message is stored or mapped (bridge.mapping.hl7v2.biometric).
    biometric: bool = False


@dataclass(slots=True)
class ElementRules:
    """A data element and its alternatives (the first rule that yields a value wins)."""

    element: str
    where: str
    rules: list[Rule]

    @property
    def required(self) -> bool:
        return any(r.required for r in self.rules)

    @property
    def biometric(self) -> bool:
        """One rule marking the element biometric marks it, every rule's paths with it."""
        return any(r.biometric for r in self.rules)

    @property
    def why(self) -> str | None:
        """The explanation a refusal for a missing value gives, if the file states one."""
        return next((r.why for r in self.rules if r.why), None)


@dataclass(slots=True)
class GroupSpec:
    """A repeating segment whose repetitions become items of a DE record group."""

    name: str
    where: str
    segment: str
    when: When | None
    elements: list[ElementRules]


@dataclass(slots=True)
class SumSpec:
    """Amounts of a repeating segment summed per category into data elements.

    ``valueset`` maps the category code (``FT1-7.1``, the charge item) to a fee class;
    ``fee_class`` maps the fee class to the data element (without ``fee_class`` the
    category's targets are the elements themselves). ``transaction`` reads the HL7 table
    0017 type (``FT1-6``): charges add, credits subtract, adjustments add as signed,
    payments are not charges and are left out. ``transaction_id`` reads the sender's
    transaction id (``FT1-2``): with its type it identifies a transaction, counted once per
    visit and sender however often it is sent.
    """

    where: str
    segment: str
    category: Path_
    valueset: ValueSetMap
    amount: Path_
    total: str | None
    within: dict[str, str]
    when: When | None
    fee_class: ValueSetMap | None = None
    transaction: Path_ | None = None
    transaction_valueset: ValueSetMap | None = None
    transaction_id: Path_ | None = None

    def element_for(self, concept_target: str) -> str | None:
        """The data element a category's target adds to (through ``fee_class``)."""
        if self.fee_class is None:
            return concept_target
        fee = self.fee_class.concepts.get(concept_target)
        return (fee.target or fee.code) if fee is not None else None


@dataclass(slots=True)
class MessageMapping:
    """A loaded message mapping file."""

    id: str
    file: str
    header: dict[str, Any]
    message_type: str
    structure: str
    versions: frozenset[str]
    dataset: str | None
    catalog: DatasetCatalog | None
    required_segments: tuple[str, ...] = ()
    elements: list[ElementRules] = field(default_factory=list)
    groups: list[GroupSpec] = field(default_factory=list)
    sums: SumSpec | None = None
    dispatch: tuple[Path_, dict[str, str]] | None = None
    unused: dict[str, str] = field(default_factory=dict)
    # Every message type the file maps (a visit part may serve several).
    message_types: tuple[str, ...] = ()

    def biometric_paths(self) -> tuple[Path_, ...]:
        """The HL7 paths read for biometric elements, record level and in groups."""
        elements = list(self.elements) + [e for g in self.groups for e in g.elements]
        found: list[Path_] = []
        for element in elements:
            if element.biometric:
                found += [p for r in element.rules for p in r.paths if p not in found]
        return tuple(found)

    def filled(self) -> dict[str, list[str]]:
        """Data-element ids this mapping can fill: record level and per group."""
        out: dict[str, list[str]] = {"elements": [e.element for e in self.elements]}
        for g in self.groups:
            out[f"groups.{g.name}"] = [e.element for e in g.elements]
        if self.sums is not None:
            classes = self.sums.fee_class or self.sums.valueset
            ids = sorted({c.target or c.code for c in classes.concepts.values()}
                         | set(self.sums.within.values()))
            out["elements"] += [i for i in ids if i not in out["elements"]]
            if self.sums.total:
                out["elements"].append(self.sums.total)
        return out


def parse_path(text: Any, where: str) -> Path_:
    """Parse ``PID-5.1`` (segment, field, component, subcomponent)."""
    if not isinstance(text, str):
        raise LoadError("an HL7 path is a string like PID-5.1", location=where)
    m = _PATH.match(text)
    if m is None:
        raise LoadError("malformed HL7 path (expected SEG-field[.component[.sub]])",
                        location=where)
    return Path_(m["seg"], int(m["field"]), int(m["comp"] or 0), int(m["sub"] or 0), text)


def _where(data: SourceMap, key: str) -> str:
    return data.where(key) if key in data else f"{data.where()} {key}"


def _keys(data: SourceMap, allowed: frozenset[str]) -> None:
    for key in data:
        if key not in allowed:
            raise LoadError("unknown key", location=data.where(key))


def _text(data: SourceMap, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise LoadError("must be a non-empty string", location=_where(data, key))
    return value


def _mapping(data: SourceMap, key: str) -> SourceMap:
    value = data.get(key)
    if not isinstance(value, SourceMap):
        raise LoadError("must be a mapping", location=_where(data, key))
    return value


def _codes(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise LoadError("must be a non-empty list of quoted codes", location=where)
    return frozenset(value)


def target_catalog(dataset: str, subset: str | None, where: str) -> DatasetCatalog:
    """The element catalog of a target data set.

    The WS 445 catalogs in ``mappings/ws445/`` are preferred; for data sets that have none
    yet, the extracts in ``mappings/hl7v2/catalogs/`` (same columns) are used.
    """
    part = dataset.removeprefix("WS")
    shared = mappings_dir() / "ws445" / f"ws{part}-elements.csv"
    own = mappings_dir() / "hl7v2" / "catalogs" / f"ws{part}-elements.csv"
    for path in (shared, own):
        if path.is_file():
            return load_catalog(path, dataset)
    raise LoadError("no element catalog for the target data set", location=where)


class _Loader:
    def __init__(self, path: Path, valuesets: dict[str, ValueSetMap], *,
                 part: bool = False) -> None:
        self.path = path
        self.valuesets = valuesets
        self.catalog: DatasetCatalog | None = None
        # A part of a visit assembly (``hl7v2/visits/``): may serve several message types.
        self.part = part

    def valueset(self, data: SourceMap, key: str = "valueset") -> ValueSetMap:
        vs = self.valuesets.get(data.get(key))  # type: ignore[arg-type]
        if vs is None:
            raise LoadError("unknown value set", location=_where(data, key))
        return vs

    def element_id(self, value: Any, where: str) -> str:
        assert self.catalog is not None
        if not isinstance(value, str) or value not in self.catalog.elements:
            raise LoadError(f"not an element of data set {self.catalog.dataset}", location=where)
        return value

    def when(self, data: Any, where: str, segment: str | None = None) -> When:
        if isinstance(data, list):
            if not data:
                raise LoadError("a list of conditions must not be empty", location=where)
            conditions = tuple(self.when(item, where, segment) for item in data)
            return When(conditions[0].path, all_of=conditions)
        if not isinstance(data, SourceMap):
            raise LoadError("when must be a mapping or a list of them", location=where)
        _keys(data, _WHEN_KEYS)
        path = parse_path(data.get("path"), _where(data, "path"))
        if segment is not None and path.segment != segment:
            raise LoadError("a group condition reads the group's own segment",
                            location=_where(data, "path"))
        tests = [k for k in ("present", "in", "not_in") if k in data]
        if len(tests) != 1:
            raise LoadError("when takes exactly one of present, in, not_in", location=where)
        if "present" in data:
            if not isinstance(data["present"], bool) or "valueset" in data:
                raise LoadError("present must be true or false (and takes no valueset)",
                                location=data.where("present"))
            return When(path, present=data["present"])
        vs = self.valueset(data) if "valueset" in data else None
        key = "in" if "in" in data else "not_in"
        codes = _codes(data[key], data.where(key))
        if vs is not None:
            self.check_targets(vs, codes, data.where(key))
            codes = _codes_of(vs, codes)
        if key == "in":
            return When(path, within=codes, valueset=vs)
        return When(path, not_within=codes, valueset=vs)

    @staticmethod
    def check_targets(vs: ValueSetMap, codes: frozenset[str], where: str) -> None:
        known = {c.target or c.code for c in vs.concepts.values()}
        unknown = sorted(codes - known)
        if unknown:
            raise LoadError(f"no code of the table has the target {', '.join(unknown)}, which "
                            f"{where} selects by", location=vs.where(key="concepts"))

    def rule(self, data: Any, where: str, group_segment: str | None) -> Rule:
        if not isinstance(data, SourceMap):
            raise LoadError("a rule must be a mapping", location=where)
        _keys(data, _RULE_KEYS)
        rule = Rule(where=data.where())
        if "context" in data:
            if data["context"] not in CONTEXT_KEYS or any(
                    k in data for k in ("path", "transform", "value", "select")):
                raise LoadError(f"context is one of {', '.join(sorted(CONTEXT_KEYS))} and "
                                "takes no path, transform or value",
                                location=data.where("context"))
            rule.context = data["context"]
        elif "value" in data:
            if not isinstance(data["value"], str) or "path" in data or "transform" in data:
                raise LoadError("value is a quoted constant and takes no path or transform",
                                location=data.where("value"))
            rule.value = data["value"]
        else:
            raw = data.get("path")
            transform = _text(data, "transform")
            if transform not in TRANSFORMS:
                raise LoadError("unknown transform", location=data.where("transform"))
            rule.transform = transform
            if transform == "concat":
                if not isinstance(raw, list) or len(raw) < 2:
                    raise LoadError("concat takes a list of at least two paths",
                                    location=_where(data, "path"))
                rule.paths = tuple(parse_path(p, _where(data, "path")) for p in raw)
            else:
                rule.paths = (parse_path(raw, _where(data, "path")),)
            required, allowed = TRANSFORMS[transform]
            for param in ("valueset", "at", "from"):
                if param in data and param not in allowed:
                    raise LoadError(f"transform {transform} takes no parameter {param}",
                                    location=data.where(param))
            for param in required:
                if param not in data:
                    raise LoadError(f"transform {transform} needs {param}",
                                    location=data.where("transform"))
            if "valueset" in data:
                vs = self.valuesets.get(data["valueset"])
                if vs is None:
                    raise LoadError("unknown value set", location=data.where("valueset"))
                rule.valueset = vs
            for param in ("at", "from"):
                if param in data:
                    items = data[param] if isinstance(data[param], list) else [data[param]]
                    rule.at = tuple(parse_path(p, data.where(param)) for p in items)
        if group_segment is not None:
            for p in rule.paths:
                if p.segment != group_segment:
                    raise LoadError("a group rule reads the group's own segment",
                                    location=_where(data, "path"))
        if "select" in data:
            sel = data["select"]
            if not isinstance(sel, SourceMap):
                raise LoadError("select must be a mapping", location=data.where("select"))
            _keys(sel, _SELECT_KEYS)
            spath = parse_path(sel.get("path"), _where(sel, "path"))
            if not rule.paths or spath.segment != rule.paths[0].segment or (
                    group_segment is not None and spath.field != rule.paths[0].field):
                raise LoadError("select reads the rule's own segment (its own field in a group)",
                                location=data.where("select"))
            codes = _codes(sel.get("in"), _where(sel, "in"))
            svs = self.valueset(sel) if "valueset" in sel else None
            if svs is not None:
                self.check_targets(svs, codes, sel.where("in"))
                codes = _codes_of(svs, codes)
            rule.select = Select(spath, codes, svs)
        if "when" in data:
            rule.when = self.when(data["when"], data.where("when"), group_segment)
        if "required" in data:
            required_value = data["required"]
            if isinstance(required_value, str) and required_value.strip():
                rule.required, rule.why = True, required_value.strip()
            elif isinstance(required_value, bool):
                rule.required = required_value
            else:
                raise LoadError("required must be true, false or the reason as a string",
                                location=data.where("required"))
        if "same_in_every" in data:
            if not isinstance(data["same_in_every"], bool):
                raise LoadError("same_in_every must be true or false",
                                location=data.where("same_in_every"))
            if data["same_in_every"]:
                if group_segment is not None or rule.value is not None or rule.select is not None:
                    raise LoadError("same_in_every is for record-level rules reading a path "
                                    "without select", location=data.where("same_in_every"))
                if len({p.segment for p in rule.paths}) != 1:
                    raise LoadError("same_in_every reads one segment",
                                    location=data.where("same_in_every"))
                rule.same_in_every = True
        if "biometric" in data:
            if not isinstance(data["biometric"], bool):
                raise LoadError("biometric must be true or false", location=data.where("biometric"))
            rule.biometric = data["biometric"]
        for key in ("each", "until"):
            if key in data and not rule.same_in_every:
                raise LoadError(f"{key} goes with same_in_every: true", location=data.where(key))
        if "each" in data:
            each = data["each"]
            if not isinstance(each, str) or not re.fullmatch(r"[A-Z][A-Z0-9]{2}", each):
                raise LoadError("each is a segment id", location=data.where("each"))
            rule.each = each
        if "until" in data:
            if "each" not in data:
                raise LoadError("until goes with each", location=data.where("until"))
            until = data["until"]
            if not isinstance(until, list) or not all(
                    isinstance(u, str) and re.fullmatch(r"[A-Z][A-Z0-9]{2}", u) for u in until):
                raise LoadError("until is a list of segment ids", location=data.where("until"))
            rule.until = frozenset(until)
        return rule

    def element_rules(self, data: Any, where: str,
                      group_segment: str | None = None) -> list[ElementRules]:
        if not isinstance(data, SourceMap) or not data:
            raise LoadError("elements must be a non-empty mapping", location=where)
        out = []
        for key, value in data.items():
            eid = self.element_id(key, data.where(key))
            items = value if isinstance(value, list) else [value]
            if not items:
                raise LoadError("no rule given", location=data.where(key))
            rules = [self.rule(v, data.where(key), group_segment) for v in items]
            element = ElementRules(eid, data.where(key), rules)
            if element.biometric:
                self.check_biometric(element, items)
            out.append(element)
        return out

    def check_biometric(self, element: ElementRules, items: list[Any]) -> None:
        """A biometric element is read only through paths the digest can replace, and its
        catalog format holds the digest."""
        for rule, raw in zip(element.rules, items, strict=True):
            where = raw.where("biometric") if "biometric" in raw else rule.where
            if rule.transform != "string" or not rule.paths:
                raise LoadError("a biometric element is read from a path with transform string"
                                " (it holds a digest)", location=where)
            if rule.select is not None:
                raise LoadError("a biometric element is read from a path without select: every"
                                " repetition of the field is replaced by its digest",
                                location=where)
            if any(p.segment == "MSH" for p in rule.paths):
                raise LoadError("MSH carries no biometric data", location=where)
        assert self.catalog is not None
        try:
            self.catalog.elements[element.element].check("x" * DIGEST_CHARS)
        except MappingError:
            fmt = self.catalog.elements[element.element].format
            raise LoadError(f"a biometric element holds a {DIGEST_CHARS}-character digest; the"
                            f" format of {element.element} ({fmt}) does not",
                            location=element.where) from None

    def load(self) -> MessageMapping:
        data = load_yaml(self.path)
        if not isinstance(data, SourceMap):
            raise LoadError("mapping file must be a mapping", location=str(self.path))
        _keys(data, _TOP_KEYS)
        mapping_id = _text(data, "mapping")
        source = _mapping(data, "source")
        _keys(source, _SOURCE_KEYS)
        _text(source, "standard")
        raw_types = source.get("message")
        types = raw_types if self.part and isinstance(raw_types, list) else [raw_types]
        for candidate in types:
            if not isinstance(candidate, str) or not re.fullmatch(r"[A-Z]{3}\^[A-Z0-9]{3}",
                                                                  candidate):
                raise LoadError("message must look like ADT^A01 (a part may list several)",
                                location=_where(source, "message"))
        message_type = str(types[0])
        structure = _text(source, "structure")
        versions = _codes(source.get("versions"), _where(source, "versions"))
        if not self.part and self.path.stem != message_type.replace("^", "_"):
            raise LoadError("file name must be the message type (ADT_A01.yaml)",
                            location=source.where("message"))
        _text(data, "purpose")
        header = {"mapping": mapping_id, "source": dict(source), "purpose": data["purpose"]}
        spec = MessageMapping(id=mapping_id, file=str(self.path), header=header,
                              message_type=message_type, structure=structure,
                              versions=versions, dataset=None, catalog=None,
                              message_types=tuple(str(t) for t in types))
        if "dispatch" in data:
            disp = _mapping(data, "dispatch")
            _keys(disp, frozenset({"path", "cases"}))
            cases = _mapping(disp, "cases")
            if not cases or not all(isinstance(v, str) and v for v in cases.values()):
                raise LoadError("cases map codes to mapping ids", location=disp.where("cases"))
            spec.dispatch = (parse_path(disp.get("path"), _where(disp, "path")), dict(cases))
            for key in ("target", "elements", "groups", "sums"):
                if key in data:
                    raise LoadError("a dispatching file maps nothing itself", location=data.where(key))
            header["dispatch"] = dict(cases)
            return spec
        target = _mapping(data, "target")
        _keys(target, _TARGET_KEYS)
        _text(target, "standard")
        spec.dataset = _text(target, "dataset")
        subset = target.get("subset")
        self.catalog = target_catalog(spec.dataset, subset, _where(target, "dataset"))
        spec.catalog = self.catalog
        header["target"] = dict(target)
        if "required_segments" in data:
            segs = data["required_segments"]
            if not isinstance(segs, list) or not all(
                    isinstance(s, str) and re.fullmatch(r"[A-Z][A-Z0-9]{2}", s) for s in segs):
                raise LoadError("required_segments is a list of segment ids",
                                location=data.where("required_segments"))
            spec.required_segments = tuple(segs)
        spec.elements = self.element_rules(data.get("elements"), _where(data, "elements"))
        groups = data.get("groups", SourceMap())
        if not isinstance(groups, SourceMap):
            raise LoadError("groups must be a mapping", location=data.where("groups"))
        for name, gdata in groups.items():
            if not isinstance(gdata, SourceMap):
                raise LoadError("a group must be a mapping", location=groups.where(name))
            _keys(gdata, _GROUP_KEYS)
            seg = _text(gdata, "segment")
            when = self.when(gdata["when"], gdata.where("when"), seg) if "when" in gdata else None
            spec.groups.append(GroupSpec(
                name, groups.where(name), seg, when,
                self.element_rules(gdata.get("elements"), _where(gdata, "elements"), seg)))
        if "sums" in data:
            spec.sums = self.sums(_mapping(data, "sums"))
        if "unused" in data:
            unused = _mapping(data, "unused")
            for key, reason in unused.items():
                self.element_id(key, unused.where(key))
                if not isinstance(reason, str) or not reason:
                    raise LoadError("give the reason as a string", location=unused.where(key))
            spec.unused = dict(unused)
        return spec

    def sums(self, data: SourceMap) -> SumSpec:
        _keys(data, _SUMS_KEYS)
        seg = _text(data, "segment")
        cat = _mapping(data, "category")
        _keys(cat, frozenset({"path", "valueset"}))
        category = parse_path(cat.get("path"), _where(cat, "path"))
        vs = self.valueset(cat)
        fee_class: ValueSetMap | None = None
        if "fee_class" in data:
            fee_class = self.valuesets.get(data["fee_class"])
            if fee_class is None:
                raise LoadError("unknown value set", location=data.where("fee_class"))
            for concept in fee_class.concepts.values():
                self.element_id(concept.target, fee_class.where(concept.code, "target"))
            for concept in vs.concepts.values():
                if (concept.target or concept.code) not in fee_class.concepts:
                    # Either table may be the site's: the message names the fee classes'
                    # file too, the location the charge item's.
                    raise LoadError(f"the charge item names no fee class of {fee_class.id} "
                                    f"(as {_where(cat, 'valueset')} reads it; the fee "
                                    f"classes are at {fee_class.where(key='concepts')})",
                                    location=vs.where(concept.code, "target"))
        else:
            for concept in vs.concepts.values():
                self.element_id(concept.target, vs.where(concept.code, "target"))
        transaction: Path_ | None = None
        tvs: ValueSetMap | None = None
        if "transaction" in data:
            tdata = _mapping(data, "transaction")
            _keys(tdata, frozenset({"path", "valueset"}))
            transaction = parse_path(tdata.get("path"), _where(tdata, "path"))
            tvs = self.valueset(tdata)
            for concept in tvs.concepts.values():
                if (concept.target or concept.code) not in TRANSACTION_TYPES:
                    raise LoadError("the transaction type is not mapped to one of "
                                    + ", ".join(TRANSACTION_TYPES),
                                    location=tvs.where(concept.code, "target"))
            if transaction.segment != seg:
                raise LoadError("sums read their own segment", location=_where(tdata, "path"))
        transaction_id: Path_ | None = None
        if "transaction_id" in data:
            transaction_id = parse_path(data["transaction_id"], data.where("transaction_id"))
            if transaction_id.segment != seg:
                raise LoadError("sums read their own segment",
                                location=data.where("transaction_id"))
        amount = parse_path(data.get("amount"), _where(data, "amount"))
        if category.segment != seg or amount.segment != seg:
            raise LoadError("sums read their own segment", location=data.where("segment"))
        total = self.element_id(data["total"], data.where("total")) if "total" in data else None
        within: dict[str, str] = {}
        if "within" in data:
            raw = _mapping(data, "within")
            for child, parent in raw.items():
                within[self.element_id(child, raw.where(child))] = self.element_id(
                    parent, raw.where(child))
        when = self.when(data["when"], data.where("when"), seg) if "when" in data else None
        return SumSpec(data.where(), seg, category, vs, amount, total, within, when,
                       fee_class=fee_class, transaction=transaction, transaction_valueset=tvs,
                       transaction_id=transaction_id)


@lru_cache(maxsize=8)
def hl7_valuesets(files: MappingFiles = SHIPPED) -> dict[str, ValueSetMap]:
    """Shared value sets plus the HL7 table maps in ``hl7v2/valuesets`` (a site's on top)."""
    shared = dict(valuesets_for(files))
    own = load_valuesets(files.folder("hl7v2/valuesets"))
    for key, vs in own.items():
        if key in shared:
            raise LoadError("value set id also used in mappings/valuesets",
                            location=str(files.file(f"hl7v2/valuesets/{key}.yaml")))
        shared[key] = vs
    return shared


def condition_loader(path: Path, valuesets: dict[str, ValueSetMap]) -> _Loader:
    """A loader whose ``when(data, where)`` reads conditions in another file's format
    (the visit files use the message files' conditions)."""
    return _Loader(path, valuesets, part=True)


def read_fields(spec: MessageMapping) -> frozenset[tuple[str, int]]:
    """Every ``(segment, field)`` the mapping reads: rules, selects, conditions, sums."""
    found: set[tuple[str, int]] = set()

    def path(p: Path_ | None) -> None:
        if p is not None:
            found.add((p.segment, p.field))

    def when(w: When | None) -> None:
        if w is not None:
            path(w.path)
            for inner in w.all_of:
                when(inner)

    def rules(items: list[ElementRules]) -> None:
        for er in items:
            for rule in er.rules:
                for p in (*rule.paths, *rule.at):
                    path(p)
                if rule.select is not None:
                    path(rule.select.path)
                when(rule.when)

    rules(spec.elements)
    for group in spec.groups:
        when(group.when)
        rules(group.elements)
    if spec.sums is not None:
        for p in (spec.sums.category, spec.sums.amount, spec.sums.transaction,
                  spec.sums.transaction_id):
            path(p)
        when(spec.sums.when)
    if spec.dispatch is not None:
        path(spec.dispatch[0])
    return frozenset(found)


def field_elements(spec: MessageMapping) -> dict[tuple[str, int], list[str]]:
    """For each ``(segment, field)`` the mapping reads, the data elements that need it
    (a refusal of the field names them)."""
    out: dict[tuple[str, int], list[str]] = {}

    def add(p: Path_ | None, element: str) -> None:
        if p is not None:
            found = out.setdefault((p.segment, p.field), [])
            if element not in found:
                found.append(element)

    def when(w: When | None, element: str) -> None:
        if w is not None:
            add(w.path, element)
            for inner in w.all_of:
                when(inner, element)

    def rules(items: list[ElementRules]) -> None:
        for er in items:
            for rule in er.rules:
                for p in (*rule.paths, *rule.at):
                    add(p, er.element)
                if rule.select is not None:
                    add(rule.select.path, er.element)
                when(rule.when, er.element)

    rules(spec.elements)
    for group in spec.groups:
        rules(group.elements)
    if spec.sums is not None:
        classes = spec.sums.fee_class or spec.sums.valueset
        rows = sorted({c.target or c.code for c in classes.concepts.values()})
        for p in (spec.sums.category, spec.sums.amount, spec.sums.transaction,
                  spec.sums.transaction_id):
            for element in ([spec.sums.total] if spec.sums.total else rows[:1]):
                add(p, element)
    return out


def load_message_mapping(path: Path, valuesets: dict[str, ValueSetMap], *,
                         part: bool = False) -> MessageMapping:
    """Load and check one message mapping file (``part``: a visit part, see visits/)."""
    return _Loader(path, valuesets, part=part).load()


@lru_cache(maxsize=8)
def shipped_mappings(files: MappingFiles = SHIPPED) -> dict[str, MessageMapping]:
    """Every file in ``hl7v2/messages`` (a site's on top), keyed by message type (``ADT^A01``)."""
    valuesets = hl7_valuesets(files)
    by_type: dict[str, MessageMapping] = {}
    for path in files.folder("hl7v2/messages"):
        spec = load_message_mapping(path, valuesets)
        by_type[spec.message_type] = spec
    ids = {s.id for s in by_type.values()}
    for spec in by_type.values():
        if spec.dispatch is not None:
            for code, target in spec.dispatch[1].items():
                if target not in ids:
                    raise LoadError("dispatch names an unknown mapping id",
                                    location=f"{spec.file} dispatch.cases.{code}")
    return by_type


__all__ = ["MessageMapping", "load_message_mapping", "shipped_mappings"]
