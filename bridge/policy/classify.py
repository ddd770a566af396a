"""Classification: data category, grade and sensitivity labels for each resource.

GB/T 39725-2020 §6.1 sorts health data into categories, §6.2 into grades 1-5, and
§11.1.2.3 singles out eight special-disease classes whose details are grade 5 (§6.2 e).
Both are data files the operator may edit:

* ``mappings/policy/classification.yaml`` gives every element of every exchanged
  resource type a category and a grade (a resource default plus per-element overrides,
  dotted paths for children such as ``address.city``);
* ``mappings/policy/sensitive-icd10.yaml`` (diagnoses) and ``sensitive-icd9cm3.yaml``
  (treatments) name the special-disease classes as code ranges.

:func:`label_resource` writes the result as ``meta.security`` codings:

* ``http://terminology.hl7.org/CodeSystem/v3-Confidentiality`` — N (grades 1-2),
  R (grades 3-4), V (grade 5);
* ``urn:ws-fhir-bridge:grade`` — the highest grade of any element present;
* ``urn:ws-fhir-bridge:data-category`` — every §6.1 category of the elements present;
* ``urn:ws-fhir-bridge:sensitivity`` — the special-disease classes named anywhere in it.

A special-disease code in a resource's own code (``Condition.code``, ``Procedure.code``)
lifts the whole resource to grade 5; one inside a repeating element
(``Claim.diagnosis.diagnosisCodeableConcept``, ``Encounter.reasonCode``) lifts that entry,
so consent can hold back the entry and send the rest (the *items* of a resource).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from bridge.errors import LoadError
from bridge.policy._yaml import Key, LocatedYAML, load_located
from bridge.records.fhir import element_specs
from bridge.resources import mappings_dir

CATEGORY_SYSTEM = "urn:ws-fhir-bridge:data-category"
SENSITIVITY_SYSTEM = "urn:ws-fhir-bridge:sensitivity"
GRADE_SYSTEM = "urn:ws-fhir-bridge:grade"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
_OWN_SYSTEMS = frozenset({CATEGORY_SYSTEM, SENSITIVITY_SYSTEM, GRADE_SYSTEM, CONFIDENTIALITY_SYSTEM})

#: Elements that are never classified (always kept; ``meta`` carries the labels).
UNCLASSIFIED = frozenset({"resourceType", "id", "meta"})

SENSITIVE_GRADE = 5
_SHAPES = 4096
GRADES = frozenset({1, 2, 3, 4, 5})


# --- special-disease codes ------------------------------------------------------------


@dataclass(frozen=True)
class SensitiveCodes:
    """Special-disease classes as code ranges, per code system, loaded from policy files."""

    # (code systems, ((class code, low bound, high bound), ...)) per loaded file; bounds
    # normalised (upper case, no dots or spaces).
    tables: tuple[tuple[frozenset[str], tuple[tuple[str, str, str], ...]], ...]
    titles: dict[str, str]
    _memo: dict[tuple[str, str], frozenset[str]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _any_memo: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)
    _text_memo: dict[bytes, bool] = field(default_factory=dict, repr=False, compare=False)
    # The texts of _text_memo whose answer is True.
    _text_hits: set[bytes] = field(default_factory=set, repr=False, compare=False)

    @property
    def systems(self) -> frozenset[str]:
        """Every code system whose codes are matched."""
        return frozenset(s for systems, _ in self.tables for s in systems)

    def classes_of(self, system: str | None, code: str | None) -> frozenset[str]:
        """Special-disease classes a code falls in (empty for systems not listed)."""
        if not code or not system:
            return frozenset()
        key = (system, code)
        found = self._memo.get(key)
        if found is not None:
            return found
        norm = _normalise(code)
        hits: set[str] = set()
        for systems, ranges in self.tables:
            if system in systems:
                hits.update(
                    cls for cls, lo, hi in ranges if lo <= norm[: len(lo)] and norm[: len(hi)] <= hi
                )
        found = frozenset(hits)
        if len(self._memo) < 100_000:  # codes repeat; the bound keeps hostile input in check
            self._memo[key] = found
        return found

    def may_name_a_class(self, code: str) -> bool:
        """Could this code name a special-disease class under any listed system? (A
        quick filter: False means no coding with this code is special.)"""
        found = self._any_memo.get(code)
        if found is None:
            found = any(self.classes_of(system, code) for system in self.systems)
            if len(self._any_memo) < 100_000:
                self._any_memo[code] = found
        return found

    def may_name_a_class_text(self, raw: bytes) -> bool:
        """:meth:`may_name_a_class` for a code as it stands in JSON text (the string's
        content, escapes and all), remembered by that text."""
        found = self._text_memo.get(raw)
        if found is None:
            code = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
            found = self.may_name_a_class(code)
            if len(self._text_memo) < 100_000:
                self._text_memo[raw] = found
                if found:
                    self._text_hits.add(raw)
        return found

    def may_name_a_class_in(self, raws: set[bytes]) -> bool:
        """Could any of these codes (as :meth:`may_name_a_class_text` takes them) name a
        special-disease class? The codes answered before are settled by set operations."""
        if not self._text_hits.isdisjoint(raws):
            return True
        # What the memory does not hold yet (a set less a dict: one look-up per code).
        return any(self.may_name_a_class_text(raw) for raw in raws.difference(self._text_memo))

    def classes_of_concept(self, concept: Any) -> frozenset[str]:
        """Union of the classes of every coding of a CodeableConcept."""
        if not isinstance(concept, dict):
            return frozenset()
        found: frozenset[str] = frozenset()
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict):
                hit = self.classes_of(coding.get("system"), coding.get("code"))
                if hit:
                    found = found | hit
        return found

    def merged(self, other: SensitiveCodes) -> SensitiveCodes:
        """Both files' ranges in one matcher."""
        return SensitiveCodes(self.tables + other.tables, {**other.titles, **self.titles})


def _normalise(code: str) -> str:
    return str(code).strip().upper().replace(".", "").replace(" ", "")


def load_sensitive_codes(path: Path | None = None) -> SensitiveCodes:
    """Load one special-disease range file; a mistake raises LoadError naming file:line key."""
    doc = load_located(path or mappings_dir() / "policy" / "sensitive-icd10.yaml")
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("expected a mapping", ())
    systems = data.get("systems")
    if not isinstance(systems, list) or not systems or not all(isinstance(s, str) for s in systems):
        raise doc.error("systems must be a non-empty list of URIs", ("systems",))
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise doc.error("classes must be a mapping", ("classes",))
    ranges: list[tuple[str, str, str]] = []
    titles: dict[str, str] = {}
    for cls, body in classes.items():
        if not isinstance(body, dict) or not (
            isinstance(body.get("ranges"), list) or isinstance(body.get("codes"), list)
        ):
            raise doc.error("a class needs a list of ranges or codes", ("classes", cls, "ranges"))
        unknown = set(body) - {"title", "ranges", "codes"}
        if unknown:
            raise doc.error("unknown key", ("classes", cls, min(unknown)))
        titles[cls] = str(body.get("title") or cls)
        for i, item in enumerate(body.get("codes") or []):
            key = ("classes", cls, "codes", i)
            if not isinstance(item, str) or not item.strip():
                raise doc.error("a code is a quoted string", key)
            code = _normalise(item)
            # Matched whole: a high bound one NUL past the code admits the code itself
            # but nothing longer that starts with it.
            ranges.append((str(cls), code, code + "\x00"))
        for i, item in enumerate(body.get("ranges") or []):
            key = ("classes", cls, "ranges", i)
            if not isinstance(item, str) or not item.strip():
                raise doc.error("a range is a quoted code or LOW-HIGH", key)
            lo, _, hi = item.partition("-")
            lo, hi = _normalise(lo), _normalise(hi or lo)
            if not lo or not hi or hi < lo[: len(hi)]:
                raise doc.error("range bounds are empty or reversed", key)
            ranges.append((str(cls), lo, hi))
    return SensitiveCodes(((frozenset(systems), tuple(ranges)),), titles)


@lru_cache(maxsize=1)
def default_sensitive_codes() -> SensitiveCodes:
    """The installed diagnosis, treatment and laboratory-test files, merged (loaded once).

    The treatment and test files may only use classes the diagnosis file defines, so
    all name the same eight classes.
    """
    diagnoses = load_sensitive_codes()
    merged = diagnoses
    for name in ("sensitive-icd9cm3.yaml", "sensitive-loinc.yaml"):
        path = mappings_dir() / "policy" / name
        other = load_sensitive_codes(path)
        unknown = set(other.titles) - set(diagnoses.titles)
        if unknown:
            raise LoadError(
                "class is not defined in sensitive-icd10.yaml",
                location=f"{path} classes.{min(unknown)}",
            )
        merged = merged.merged(other)
    return merged


# --- the classification scheme -------------------------------------------------------


class PlainLabel(NamedTuple):
    """What labelling gives a resource that nothing lifts (see :meth:`TypeClass.plain`):
    its grade (also its own), confidentiality, categories (also its own, or the type's)
    and the ``meta.security`` codes it writes, as (system, code) pairs."""

    grade: int
    confidentiality: str
    categories: frozenset[str]
    own_categories: frozenset[str]
    security: tuple[tuple[str, str], ...]
    #: The fields of the :class:`ResourceLabel` such a resource gets (its index and id
    #: are the resource's own).
    fields: dict[str, Any]


@dataclass(frozen=True)
class ElementClass:
    """Grade and category of one element, and overrides for some of its children."""

    grade: int
    category: str
    children: dict[str, ElementClass] | None = None


@dataclass(frozen=True)
class TypeClass:
    """Classification of one resource type.

    ``elements`` holds the overrides (a tree); any element not in it has the type's
    ``grade`` and ``category``. ``items`` are the repeating elements whose entries are
    judged on their own; ``sensitive_resource`` the elements whose special-disease code
    lifts the whole resource, ``sensitive_items`` per item element the paths (inside one
    entry) whose code lifts that entry.
    """

    resource_type: str
    category: str
    grade: int
    elements: dict[str, ElementClass]
    items: frozenset[str] = frozenset()
    sensitive_resource: tuple[str, ...] = ()
    sensitive_items: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    @cached_property
    def default_element(self) -> ElementClass:
        """The grade and category of an element without an override."""
        return ElementClass(self.grade, self.category)

    @cached_property
    def shapes(self) -> dict[tuple[str, ...], tuple[int, frozenset[str], tuple[str, ...]]]:
        """Per set of element names (a resource's keys, in order), what labelling needs
        of them: the highest grade and the categories of the elements judged by name
        alone, and the names that need their values read (items, overrides below)."""
        return {}

    def shape(self, keys: tuple[str, ...]) -> tuple[int, frozenset[str], tuple[str, ...]]:
        """See :attr:`shapes` (a few shapes recur: computed once each)."""
        found = self.shapes.get(keys)
        if found is None:
            top = 0
            cats: set[str] = set()
            slow: list[str] = []
            for key in keys:
                if key in UNCLASSIFIED:
                    continue
                base = key[1:] if key[:1] == "_" else key
                node = self.elements.get(base) or self.default_element
                if not node.children and base not in self.items:
                    cats.add(node.category)
                    top = max(top, node.grade)
                else:
                    slow.append(key)
            found = (top, frozenset(cats), tuple(slow))
            if len(self.shapes) < _SHAPES:  # the bound keeps odd input in check
                self.shapes[keys] = found
        return found

    @cached_property
    def plains(self) -> dict[tuple[str, ...], PlainLabel]:
        """Per set of element names (as :attr:`shapes`), the label of a resource of that
        shape that nothing lifts: no element needs its value read and no special-disease
        code or inherited class. Such a label depends on the names alone."""
        return {}

    def plain(self, keys: tuple[str, ...]) -> PlainLabel:
        """See :attr:`plains` (for a shape whose ``slow`` names are none)."""
        found = self.plains.get(keys)
        if found is None:
            own_top, flat_cats, _ = self.shape(keys)
            grade = own_top or self.grade
            conf = confidentiality(grade)
            categories = flat_cats - {""}
            own_categories = categories or frozenset({self.category}) - {""}
            found = PlainLabel(
                grade, conf, categories, own_categories,
                _security_codes(conf, grade, categories, frozenset()),
                {
                    "index": 0,
                    "resource_type": self.resource_type,
                    "id": None,
                    "category": self.category or None,
                    "grade": grade,
                    "confidentiality": conf,
                    "sensitive_classes": frozenset(),
                    "categories": categories,
                    "own_categories": own_categories,
                    "own_sensitive": frozenset(),
                    "items": (),
                    "own_grade": grade,
                },
            )
            if len(self.plains) < _SHAPES:
                self.plains[keys] = found
        return found

    def element(self, path: str) -> ElementClass:
        """Grade and category of a dotted element path (the longest listed prefix decides)."""
        node = ElementClass(self.grade, self.category, self.elements)
        for seg in path.split("."):
            child = (node.children or {}).get(seg)
            if child is None:
                return ElementClass(node.grade, node.category)
            node = child
        return node

    def with_overrides(self, overrides: dict[str, int]) -> TypeClass:
        """A copy in which each dotted path (and everything inside it) has the given grade.

        Link profiles use this for transformed elements: a pseudonymised identifier is
        no longer the grade-4 identifier it came from.
        """
        if not overrides:
            return self
        elements = dict(self.elements)
        for path, grade in overrides.items():
            segs = path.split(".")
            _override(elements, segs, grade, self.element(path).category)
        return TypeClass(
            self.resource_type, self.category, self.grade, elements, self.items,
            self.sensitive_resource, self.sensitive_items,
        )


def _override(tree: dict[str, ElementClass], segs: list[str], grade: int, category: str) -> None:
    head = segs[0]
    if len(segs) == 1:
        tree[head] = ElementClass(grade, category)
        return
    current = tree.get(head)
    children = dict(current.children or {}) if current is not None else {}
    _override(children, segs[1:], grade, category)
    base = current or ElementClass(grade, category)
    tree[head] = ElementClass(base.grade, base.category, children)


@dataclass(frozen=True)
class ClassificationScheme:
    """Categories and per-type classifications, as loaded from classification.yaml."""

    categories: dict[str, str]
    types: dict[str, TypeClass]
    source: str = ""

    def of(self, resource_type: str) -> TypeClass:
        """The classification of a type; unlisted types are grade 4 with no category
        label (identifiable data of an unknown kind is treated as identifying)."""
        found = self.types.get(resource_type)
        if found is not None:
            return found
        return TypeClass(resource_type, "", 4, {})


def _grade(doc: LocatedYAML, value: Any, key: Key) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in GRADES - {5}:
        raise doc.error("grade must be 1, 2, 3 or 4 (5 comes from special-disease codes)", key)
    return value


def _category(doc: LocatedYAML, value: Any, categories: dict[str, str], key: Key) -> str:
    if value not in categories:
        raise doc.error("unknown data category", key)
    return str(value)


def _element_path(doc: LocatedYAML, rtype: str, path: Any, key: Key) -> list[tuple[str, str | None]]:
    """Check a dotted path against the FHIR model; return (segment, type) pairs."""
    if not isinstance(path, str) or not path:
        raise doc.error("an element path is a non-empty string", key)
    out: list[tuple[str, str | None]] = []
    type_name: str | None = rtype
    segs = path.split(".")
    for depth, seg in enumerate(segs):
        if type_name is None:
            raise doc.error(f"{'.'.join(segs[:depth])} has no child elements", key)
        specs = element_specs(type_name)
        if seg not in specs or (depth == 0 and seg in UNCLASSIFIED):
            raise doc.error(f"{'.'.join(segs[: depth + 1])} is not an element of {rtype}", key)
        type_name = specs[seg].type_name
        out.append((seg, type_name))
    return out


def load_classification(path: Path | None = None) -> ClassificationScheme:
    """Load and check classification.yaml; a mistake raises LoadError naming file:line key."""
    path = path or mappings_dir() / "policy" / "classification.yaml"
    doc = load_located(path)
    data = doc.data
    if not isinstance(data, dict) or set(data) != {"categories", "resources"}:
        raise doc.error("expected the keys categories and resources", ())
    categories = data["categories"]
    if not isinstance(categories, dict) or not categories:
        raise doc.error("categories must map codes to titles", ("categories",))
    categories = {str(k): str(v) for k, v in categories.items()}
    resources = data["resources"]
    if not isinstance(resources, dict) or not resources:
        raise doc.error("resources must map resource types to classifications", ("resources",))
    types: dict[str, TypeClass] = {}
    for rtype, body in resources.items():
        key: Key = ("resources", rtype)
        try:
            specs = element_specs(str(rtype))
        except KeyError:
            raise doc.error(f"{rtype} is not a FHIR resource type", key) from None
        if "meta" not in specs or "implicitRules" not in specs:
            raise doc.error(f"{rtype} is not a FHIR resource type", key)
        if not isinstance(body, dict):
            raise doc.error("a resource entry is a mapping", key)
        unknown = set(body) - {"category", "grade", "elements", "items", "sensitive", "note"}
        if unknown:
            raise doc.error("unknown key", (*key, min(unknown)))
        category = _category(doc, body.get("category"), categories, (*key, "category"))
        grade = _grade(doc, body.get("grade"), (*key, "grade"))
        elements: dict[str, ElementClass] = {}
        raw_elements = body.get("elements") or {}
        if not isinstance(raw_elements, dict):
            raise doc.error("elements must map element paths to grades", (*key, "elements"))
        # Parents before children, so a child inherits its parent's override.
        for epath in sorted(raw_elements, key=lambda p: str(p).count(".")):
            ekey = (*key, "elements", str(epath))
            _element_path(doc, str(rtype), epath, ekey)
            spec = raw_elements[epath]
            if isinstance(spec, dict):
                if set(spec) - {"grade", "category"} or not spec:
                    raise doc.error("an element is a grade or {grade, category}", ekey)
                parent = _resolve(elements, grade, category, str(epath))
                egrade = _grade(doc, spec["grade"], ekey) if "grade" in spec else parent.grade
                ecat = (
                    _category(doc, spec["category"], categories, ekey)
                    if "category" in spec
                    else parent.category
                )
            else:
                egrade = _grade(doc, spec, ekey)
                ecat = _resolve(elements, grade, category, str(epath)).category
            _place(elements, str(epath).split("."), ElementClass(egrade, ecat), grade, category)
        items = body.get("items") or []
        if not isinstance(items, list):
            raise doc.error("items is a list of repeating elements", (*key, "items"))
        for i, name in enumerate(items):
            ikey = (*key, "items", i)
            if not isinstance(name, str) or name not in specs or specs[name].type_name is None:
                raise doc.error("an item is a repeating complex element of the resource", ikey)
        sensitive = body.get("sensitive") or {}
        if not isinstance(sensitive, dict) or set(sensitive) - {"resource", "items"}:
            raise doc.error("sensitive has resource and items lists", (*key, "sensitive"))
        resource_codes: list[str] = []
        for i, name in enumerate(sensitive.get("resource") or []):
            skey = (*key, "sensitive", "resource", i)
            segs = _element_path(doc, str(rtype), name, skey)
            if len(segs) != 1 or segs[0][1] != "CodeableConcept":
                raise doc.error("a resource code is a CodeableConcept element of the resource", skey)
            resource_codes.append(str(name))
        item_codes: dict[str, list[tuple[str, ...]]] = {}
        for i, name in enumerate(sensitive.get("items") or []):
            skey = (*key, "sensitive", "items", i)
            segs = _element_path(doc, str(rtype), name, skey)
            if segs[-1][1] != "CodeableConcept":
                raise doc.error("an item code is a CodeableConcept element", skey)
            if segs[0][0] not in items:
                raise doc.error(f"{segs[0][0]} must be listed in items", skey)
            item_codes.setdefault(segs[0][0], []).append(tuple(s for s, _ in segs[1:]))
        types[str(rtype)] = TypeClass(
            resource_type=str(rtype),
            category=category,
            grade=grade,
            elements=elements,
            items=frozenset(items),
            sensitive_resource=tuple(resource_codes),
            sensitive_items={k: tuple(v) for k, v in item_codes.items()},
        )
    return ClassificationScheme(categories, types, str(path))


def _resolve(tree: dict[str, ElementClass], grade: int, category: str, path: str) -> ElementClass:
    node = ElementClass(grade, category, tree)
    for seg in path.split("."):
        child = (node.children or {}).get(seg)
        if child is None:
            return ElementClass(node.grade, node.category)
        node = child
    return node


def _place(
    tree: dict[str, ElementClass], segs: list[str], leaf: ElementClass, grade: int, category: str
) -> None:
    """Put ``leaf`` at ``segs``; parents not listed themselves inherit ``grade``/``category``."""
    head = segs[0]
    current = tree.get(head)
    if len(segs) == 1:
        tree[head] = ElementClass(leaf.grade, leaf.category, current.children if current else None)
        return
    if current is None:
        current = ElementClass(grade, category)
    children = dict(current.children or {})
    _place(children, segs[1:], leaf, current.grade, current.category)
    tree[head] = ElementClass(current.grade, current.category, children)


@lru_cache(maxsize=1)
def default_classification() -> ClassificationScheme:
    """The installed ``mappings/policy/classification.yaml`` (loaded once)."""
    return load_classification()


# --- labelling ------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemLabel:
    """One entry of a repeating element judged on its own (``Claim.diagnosis[2]``)."""

    element: str
    index: int
    category: str
    grade: int
    sensitive_classes: frozenset[str]

    @property
    def path(self) -> str:
        return self.element


@dataclass(frozen=True)
class ResourceLabel:
    """Classification of one bundle entry.

    ``grade``, ``categories`` and ``sensitive_classes`` describe everything in the
    resource (they are what ``meta.security`` says); ``own_categories`` and
    ``own_sensitive`` leave out the item entries, which are judged on their own.
    """

    index: int
    resource_type: str
    id: str | None
    category: str | None
    grade: int
    confidentiality: str
    sensitive_classes: frozenset[str]
    categories: frozenset[str] = frozenset()
    own_categories: frozenset[str] = frozenset()
    own_sensitive: frozenset[str] = frozenset()
    items: tuple[ItemLabel, ...] = ()
    own_grade: int = 0


@dataclass(frozen=True)
class Classification:
    """A labelled copy of the bundle and the labels per entry."""

    bundle: dict[str, Any]
    labels: tuple[ResourceLabel, ...]

    def sensitive(self) -> list[ResourceLabel]:
        """Entries at grade 5 (a special-disease class)."""
        return [label for label in self.labels if label.sensitive_classes]


def _resource_label(fields: dict[str, Any], index: int, rid: str | None) -> ResourceLabel:
    """The ResourceLabel with ``fields`` (every field, in the order the class declares
    them), ``index`` and ``id`` ``rid``: the instance its constructor makes, without
    setting each field of a frozen dataclass one call at a time (every resource of every
    bundle is labelled)."""
    label: ResourceLabel = object.__new__(ResourceLabel)
    values = label.__dict__
    values.update(fields)
    values["index"] = index
    values["id"] = rid
    return label


def _item_label(
    element: str, index: int, category: str, grade: int, classes: frozenset[str]
) -> ItemLabel:
    """``ItemLabel(element, index, category, grade, classes)``, made as
    :func:`_resource_label` makes a ResourceLabel."""
    label: ItemLabel = object.__new__(ItemLabel)
    label.__dict__.update(element=element, index=index, category=category, grade=grade,
                          sensitive_classes=classes)
    return label


def confidentiality(grade: int) -> str:
    """v3 Confidentiality code of a grade: N (1-2), R (3-4), V (5)."""
    if grade >= SENSITIVE_GRADE:
        return "V"
    if grade >= 3:
        return "R"
    return "N"


def _value_grade(node: ElementClass, value: Any, cats: set[str]) -> int:
    """Highest grade inside one element's value, descending only where overrides exist."""
    cats.add(node.category)
    children = node.children
    if not children:
        return node.grade
    if isinstance(value, list):
        return max((_value_grade(node, v, cats) for v in value), default=node.grade)
    if not isinstance(value, dict):
        return node.grade
    grade = 0
    for key, sub in value.items():
        base = key.removeprefix("_")
        child = children.get(base)
        if child is None:
            cats.add(node.category)
            grade = max(grade, node.grade)
        else:
            grade = max(grade, _value_grade(child, sub, cats))
    return grade or node.grade


def _dig(value: Any, segs: tuple[str, ...]) -> list[Any]:
    current = [value]
    for seg in segs:
        nxt: list[Any] = []
        for v in current:
            if isinstance(v, dict):
                inner = v.get(seg)
                if isinstance(inner, list):
                    nxt.extend(inner)
                elif inner is not None:
                    nxt.append(inner)
        current = nxt
    return current


def label_resource(
    resource: dict[str, Any],
    tc: TypeClass,
    codes: SensitiveCodes,
    *,
    index: int = 0,
    write: bool = True,
    inherited: frozenset[str] = frozenset(),
) -> ResourceLabel:
    """Classify one resource; with ``write`` replace its labels in ``meta.security``
    (codings of other systems are kept). The resource is changed in place.

    ``inherited``: special-disease classes the resource carries because of what it
    summarises (a document's sections, see :func:`label_bundle`), judged as its own."""
    top = 0
    # Elements without overrides below them are judged by name alone (what
    # _value_grade answers without descending), once per shape of resource.
    keys = tuple(resource)
    own_top, flat_cats, slow = tc.shape(keys)
    if not slow and not inherited:
        # Most resources: only a special-disease code could lift them above what their
        # element names say, and the label of those names is worked out once.
        own_sensitive = inherited
        for name in tc.sensitive_resource:
            own_sensitive = own_sensitive | codes.classes_of_concept(resource.get(name))
        if not own_sensitive:
            plain = tc.plain(keys)
            if write:
                _write_security(resource, plain.security)
            rid = resource.get("id")
            return _resource_label(plain.fields, index, rid if isinstance(rid, str) else None)
    own_cats: set[str] = set(flat_cats)
    item_labels: list[ItemLabel] = []
    elements = tc.elements
    default = tc.default_element
    items = tc.items
    for key in slow:
        value = resource[key]
        base = key[1:] if key[:1] == "_" else key
        node = elements.get(base) or default
        if base in items and isinstance(value, list) and key == base:
            subpaths = tc.sensitive_items.get(base, ())
            flat = not node.children
            for i, entry in enumerate(value):
                g = node.grade if flat else _value_grade(node, entry, set())
                found: frozenset[str] = frozenset()
                for segs in subpaths:
                    for concept in _dig(entry, segs):
                        hit = codes.classes_of_concept(concept)
                        if hit:
                            found = found | hit
                if found:
                    g = SENSITIVE_GRADE
                item_labels.append(_item_label(base, i, node.category, g, found))
                top = max(top, g)
            continue
        g = _value_grade(node, value, own_cats)
        own_top = max(own_top, g)
    own_sensitive = inherited
    for name in tc.sensitive_resource:
        own_sensitive = own_sensitive | codes.classes_of_concept(resource.get(name))
    if own_sensitive:
        own_top = SENSITIVE_GRADE
    grade = max(top, own_top) or tc.grade
    sensitive = own_sensitive.union(*(it.sensitive_classes for it in item_labels))
    categories = frozenset(own_cats).union(it.category for it in item_labels) - {""}
    conf = confidentiality(grade)
    if write:
        _write_security(resource, _security_codes(conf, grade, categories, sensitive))
    rid = resource.get("id")
    return _resource_label({
        "index": index,
        "resource_type": tc.resource_type,
        "id": None,
        "category": tc.category or None,
        "grade": grade,
        "confidentiality": conf,
        "sensitive_classes": sensitive,
        "categories": categories,
        "own_categories": frozenset(own_cats) - {""} or frozenset({tc.category}) - {""},
        "own_sensitive": own_sensitive,
        "items": tuple(item_labels),
        "own_grade": own_top or tc.grade,
    }, index, rid if isinstance(rid, str) else None)


@lru_cache(maxsize=4096)
def _security_codes(
    conf: str, grade: int, categories: frozenset[str], sensitive: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """The (system, code) pairs a label writes, in the order it writes them (few
    combinations occur: each is worked out once)."""
    return (
        (CONFIDENTIALITY_SYSTEM, conf),
        (GRADE_SYSTEM, str(grade)),
        *((CATEGORY_SYSTEM, c) for c in sorted(categories)),
        *((SENSITIVITY_SYSTEM, c) for c in sorted(sensitive)),
    )


def _write_security(resource: dict[str, Any], codes: tuple[tuple[str, str], ...]) -> None:
    """Replace the codings of the label systems in ``meta.security`` with ``codes``
    (codings of other systems are kept, first)."""
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        # Most resources arrive without meta: nothing to keep.
        resource["meta"] = {"security": [{"system": system, "code": code}
                                         for system, code in codes]}
        return
    security = [
        c
        for c in meta.get("security") or ()
        if not (isinstance(c, dict) and c.get("system") in _OWN_SYSTEMS)
    ]
    security.extend([{"system": system, "code": code} for system, code in codes])
    meta["security"] = security


def label_bundle(
    bundle: dict[str, Any],
    *,
    codes: SensitiveCodes | None = None,
    scheme: ClassificationScheme | None = None,
    types: dict[str, TypeClass] | None = None,
) -> tuple[ResourceLabel, ...]:
    """Label every resource of a Bundle in place; ``types`` overrides the scheme per type
    (a link profile's view, with transformed elements regraded).

    A document (a resource with ``section``s, such as a discharge summary's Composition)
    is labelled with the special-disease classes of every resource its sections list:
    its narrative tells what those resources code (the course of a psychiatric stay), so
    it is special-disease data of the same classes, released only as they are.
    """
    codes = codes or default_sensitive_codes()
    scheme = scheme or default_classification()
    labels: list[ResourceLabel] = []
    documents: list[tuple[int, dict[str, Any], TypeClass]] = []
    for index, entry in enumerate(bundle.get("entry") or ()):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = str(resource.get("resourceType"))
        tc = (types or {}).get(rtype) or scheme.of(rtype)
        labels.append(label_resource(resource, tc, codes, index=index))
        if isinstance(resource.get("section"), list):
            documents.append((len(labels) - 1, resource, tc))
    if documents:
        by_ref = _labels_by_reference(bundle, labels)
        for at, resource, tc in documents:
            classes: frozenset[str] = frozenset()
            for ref in _section_references(resource.get("section")):
                found = by_ref.get(ref) or by_ref.get("/".join(ref.rsplit("/", 2)[-2:]))
                if found is not None:
                    classes |= found.sensitive_classes
            if classes - labels[at].own_sensitive:
                labels[at] = label_resource(resource, tc, codes, index=labels[at].index,
                                            inherited=classes)
    return tuple(labels)


def _labels_by_reference(
    bundle: dict[str, Any], labels: list[ResourceLabel]
) -> dict[str, ResourceLabel]:
    """Each label under the ways a reference can name its resource: the entry's
    ``fullUrl`` and ``Type/id``."""
    entries = bundle.get("entry") or []
    out: dict[str, ResourceLabel] = {}
    for label in labels:
        entry = entries[label.index]
        full = entry.get("fullUrl")
        if isinstance(full, str):
            out[full] = label
        if label.id is not None:
            out[f"{label.resource_type}/{label.id}"] = label
    return out


def _section_references(sections: Any) -> list[str]:
    """The references of ``section[].entry[]`` (and of nested sections)."""
    out: list[str] = []
    stack = [sections]
    while stack:
        node = stack.pop()
        if not isinstance(node, list):
            continue
        for section in node:
            if not isinstance(section, dict):
                continue
            for item in section.get("entry") or ():
                if isinstance(item, dict) and isinstance(item.get("reference"), str):
                    out.append(item["reference"])
            stack.append(section.get("section"))
    return out


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value, several times faster than ``copy.deepcopy``.

    orjson does the work; values it cannot encode (integers beyond 64 bits, which only
    malformed input has) fall back to a plain recursive copy.
    """
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        return _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def classify(
    bundle: dict[str, Any],
    *,
    codes: SensitiveCodes | None = None,
    scheme: ClassificationScheme | None = None,
) -> Classification:
    """Label every resource of a Bundle (a copy; the input is not changed).

    Existing ``meta.security`` codings of the four systems above are replaced, others
    are kept.
    """
    out = copy_json(bundle)
    return Classification(out, label_bundle(out, codes=codes, scheme=scheme))
