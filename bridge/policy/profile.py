"""Link profiles: the minimum-necessary allow-list of a link (GB/T 39725-2020 §7 j).

A profile is a YAML file in ``mappings/links/`` (format in ``mappings/links/README.md``)
listing, per resource type, the element paths a recipient may receive, the
de-identification transform applied to some of them, and the grades (§6.2) the link may
carry. A path is an element name (``identifier``: the element and everything in it) or
a dotted path into a complex element (``address.city``: only that child of each
address). ``resourceType``, ``id`` and ``meta`` (which carries the security labels) are
always kept.

Everything is checked when the file is loaded, and a mistake names ``file:line key``:
every path against the FHIR model, every transform against the closed registry of
:mod:`bridge.policy.transforms` and the element's type, every allowed element's grade
(from ``mappings/policy/classification.yaml``, after its transform) against the link's
grades, and the profile's own consistency (a resource type whose required elements are
not allowed could never be sent intact).

A profile may instead define *levels* (``regional-interoperability``: default, notify
and authorise, §11.1.2.1), each with its own grades; loading it for a level keeps only
the elements whose grade that level carries.

:meth:`LinkProfile.minimize` keeps only allowed elements of allowed resource types,
applies the transforms, and lists what it removed as FHIR paths (``Patient.address.line``,
``Practitioner``), never values. It never sends a broken resource: a resource that lacks
a required element after minimizing is omitted whole, references to omitted resources
are removed, and so are the repeating elements that such a removal leaves incomplete (a
``Claim.diagnosis`` entry whose ``diagnosisReference`` pointed at an omitted Condition).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from bridge.errors import ConfigError, LoadError, member_label, value_label
from bridge.policy._yaml import Key, LocatedYAML, load_located
from bridge.policy.classify import (
    GRADES,
    SENSITIVE_GRADE,
    ClassificationScheme,
    ElementClass,
    TypeClass,
    copy_json,
    default_classification,
)
from bridge.policy.transforms import (
    ANCHORED,
    TRANSFORMS,
    DeidContext,
    TransformSpec,
    check_key,
    encoded_stand_ins,
    id_stand_ins,
    person_key,
    pseudonymise_ids,
    rewrite_references,
)
from bridge.records.fhir import ElementSpec, element_specs
from bridge.resources import mappings_dir

ALWAYS_KEPT = frozenset({"resourceType", "id", "meta"})
# The order a minimized resource starts with them: fixed, so the same input gives the
# same JSON text in every process (a set's order changes with the string hash seed).
_KEPT_FIRST = ("resourceType", "id", "meta")
_BUNDLE_KEPT = frozenset({"resourceType", "id", "meta", "type", "identifier", "timestamp"})
ALL_GRADES = frozenset(GRADES)

# An allow tree maps an element name to None (the whole element) or to the allow tree
# of its children.
AllowTree = dict[str, "AllowTree | None"]


@dataclass(frozen=True)
class MinimizeResult:
    """A minimized bundle, the FHIR paths removed from it and the paths transformed."""

    bundle: dict[str, Any]
    removed: list[str]
    transformed: list[str] = field(default_factory=list)
    #: With ``read_codes``: the JSON text of every ``code`` member's string value in the
    #: input's resources, and possibly more (see :func:`code_values`); None when unknown.
    code_texts: set[bytes] | None = None


@dataclass(frozen=True)
class KAnonymity:
    """Batch release rule of a profile: ``k`` records must share the ``quasi`` values."""

    k: int
    quasi: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    """Which entries of a repeating element a profile allows: those whose child
    ``field`` (``system`` of an Identifier or ContactPoint, ``url`` of an Extension) has
    one of ``values``. Selecting identifiers by system, not the element whole, is what
    keeps a medical-record or health-card number off a link that needs only the
    identity document."""

    field: str
    values: frozenset[str]

    def admits(self, entry: Any) -> bool:
        return isinstance(entry, dict) and entry.get(self.field) in self.values


@dataclass(frozen=True)
class LinkProfile:
    """An allow-list of resource types and element paths for one kind of link.

    ``grades`` are the §6.2 grades the link carries (grade 5 — special diseases — only
    when a consent names the class); ``transforms`` maps full element paths
    (``Patient.birthDate``) to transform names; ``ids`` is ``keep`` or ``pseudonym``
    (resource ids and references replaced by keyed stand-ins); ``classes`` is the
    classification of each type as this link sees it (transformed elements regraded).
    ``matches`` selects entries of repeating elements by a child's value (full path ->
    :class:`Match`); ``rows`` gives, per allowed full path, the rows of the source
    table (``cites``) that justify it; ``focus`` names the resource types everything
    sent must be reachable from by references (empty: the Patient's connected part).
    ``uncovered_types`` is what a consent whose ``provision.class`` leaves out a type of
    the disclosure does: ``refuse`` the disclosure (a claim is one unit), or ``hold``
    back that type's resources and send the rest (a record pull: a patient may share
    laboratory results and nothing else). The Patient itself is never held back.
    """

    name: str
    title: str
    source: str
    allowed: dict[str, AllowTree]
    grades: frozenset[int] = ALL_GRADES
    transforms: dict[str, str] = field(default_factory=dict)
    ids: str = "keep"
    level: str | None = None
    k_anonymity: KAnonymity | None = None
    classes: dict[str, TypeClass] = field(default_factory=dict, repr=False)
    matches: dict[str, Match] = field(default_factory=dict)
    rows: dict[str, tuple[str, ...]] = field(default_factory=dict)
    focus: tuple[str, ...] = ()
    cites: str = ""
    refuse_without: tuple[str, ...] = ()
    uncovered_types: str = "refuse"

    @property
    def qualified_name(self) -> str:
        """``name`` or ``name:level``."""
        return f"{self.name}:{self.level}" if self.level else self.name

    @property
    def needs_key(self) -> bool:
        """Does minimizing need the controller's de-identification key?"""
        return self.ids == "pseudonym" or any(
            TRANSFORMS[t].needs_key for t in self.transforms.values()
        )

    @property
    def carries_sensitive(self) -> bool:
        """May grade-5 data (named by a consent) travel on this link at all?"""
        return SENSITIVE_GRADE in self.grades

    def allows_type(self, resource_type: str) -> bool:
        return resource_type in self.allowed

    def allowed_paths(self, resource_type: str) -> frozenset[str]:
        """The allowed element paths of a resource type, dotted (``address.city``)."""
        tree = self.allowed.get(resource_type)
        out: set[str] = set()

        def walk(node: AllowTree, prefix: str) -> None:
            for key, sub in node.items():
                path = f"{prefix}{key}"
                if sub is None:
                    out.add(path)
                else:
                    walk(sub, f"{path}.")

        if tree is not None:
            walk(tree, "")
        return frozenset(out)

    def table(self) -> list[tuple[str, str, str, str]]:
        """(full path, selection, transform, cited rows) of every allowed element path,
        in profile order: the profile as a reviewer reads it against its source."""
        out: list[tuple[str, str, str, str]] = []
        for rtype in self.allowed:
            for path in self._listed.get(rtype, sorted(self.allowed_paths(rtype))):
                full = f"{rtype}.{path}"
                m = self.matches.get(full)
                selection = f"{m.field} in {', '.join(sorted(m.values))}" if m else ""
                out.append((full, selection, self.transforms.get(full, ""),
                            "; ".join(self.rows.get(full, ()))))
        return out

    @property
    def _listed(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for full in self.rows:
            rtype, _, path = full.partition(".")
            if path in self.allowed_paths(rtype):
                out.setdefault(rtype, []).append(path)
        return out

    @cached_property
    def _rules(self) -> dict[tuple[str, bool], _Rules]:
        """Compiled allow trees, per (resource type, with transforms): see :func:`_compile`."""
        return {}

    def rules(self, resource_type: str, transforms: bool) -> _Rules | None:
        """The allow tree of a type compiled for pruning (None: the type is not allowed)."""
        found = self._rules.get((resource_type, transforms))
        if found is None:
            tree = self.allowed.get(resource_type)
            if tree is None:
                return None
            tf = ({p: TRANSFORMS[n] for p, n in self.transforms.items()}
                  if transforms and self.transforms else None)
            found = _compile(tree, resource_type, tf, self.matches)
            self._rules[(resource_type, transforms)] = found
        return found

    @cached_property
    def _pruning(self) -> dict[tuple[str, bool], _Children | None]:
        """:meth:`rules` with the names a resource keeps whole as they are (see
        :func:`_compile`), per (resource type, with transforms)."""
        return {}

    def pruning(self, resource_type: str, transforms: bool) -> _Children | None:
        """The compiled allow tree of a type and the names it keeps whole as they are
        (None: the type is not allowed)."""
        key = (resource_type, transforms)
        try:
            return self._pruning[key]
        except KeyError:
            rules = self.rules(resource_type, transforms)
            found = self._pruning[key] = None if rules is None else (rules, _whole(rules))
            return found

    @cached_property
    def anchored(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Per resource type, (element, source) of its anchored transforms."""
        out: dict[str, list[tuple[str, str]]] = {}
        for full, name in self.transforms.items():
            source = ANCHORED.get(name)
            rtype, _, element = full.partition(".")
            if source is not None and "." not in element:
                out.setdefault(rtype, []).append((element, source))
        return {k: tuple(v) for k, v in out.items()}

    def type_class(self, resource_type: str) -> TypeClass:
        """Classification of a type as this link sends it."""
        return self.classes.get(resource_type) or default_classification().of(resource_type)

    def minimize(
        self,
        bundle: dict[str, Any],
        *,
        key: bytes | None = None,
        owned: bool = False,
        pseudonymise: bool = True,
        read_codes: bool = False,
        complete: bool = False,
    ) -> MinimizeResult:
        """Return a bundle holding only what this profile allows, transformed, and what
        was removed. The input is not changed, unless ``owned``: the caller gives it up
        (see :func:`~bridge.policy.engine.apply_policy`), and it is then worked on in
        place, except where the copy does more than keep the input as it was (it writes
        pseudonymous ids in its own pass, and reads ``code_texts``).

        A profile with keyed transforms needs ``key`` (ConfigError otherwise): the
        controller's de-identification key, never stored in the profile. With
        ``pseudonymise=False`` resource ids are left for the caller to replace last.

        With ``read_codes`` the result also holds the codes of the input's resources
        (``code_texts``), read off the text the copy is made from and off what pruning
        left out, instead of writing the whole input out again.

        ``complete``: the caller vouches that every resource passed FHIR validation
        (:func:`~bridge.records.fhir.validate_resource`), which refuses empty values, so
        each holds its required elements, none empty. A resource that pruning then
        leaves as it was (nothing removed or transformed in it) is as complete as that,
        and is not walked again to find out.
        """
        ctx: DeidContext | None = None
        if self.needs_key:
            if key is None:
                raise ConfigError(
                    "this link profile needs the de-identification key",
                    location=f"profile {self.qualified_name}",
                )
            ctx = DeidContext(check_key(key), _patient_key(bundle))
        # Pseudonymous ids are written in the copy's pass, so a bundle that gets them is
        # copied even when given up.
        ids = ctx if pseudonymise and self.ids == "pseudonym" else None
        return _minimize(self, bundle, ctx, transforms=True,
                         copy=not owned or ids is not None or read_codes,
                         ids=ids, read_codes=read_codes, complete=complete)

    def check(self, bundle: dict[str, Any]) -> list[str]:
        """Paths of ``bundle`` outside this profile (empty when it conforms).

        For a receiver: nothing is transformed and no key is needed.
        """
        return _minimize(self, bundle, None, transforms=False, copy=True).removed


def _patient_key(bundle: dict[str, Any]) -> str:
    """A stable key of the bundle's patient for keyed transforms: the same for every
    record of the person (see :func:`~bridge.policy.transforms.person_key`)."""
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            idents = [
                (str(i.get("system")), str(i.get("value")))
                for i in resource.get("identifier") or ()
                if isinstance(i, dict) and i.get("value")
            ]
            if idents:
                return person_key(idents)
            return f"Patient/{resource.get('id')}"
    return ""


def _minimize(
    profile: LinkProfile, work: dict[str, Any], ctx: DeidContext | None, *, transforms: bool,
    copy: bool, ids: DeidContext | None = None, read_codes: bool = False,
    complete: bool = False,
) -> MinimizeResult:
    """Prune ``work`` to the profile, then (on a copy of what survived, with ``copy``)
    clean references and drop what is incomplete or unreferenced. Pruning only reads
    its input, so copying after it copies the part that is sent, not the whole record.

    With ``ids`` the copy is made with pseudonymous ids (one pass over the JSON text for
    both). What is then dropped goes with every reference to it, so the ids of what
    remains, and the references between them, are what pseudonymising last would give.

    With ``read_codes`` every value of the input's resources that does not reach the copy
    as it was (left out, transformed, replaced by an anchor, or in a resource of a type
    not sent) is kept aside, under its member name, to read codes off.

    With ``complete`` (see :meth:`LinkProfile.minimize`) a resource pruning left as it
    was is known to be complete: every change pruning makes is listed in ``removed`` or
    ``transformed`` (or is an anchor put in place), so one with none listed has none."""
    gone: list[Any] | None = [] if read_codes else None
    removed: list[str] = []
    transformed: list[str] = []
    out: dict[str, Any] = {}
    for key, value in work.items():
        if key in _BUNDLE_KEPT:
            out[key] = value
        elif key != "entry":
            removed.append(f"Bundle.{member_label(key)}")
    tf = transforms and bool(profile.transforms)
    intact: list[bool] = []  # with ``complete``: per entry sent, whether pruning left it as it was
    entries: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    raw_entries = work.get("entry")
    for entry in raw_entries if isinstance(raw_entries, list) else ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            removed.append("Bundle.entry")
            continue
        rtype = str(resource.get("resourceType"))
        plan = profile.pruning(rtype, transforms)
        if plan is None:
            removed.append(member_label(rtype))
            dropped.append(entry)
            if gone is not None:
                gone.append(resource)
            continue
        for key in entry:
            if key not in ("fullUrl", "resource"):
                removed.append(f"Bundle.entry.{member_label(key)}")
        new_entry: dict[str, Any] = {}
        if "fullUrl" in entry:
            new_entry["fullUrl"] = entry["fullUrl"]
        changes = len(removed) + len(transformed)
        pruned: dict[str, Any] = {k: resource[k] for k in _KEPT_FIRST if k in resource}
        pruned.update(
            _prune(resource, plan, rtype, removed, transformed, ctx, gone, ALWAYS_KEPT))
        anchored = tf and _anchor(pruned, profile.anchored.get(rtype, ()), gone)
        if complete:
            intact.append(not anchored and len(removed) + len(transformed) == changes)
        new_entry["resource"] = pruned
        entries.append(new_entry)
    out["entry"] = entries
    refs: RefCache = {}
    code_texts: set[bytes] | None = set() if gone is not None and copy else None
    if copy:
        copied = _copy_minimized(out, ids, code_texts)
        if copied is None:
            code_texts = None
            out = copy_json(out)
            if ids is not None:
                pseudonymise_ids(out, ids)
        else:
            out, refs = copied
    if code_texts is not None:
        try:
            code_texts |= code_values(orjson.dumps(gone))
        except (TypeError, orjson.JSONEncodeError):
            code_texts = None
    known = ({id(e["resource"]) for e, whole in zip(out["entry"], intact, strict=True) if whole}
             if complete else None)
    out = _settle(out, _reference_keys(dropped), removed, refs, known)
    removed.extend(drop_unreferenced(out, profile.focus, refs))
    return MinimizeResult(bundle=out, removed=_unique(removed),
                transformed=_unique(transformed), code_texts=code_texts)


def _copy_minimized(
    bundle: dict[str, Any], ids: DeidContext | None, code_texts: set[bytes] | None = None
) -> tuple[dict[str, Any], RefCache] | None:
    """A deep copy of a pruned bundle (as :func:`copy_json` makes it), with ``ids``
    pseudonymous ids (as :func:`pseudonymise_ids` then makes them), and the references
    of each copied resource, read from the JSON text it was copied from rather than by
    writing it out again. None when the bundle is not plain JSON or a reference is
    written with escapes (the caller copies and walks instead). ``code_texts`` receives
    the code values of the copied resources (see :func:`code_values`)."""
    entries = bundle["entry"]
    mapping, plan = id_stand_ins(entries, ids) if ids is not None else ({}, None)
    encoded = encoded_stand_ins(mapping) if mapping else None
    cache: RefCache = {}
    out: dict[str, Any] = {}
    try:
        rest = orjson.loads(orjson.dumps({k: v for k, v in bundle.items() if k != "entry"}))
        copied: list[dict[str, Any]] = []
        texts: list[bytes] = []
        for n, entry in enumerate(entries):
            new_entry: dict[str, Any] = {}
            for key, value in entry.items():
                if key != "resource":
                    new_entry[key] = value if type(value) is str else orjson.loads(orjson.dumps(value))
                    continue
                text = orjson.dumps(value)
                if encoded is not None:
                    # The rewrite reads every reference of what it writes.
                    found: list[bytes] = []
                    rewritten = rewrite_references(text, encoded, found)
                    if rewritten is None:
                        return None
                    text = rewritten
                else:
                    found = _reference_values(text)
                resource = orjson.loads(text)
                cache[id(resource)] = (resource, _decode_refs(found))
                texts.append(text)
                new_entry[key] = resource
            ids_of = plan[n] if plan is not None else None
            if ids_of is not None:
                new, full = ids_of
                if full is not None:
                    new_entry["fullUrl"] = full
                new_entry["resource"]["id"] = new
            copied.append(new_entry)
    except (TypeError, orjson.JSONEncodeError):
        return None
    if code_texts is not None:
        # One read over the resources' texts side by side: a value ends inside its own.
        code_texts.update(code_values(b"".join(texts)))
    for key in bundle:
        out[key] = copied if key == "entry" else rest[key]
    return out, cache


def _anchor(
    resource: dict[str, Any], anchored: tuple[tuple[str, str], ...], gone: list[Any] | None
) -> bool:
    """Put anchored transforms' values in place (see ``transforms.ANCHORED``); the values
    they replace go to ``gone`` (see :func:`_minimize`). Whether any was."""
    changed = False
    for element, source in anchored:
        if element not in resource:
            continue
        changed = True
        if gone is not None:
            gone.append({element: resource[element]})
        period = resource.get(source)
        anchor = (period.get("end") or period.get("start")) if isinstance(period, dict) else None
        if anchor:
            resource[element] = anchor
        else:
            del resource[element]
    return changed


# --- pruning and reference cleaning -------------------------------------------------

# A compiled allow tree: per allowed element name, (its full path, the selection of its
# entries, its transform, the children or None for the whole element). The children are
# their compiled tree and the names in it kept whole as they are (no selection, no
# transform), with their primitives' extension siblings (``_status``): an object holding
# only those is kept as it is, and pruning copies such a member without looking at its
# rule. Compiled once per profile and type, so pruning formats no paths and looks up no
# selections or transforms by path for what it keeps.
_Rule = tuple[str, "Match | None", "TransformSpec | None", "_Children | None"]
_Rules = dict[str, _Rule]
_Children = tuple[_Rules, frozenset[str]]


def _whole(rules: _Rules) -> frozenset[str]:
    """The names of ``rules`` kept whole as they are, and their extension siblings:
    :func:`_prune` keeps each of those members as it is (see its rule ``sub is None``)."""
    names = [n for n, (_, match, spec, below) in rules.items()
             if match is None and spec is None and below is None]
    return frozenset([*names, *(f"_{n}" for n in names)])


def _compile(
    tree: AllowTree, path: str, tf: dict[str, TransformSpec] | None, matches: dict[str, Match]
) -> _Rules:
    out: _Rules = {}
    for name, sub in tree.items():
        full = f"{path}.{name}"
        children: _Children | None = None
        if sub is not None:
            rules = _compile(sub, full, tf, matches)
            children = (rules, _whole(rules))
        out[name] = (full, matches.get(full), tf.get(full) if tf is not None else None,
                     children)
    return out


def _prune(
    obj: dict[str, Any],
    plan: _Children,
    path: str,
    removed: list[str],
    transformed: list[str],
    ctx: DeidContext | None,
    gone: list[Any] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The allowed part of ``obj`` (``plan``: its compiled allow tree and the names kept
    whole). Values are shared, not copied: the caller owns them. With ``gone``, every
    value left out or transformed goes there under its member name."""
    rules, whole = plan
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in whole:
            out[key] = value
            continue
        if key in skip:
            continue
        # A primitive's extension sibling (``_birthDate``) follows its element.
        base = key[1:] if key[:1] == "_" else key
        rule = rules.get(base)
        if rule is None:
            removed.append(f"{path}.{member_label(base)}")
            if gone is not None:
                gone.append({key: value})
            continue
        full, match, spec, sub = rule
        if match is not None and key == base:
            entries = value if isinstance(value, list) else [value]
            admitted = [e for e in entries if match.admits(e)]
            for e in entries:
                if not match.admits(e):
                    what = e.get(match.field) if isinstance(e, dict) else None
                    removed.append(f"{full}[{match.field}={value_label(what)}]")
                    if gone is not None:
                        gone.append({key: e})
            if not admitted:
                continue
            value = admitted if isinstance(value, list) else admitted[0]
        if spec is not None:
            if gone is not None:
                gone.append({key: value})
            if key != base:
                # Extensions of a transformed primitive could carry the original.
                removed.append(f"{path}.{key}")
                continue
            new = spec.fn(value, ctx)
            if new is None:
                removed.append(full)
            else:
                out[key] = new
                transformed.append(full)
            continue
        if sub is None:
            out[key] = value
            continue
        if key != base:
            removed.append(f"{path}.{key}")
            if gone is not None:
                gone.append({key: value})
            continue
        below = sub[1]
        if isinstance(value, list):
            items = [
                dict(item) if item.keys() <= below
                else _prune(item, sub, full, removed, transformed, ctx, gone)
                for item in value
                if isinstance(item, dict)
            ]
            if len(items) != len(value):
                # What is not an object where objects belong (invalid input) goes, listed.
                removed.append(full)
                if gone is not None:
                    gone.append({key: [item for item in value if not isinstance(item, dict)]})
            # Items pruned to nothing go; their removed children are already listed.
            kept = [item for item in items if item]
            if kept:
                out[key] = kept
        elif isinstance(value, dict):
            pruned = (dict(value) if value.keys() <= below
                      else _prune(value, sub, full, removed, transformed, ctx, gone))
            if pruned:
                out[key] = pruned
        else:
            removed.append(full)
            if gone is not None:
                gone.append({key: value})
    return out


def _reference_keys(entries: Iterable[dict[str, Any]]) -> set[str]:
    """Every way a bundle may refer to these entries: fullUrl and ``Type/id``."""
    keys: set[str] = set()
    for entry in entries:
        resource = entry.get("resource") or {}
        if entry.get("fullUrl"):
            keys.add(str(entry["fullUrl"]))
        if resource.get("id"):
            keys.add(f"{resource.get('resourceType')}/{resource['id']}")
    return keys


def _specs(type_name: str) -> dict[str, ElementSpec] | None:
    try:
        return element_specs(type_name)
    except KeyError:
        return None


_REQUIRES: dict[str, bool] = {}
# Extensions are opaque to a profile (kept or removed whole); their own required url is
# the sender's business, so the completeness walk does not descend into them.
_OPAQUE = frozenset({"extension", "modifierExtension"})


def _has_requirements(type_name: str) -> bool:
    """Can an object of this type (or anything nested in it, extensions aside) lack a
    required element?"""
    known = _REQUIRES.get(type_name)
    if known is not None:
        return known
    _REQUIRES[type_name] = False  # cycles (Identifier.assigner -> Reference) end here
    specs = _specs(type_name) or {}
    result = any(
        spec.required or spec.required_choice is not None for spec in specs.values()
    ) or any(
        spec.type_name is not None
        and spec.type_name != "Resource"
        and name not in _OPAQUE
        and _has_requirements(spec.type_name)
        for name, spec in specs.items()
    )
    _REQUIRES[type_name] = result
    return result


_REQUIRED_CACHE: dict[str, tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]] = {}


def _required_of(type_name: str, specs: dict[str, ElementSpec]) -> tuple[
    tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]
]:
    """(required element names, (choice name, its alternatives) ...) of a type, cached."""
    found = _REQUIRED_CACHE.get(type_name)
    if found is None:
        required = tuple(n for n, s in specs.items() if s.required)
        groups: dict[str, list[str]] = {}
        for n, s in specs.items():
            if s.required_choice is not None:
                groups.setdefault(s.required_choice, []).append(n)
        found = (required, tuple((g, tuple(ns)) for g, ns in groups.items()))
        _REQUIRED_CACHE[type_name] = found
    return found


_ABSENT: tuple[Any, ...] = (None, [], {}, "")
# The types of the empty values of _ABSENT besides None: a value ``v`` is one of _ABSENT
# exactly when ``v is None or (not v and isinstance(v, _EMPTIED))`` (0 and false are
# values), which asks no equality of the values present, most of them.
_EMPTIED = (list, dict, str)


def _complete(obj: dict[str, Any], type_name: str, specs: dict[str, ElementSpec]) -> bool:
    """Are all required elements and required choices of this object present?"""
    return _has_required(obj, *_required_of(type_name, specs))


_VISITS: dict[tuple[str, bool], dict[str, str]] = {}


def _visits(type_name: str, specs: dict[str, ElementSpec], dropped: bool) -> dict[str, str]:
    """The elements of a type the cleaning walk descends into, with their types, cached:
    every typed element (contained resources aside) when references were dropped, else
    only those that can be incomplete."""
    found = _VISITS.get((type_name, dropped))
    if found is None:
        found = {}
        for key, spec in specs.items():
            if spec.type_name is None or spec.type_name == "Resource":
                continue
            if not dropped and (key in _OPAQUE or not _has_requirements(spec.type_name)):
                continue
            found[key] = spec.type_name
        _VISITS[(type_name, dropped)] = found
    return found


_Plan = tuple[dict[str, str], tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]
_PLANS: dict[tuple[str, bool], _Plan | None] = {}


def _plan(type_name: str, dropped: bool) -> _Plan | None:
    """What the cleaning walk needs of a type, cached: the elements it descends into
    (see :func:`_visits`), the required elements and the required choices. None for a
    type the model does not know."""
    key = (type_name, dropped)
    if key in _PLANS:
        return _PLANS[key]
    specs = _specs(type_name)
    found: _Plan | None = None
    if specs is not None:
        required, choices = _required_of(type_name, specs)
        found = (_visits(type_name, specs, dropped), required, choices)
    _PLANS[key] = found
    return found


def _clean(
    obj: dict[str, Any], type_name: str, path: str, dropped: set[str], removed: list[str]
) -> bool:
    """Remove references to dropped resources and the elements they leave incomplete.

    Works in place; returns False when ``obj`` itself is left incomplete. With nothing
    dropped, only types that can be incomplete are visited.
    """
    plan = _plan(type_name, bool(dropped))
    if plan is None:
        return True
    visit, required, choices = plan
    for key in [k for k in obj if k in visit]:
        child = visit[key]
        value = obj[key]
        if isinstance(value, list):
            at = f"{path}.{key}"
            kept = [
                item
                for item in value
                if not isinstance(item, dict)
                or (_item_ok(item, child, at, dropped, removed) if child == "Reference"
                    else _clean(item, child, at, dropped, removed))
            ]
            if len(kept) != len(value):
                removed.append(f"{path}.{key}")
            if kept:
                obj[key] = kept
            else:
                del obj[key]
        elif isinstance(value, dict) and not _item_ok(
            value, child, f"{path}.{key}", dropped, removed
        ):
            removed.append(f"{path}.{key}")
            del obj[key]
    return _has_required(obj, required, choices)


def _has_required(obj: dict[str, Any], required: Sequence[str],
                  choices: Sequence[tuple[str, Sequence[str]]]) -> bool:
    """Every required element and one of each required choice present (a loop, not
    generators: it runs for every object the cleaning walk visits). A primitive given
    only by its extension sibling (``_status`` with a data-absent-reason, no ``status``)
    is present, as FHIR validation takes it."""
    for name in required:
        value = obj.get(name)
        if (value is None or (not value and isinstance(value, _EMPTIED))) and _absent(
                obj.get("_" + name)):
            return False
    for _, names in choices:
        for name in names:
            value = obj.get(name)
            if not (value is None or (not value and isinstance(value, _EMPTIED))):
                break
            if not _absent(obj.get("_" + name)):
                break
        else:
            return False
    return True


def _absent(value: Any) -> bool:
    """Is ``value`` one of the absent values (None, "", [], {})?"""
    return value is None or (not value and isinstance(value, _EMPTIED))


# The plans of the walk with nothing dropped, by type alone (it visits many objects).
_SOUND: dict[str, _Plan | None] = {}


def _sound(obj: dict[str, Any], type_name: str) -> bool:
    """Would :func:`_clean` with nothing dropped leave ``obj`` as it is and complete?

    Every object that walk visits is complete and no list it visits is empty. Only
    reads, so the common case (nothing to clean) costs no paths and no new lists."""
    return _all_sound((obj,), type_name)


def _all_sound(items: Sequence[Any], type_name: str) -> bool:
    """:func:`_sound` of every object in ``items``, of type ``type_name`` (a list's
    entries are many, a claim's items most of all: the plan is looked up once for all of
    them; the elements to visit are fewer than an object's members, mostly none)."""
    try:
        plan = _SOUND[type_name]
    except KeyError:
        plan = _SOUND[type_name] = _plan(type_name, False)
    if plan is None:
        return True
    visit, required, choices = plan
    for item in items:
        if not isinstance(item, dict):
            continue
        if not _has_required(item, required, choices):
            return False
        for key, child in visit.items():
            value = item.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                if not value or not _all_sound(value, child):
                    return False
            elif isinstance(value, dict) and not _all_sound((value,), child):
                return False
    return True


def _item_ok(
    item: dict[str, Any], type_name: str, path: str, dropped: set[str], removed: list[str]
) -> bool:
    target = item.get("reference")
    if type_name == "Reference" and isinstance(target, str) and target in dropped:
        return False
    return _clean(item, type_name, path, dropped, removed)


# References per resource, kept between the steps of one minimization that ask for them
# (the cleaning walk, then reachability): id -> (the resource, its references). A step
# that changes a resource forgets its entry.
RefCache = dict[int, tuple[dict[str, Any], list[str]]]


def _refs_of(resource: Any, cache: RefCache | None) -> list[str]:
    """Every ``reference`` string inside ``resource`` (cached while it is unchanged)."""
    if cache is not None:
        found = cache.get(id(resource))
        if found is not None and found[0] is resource:
            return found[1]
    refs = _references(resource)
    if cache is not None and isinstance(resource, dict):
        cache[id(resource)] = (resource, refs)
    return refs


def _settle(
    bundle: dict[str, Any], dropped: set[str], removed: list[str], refs: RefCache | None = None,
    known: set[int] | None = None,
) -> dict[str, Any]:
    """Clean references and omit incomplete resources until nothing changes.

    Omitting a resource can leave another one pointing at it, so this repeats; each
    round either omits a resource or stops, so it ends. ``known``: ids of resources
    known to be complete as they are (see :func:`_minimize`); one that refers to
    nothing dropped needs no walk.
    """
    entries: list[dict[str, Any]] = list(bundle.get("entry") or [])
    cache: RefCache = {} if refs is None else refs
    while True:
        keep: list[dict[str, Any]] = []
        newly: list[dict[str, Any]] = []
        for entry in entries:
            resource = entry["resource"]
            rtype = str(resource.get("resourceType"))
            # A resource that refers to nothing dropped needs only its completeness
            # checked, which visits far less of it.
            if dropped and not dropped.isdisjoint(_refs_of(resource, cache)):
                gone = dropped
            elif (known is not None and id(resource) in known) or _sound(resource, rtype):
                keep.append(entry)
                continue
            else:
                gone = set()
            before = len(removed)
            complete = _clean(resource, rtype, rtype, gone, removed)
            if len(removed) != before:
                # Every change the walk makes is listed: its references may be others, and
                # what was known of it as it was no longer holds.
                cache.pop(id(resource), None)
                if known is not None:
                    known.discard(id(resource))
            if complete:
                keep.append(entry)
            else:
                removed.append(rtype)
                newly.append(entry)
        entries = keep
        if not newly:
            break
        dropped = dropped | _reference_keys(newly)
    bundle["entry"] = entries
    return bundle


# A reference as orjson writes it: the key "reference" and a string value. Inside a JSON
# string the quotes are escaped, so text that merely contains these words never matches.
_REFERENCE = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')
_PLAIN_REFERENCE = re.compile(rb'"reference":"([^"]*)"')


def _references(node: Any) -> list[str]:
    """Every ``reference`` string inside ``node`` (one pass over its JSON)."""
    try:
        text = orjson.dumps(node)
    except (TypeError, orjson.JSONEncodeError):  # integers beyond 64 bits: malformed input
        out: list[str] = []
        stack = [node]
        while stack:
            cur = stack.pop()
            if isinstance(cur, dict):
                if isinstance(cur.get("reference"), str):
                    out.append(cur["reference"])
                stack.extend(v for v in cur.values() if isinstance(v, (dict, list)))
            elif isinstance(cur, list):
                stack.extend(v for v in cur if isinstance(v, (dict, list)))
        return out
    if b"\\" not in text:  # no escape anywhere (most): each value is its own text
        return [raw.decode() for raw in _PLAIN_REFERENCE.findall(text)]
    return _decode_refs(_REFERENCE.findall(text))


def member_values(
    text: bytes, plain: re.Pattern[bytes], pattern: re.Pattern[bytes]
) -> list[bytes]:
    """The raw JSON text of every string value of a member in ``text``, in order: what
    ``pattern.findall`` finds. ``plain`` is the same member with a value read up to the
    next quote: where the text holds no escape at all (one byte to look for, so the
    check costs little), that quote ends the value, and ``plain`` finds the same without
    trying an escape at every character."""
    if b"\\" in text:
        return pattern.findall(text)
    return plain.findall(text)


def _reference_values(text: bytes) -> list[bytes]:
    """What ``_REFERENCE.findall`` finds (see :func:`member_values`)."""
    return member_values(text, _PLAIN_REFERENCE, _REFERENCE)


# A code as orjson writes it (a Coding's "code" member, or any other "code"): a superset
# of the codes a walk would look at, so a filter, never a decision.
_CODE = re.compile(rb'"code":"((?:[^"\\]|\\.)*)"')
_PLAIN_CODE = re.compile(rb'"code":"([^"]*)"')


def code_values(text: bytes) -> set[bytes]:
    """The raw JSON text of every ``"code"`` member's string value in ``text`` (as
    ``_CODE`` finds them, see :func:`member_values`)."""
    return set(member_values(text, _PLAIN_CODE, _CODE))


def _decode_refs(found: list[bytes]) -> list[str]:
    if b"\\" not in b"".join(found):  # no escapes (most): each value is its text
        return list(map(bytes.decode, found))
    return [raw.decode() if b"\\" not in raw else orjson.loads(b'"' + raw + b'"')
            for raw in found]


def reachable(
    bundle: dict[str, Any], focus: Iterable[str] = (), refs: RefCache | None = None
) -> set[int] | None:
    """Indices of the entries reachable from the focus by references.

    With ``focus`` types, references are followed from the entries of those types
    (a Claim and what it names, and what they name); without, the part connected to
    the Patient in either direction (a pull collection whose Observations name the
    Patient). None when the bundle holds no focus (nothing to judge from).
    """
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        # The keys of _reference_keys, without a set per entry.
        resource = entry.get("resource") or {}
        if entry.get("fullUrl"):
            index[str(entry["fullUrl"])] = i
        if resource.get("id"):
            index[f"{resource.get('resourceType')}/{resource['id']}"] = i
    focus = tuple(focus)
    directed = bool(focus)
    types = set(focus) if focus else {"Patient"}
    roots = [
        i for i, e in enumerate(entries)
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") in types
    ]
    if not roots:
        return None
    if directed:
        # Only what is reached is read for its references, and once every entry is
        # reached there is nothing left to find (a claim names most of its bundle).
        seen = set(roots)
        stack = list(roots)
        while stack and len(seen) < len(entries):
            for r in _refs_of(entries[stack.pop()].get("resource"), refs):
                t = index.get(r)
                if t is not None and t not in seen:
                    seen.add(t)
                    stack.append(t)
        return seen
    edges: list[list[int]] = []
    for entry in entries:
        edges.append([index[r] for r in _refs_of(entry.get("resource"), refs) if r in index])
    # Without a focus the part connected to the Patient, in either direction.
    back: list[list[int]] = [[] for _ in entries]
    for i, targets in enumerate(edges):
        for t in targets:
            back[t].append(i)
    edges = [a + b for a, b in zip(edges, back)]
    seen = set(roots)
    stack = list(roots)
    while stack:
        for t in edges[stack.pop()]:
            if t not in seen:
                seen.add(t)
                stack.append(t)
    return seen


def drop_unreferenced(
    bundle: dict[str, Any], focus: Iterable[str] = (), refs: RefCache | None = None
) -> list[str]:
    """Remove (in place) the entries nothing reachable from the focus refers to — a
    surgeon's Practitioner once the Procedure naming the surgeon was removed — and
    return their resource types."""
    keep = reachable(bundle, focus, refs)
    entries = bundle.get("entry") or []
    if keep is None or len(keep) == len(entries):
        return []
    gone = [
        str((e.get("resource") or {}).get("resourceType"))
        for i, e in enumerate(entries) if i not in keep
    ]
    bundle["entry"] = [e for i, e in enumerate(entries) if i in keep]
    return gone


def omit_in_place(
    bundle: dict[str, Any], indices: set[int], refs: RefCache | None = None
) -> list[str]:
    """Remove the entries at ``indices`` from ``bundle`` (in place), clean references to
    them and omit what that leaves incomplete; return the removed paths. ``refs`` keeps
    the references found for a following :func:`drop_unreferenced`."""
    entries = bundle.get("entry") or []
    gone = [e for i, e in enumerate(entries) if i in indices]
    removed = [str((e.get("resource") or {}).get("resourceType")) for e in gone]
    bundle["entry"] = [e for i, e in enumerate(entries) if i not in indices]
    _settle(bundle, _reference_keys(gone), removed, refs)
    return _unique(removed)


def omit_entries(bundle: dict[str, Any], indices: set[int]) -> MinimizeResult:
    """Return a copy of ``bundle`` without the entries at ``indices``, references cleaned.

    ``removed`` names the omitted resource types and every element path that had to go
    with them (for example ``Claim.diagnosis``).
    """
    out = copy_json(bundle)
    removed = omit_in_place(out, indices)
    return MinimizeResult(out, removed)


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


# --- loading ------------------------------------------------------------------------


def _is_resource_type(name: str) -> bool:
    specs = _specs(name)
    # Resources (and only resources) carry meta and implicitRules.
    return specs is not None and "meta" in specs and "implicitRules" in specs


def _resolve_path(doc: LocatedYAML, rtype: str, raw: str, key: Key) -> list[ElementSpec]:
    """Check a dotted element path against the model; return the spec of each segment."""
    out: list[ElementSpec] = []
    type_name = rtype
    segments = raw.split(".")
    for depth, seg in enumerate(segments):
        specs = element_specs(type_name)
        if seg in ALWAYS_KEPT and depth == 0:
            raise doc.error(f"{seg} is always kept; do not list it", key)
        if seg not in specs:
            raise doc.error(f"{'.'.join(segments[: depth + 1])} is not an element of {rtype}", key)
        spec = specs[seg]
        out.append(spec)
        if depth < len(segments) - 1:
            if spec.type_name is None:
                raise doc.error(f"{'.'.join(segments[: depth + 1])} has no child elements", key)
            type_name = spec.type_name
    return out


_MATCH_FIELDS = {"Identifier": "system", "ContactPoint": "system", "Extension": "url"}


def _parse_elements(
    doc: LocatedYAML,
    rtype: str,
    raw: list[Any],
    cites: str,
    matches: dict[str, Match],
    rows: dict[str, tuple[str, ...]],
) -> list[Any]:
    """The element paths of one resource entry; entries written as mappings
    (``{path, systems | urls, row}``) add a selection and the cited table row.

    With ``cites`` set, every entry must cite its row. The same path may be listed
    more than once with different selections (the identity document on one row, the
    inpatient number on another): the selections are joined.
    """
    out: list[Any] = []
    for i, item in enumerate(raw):
        key: Key = ("resources", rtype, "elements", i)
        if not isinstance(item, dict):
            if cites:
                raise doc.error(f"every element cites its row of {cites}: {{path, row}}", key)
            out.append(item)
            continue
        unknown = set(item) - {"path", "row", "systems", "urls", "note"}
        if unknown:
            raise doc.error("unknown key", (*key, min(unknown)))
        path = item.get("path")
        if not isinstance(path, str) or not path.strip():
            raise doc.error("an element entry needs a path", (*key, "path"))
        path = path.strip()
        row = item.get("row")
        if cites and (not isinstance(row, str) or not row.strip()):
            raise doc.error(f"every element cites its row of {cites}", (*key, "row"))
        full = f"{rtype}.{path}"
        if isinstance(row, str) and row.strip():
            rows[full] = (*rows.get(full, ()), row.strip())
        else:
            rows.setdefault(full, ())
        selectors = [k for k in ("systems", "urls") if k in item]
        if len(selectors) > 1:
            raise doc.error("an element selects by systems or by urls, not both", key)
        if selectors:
            sel = selectors[0]
            values = item[sel]
            skey = (*key, sel)
            if not isinstance(values, list) or not values or not all(
                isinstance(v, str) and v for v in values
            ):
                raise doc.error(f"{sel} is a non-empty list of URIs", skey)
            last = _resolve_path(doc, rtype, path, (*key, "path"))[-1]
            fieldname = _MATCH_FIELDS.get(last.type_name or "")
            if fieldname is None or fieldname != sel[:-1]:
                raise doc.error(
                    f"{sel} selects entries of "
                    + ("an Extension" if sel == "urls" else "an Identifier or ContactPoint"),
                    skey,
                )
            previous = matches.get(full)
            if previous is None and any(str(e).strip() == path for e in out):
                raise doc.error("this path is already allowed whole", key)
            matches[full] = Match(fieldname, frozenset(values) | (
                previous.values if previous else frozenset()))
        elif full in matches:
            raise doc.error("this path is already allowed for some entries only", key)
        if path not in out:
            out.append(path)
    return out


def _compile_paths(doc: LocatedYAML, rtype: str, paths: list[Any]) -> AllowTree:
    tree: AllowTree = {}
    for i, raw in enumerate(paths):
        key = ("resources", rtype, "elements", i)
        if not isinstance(raw, str) or not raw.strip():
            raise doc.error("an element path is a non-empty string", key)
        segments = raw.strip().split(".")
        _resolve_path(doc, rtype, raw.strip(), key)
        node = tree
        for depth, seg in enumerate(segments):
            if depth == len(segments) - 1:
                node[seg] = None
                break
            existing = node.get(seg, {})
            if existing is None:
                break  # the whole element is already allowed
            node[seg] = existing
            node = existing
    _check_required(doc, rtype, tree, rtype, ("resources", rtype, "elements"))
    return tree


def _missing_required(type_name: str, tree: AllowTree, path: str) -> str | None:
    """The first required element (path) of what ``tree`` allows that it does not allow."""
    specs = element_specs(type_name)
    choices: dict[str, bool] = {}
    for name, spec in specs.items():
        if spec.required and name not in tree:
            return f"{path}.{name}"
        if spec.required_choice is not None:
            choices[spec.required_choice] = choices.get(spec.required_choice, False) or (
                name in tree
            )
    for choice, ok in choices.items():
        if not ok:
            return f"{path}.{choice}[x]"
    for name, sub in tree.items():
        child_type = specs[name].type_name
        if sub is not None and child_type is not None:
            found = _missing_required(child_type, sub, f"{path}.{name}")
            if found:
                return found
    return None


def _check_required(
    doc: LocatedYAML, type_name: str, tree: AllowTree, path: str, key: Key
) -> None:
    """A profile must allow every required element of what it allows, or it sends nothing."""
    missing = _missing_required(type_name, tree, path)
    if missing:
        raise doc.error(f"required element {missing} is not allowed", key)


def _max_grade(node: ElementClass) -> int:
    return max([node.grade, *(_max_grade(c) for c in (node.children or {}).values())])


def _cut(tree: AllowTree, ec: ElementClass, type_name: str, ceiling: int) -> AllowTree:
    """The part of an allow tree whose elements are at most ``ceiling`` (for a level)."""
    out: AllowTree = {}
    specs = element_specs(type_name)
    for name, sub in tree.items():
        child = (ec.children or {}).get(name) or ElementClass(ec.grade, ec.category)
        child_type = specs[name].type_name
        if sub is None:
            if _max_grade(child) <= ceiling:
                out[name] = None
                continue
            if child_type is None or not child.children:
                continue
            # Mixed grades inside: keep the children this level may carry.
            sub = {n: None for n in element_specs(child_type)}
        if child_type is None:
            continue
        cut = _cut(sub, child, child_type, ceiling)
        if cut:
            out[name] = cut
    return out


def _parse_grades(doc: LocatedYAML, raw: Any, key: Key) -> frozenset[int]:
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(g, int) and not isinstance(g, bool) and g in GRADES for g in raw)
    ):
        raise doc.error("grades is a non-empty list of grades 1-5", key)
    grades = frozenset(raw)
    below = sorted(g for g in grades if g < SENSITIVE_GRADE)
    if below != list(range(1, len(below) + 1)):
        raise doc.error("grades below 5 run from 1 without gaps", key)
    return grades


def load_profile(
    path: Path, *, level: str | None = None, scheme: ClassificationScheme | None = None
) -> LinkProfile:
    """Load and check a link profile; any mistake raises LoadError naming file:line key.

    A profile with ``levels`` must be loaded for one of them (``level``).
    """
    doc = load_located(path)
    scheme = scheme or default_classification()
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("a profile is a mapping", ())
    for required in ("profile", "resources"):
        if required not in data:
            raise doc.error(f"missing key {required}", (required,))
    unknown = set(data) - {
        "profile", "title", "source", "resources", "grades", "levels", "ids", "k_anonymity",
        "cites", "focus", "refuse_without", "uncovered_types",
    }
    if unknown:
        raise doc.error("unknown key", (min(unknown),))
    if not isinstance(data["profile"], str) or not data["profile"]:
        raise doc.error("profile must be a name", ("profile",))

    levels = data.get("levels")
    level_names: list[str] = []
    if levels is not None:
        if "grades" in data:
            raise doc.error("a profile with levels gives grades per level", ("grades",))
        if not isinstance(levels, dict) or not levels:
            raise doc.error("levels maps level names to {grades}", ("levels",))
        level_names = [str(n) for n in levels]
        for name, body in levels.items():
            if not isinstance(body, dict) or set(body) - {"grades", "note"} or "grades" not in body:
                raise doc.error("a level has grades (and an optional note)", ("levels", name))
            _parse_grades(doc, body["grades"], ("levels", name, "grades"))
        if level is None:
            raise doc.error("this profile has levels; load it for one of them", ("levels",))
        if level not in levels:
            raise doc.error(f"no level {level} in this profile", ("levels",))
        grades = _parse_grades(doc, levels[level]["grades"], ("levels", level, "grades"))
    else:
        if level is not None:
            raise doc.error("this profile has no levels", ("profile",))
        grades = (
            _parse_grades(doc, data["grades"], ("grades",)) if "grades" in data else ALL_GRADES
        )
    ceiling = max((g for g in grades if g < SENSITIVE_GRADE), default=0)

    ids = data.get("ids", "keep")
    if ids not in ("keep", "pseudonym"):
        raise doc.error("ids is keep or pseudonym", ("ids",))

    cites = data.get("cites", "")
    if not isinstance(cites, str):
        raise doc.error("cites names the table the rows come from", ("cites",))
    focus = data.get("focus", [])
    if isinstance(focus, str):
        focus = [focus]
    if not isinstance(focus, list) or not all(isinstance(f, str) for f in focus):
        raise doc.error("focus is a resource type or a list of them", ("focus",))
    for i, f in enumerate(focus):
        if f not in (data.get("resources") or {}):
            raise doc.error(f"focus {f} is not a resource of this profile", ("focus", i))
    refuse_without = data.get("refuse_without", [])
    if not isinstance(refuse_without, list) or not all(
        isinstance(r, str) and r.count(".") == 1 for r in refuse_without
    ):
        raise doc.error("refuse_without is a list of Type.element paths", ("refuse_without",))
    for i, r in enumerate(refuse_without):
        rtype, _, element = r.partition(".")
        if rtype not in (data.get("resources") or {}):
            raise doc.error(f"{rtype} is not a resource of this profile", ("refuse_without", i))
        _resolve_path(doc, rtype, element, ("refuse_without", i))
    uncovered_types = data.get("uncovered_types", "refuse")
    if uncovered_types not in ("refuse", "hold"):
        raise doc.error("uncovered_types is refuse or hold", ("uncovered_types",))
    matches: dict[str, Match] = {}
    rows: dict[str, tuple[str, ...]] = {}

    resources = data["resources"]
    if not isinstance(resources, dict) or not resources:
        raise doc.error("resources must map resource types to element lists", ("resources",))
    allowed: dict[str, AllowTree] = {}
    transforms: dict[str, str] = {}
    classes: dict[str, TypeClass] = {}
    for rtype, body in resources.items():
        key: Key = ("resources", rtype)
        rtype = str(rtype)
        if not _is_resource_type(rtype):
            raise doc.error(f"{rtype} is not a FHIR resource type", key)
        if not isinstance(body, dict) or set(body) - {"elements", "note", "transforms", "from_level"}:
            raise doc.error(
                "a resource entry has elements (and optional transforms, from_level, note)", key
            )
        raw_elements = body.get("elements")
        if not isinstance(raw_elements, list) or not raw_elements:
            raise doc.error("elements must be a non-empty list", (*key, "elements"))
        elements = _parse_elements(doc, rtype, raw_elements, cites, matches, rows)
        tree = _compile_paths(doc, rtype, elements)
        listed = [str(e).strip() for e in elements]

        overrides: dict[str, int] = {}
        raw_tf = body.get("transforms") or {}
        if not isinstance(raw_tf, dict):
            raise doc.error("transforms maps element paths to transform names", (*key, "transforms"))
        for epath, name in raw_tf.items():
            tkey = (*key, "transforms", str(epath))
            if str(epath) not in listed:
                raise doc.error("a transformed element must be listed in elements", tkey)
            spec = TRANSFORMS.get(str(name)) if isinstance(name, str) else None
            if spec is None:
                raise doc.error(
                    f"unknown transform (known: {', '.join(sorted(TRANSFORMS))})", tkey
                )
            last = _resolve_path(doc, rtype, str(epath), tkey)[-1]
            if (last.type_name or last.primitive) not in spec.types:
                raise doc.error(f"transform {name} does not apply to this element's type", tkey)
            transforms[f"{rtype}.{epath}"] = spec.name
            overrides[str(epath)] = spec.grade
        tc = scheme.of(rtype).with_overrides(overrides)
        classes[rtype] = tc

        from_level = body.get("from_level")
        if from_level is not None:
            if from_level not in level_names:
                raise doc.error("from_level names a level of this profile", (*key, "from_level"))
            assert level is not None
            if level_names.index(level) < level_names.index(str(from_level)):
                continue
        if levels is not None:
            tree = _cut(tree, ElementClass(tc.grade, tc.category, tc.elements), rtype, ceiling)
            if not tree or _missing_required(rtype, tree, rtype):
                continue  # this level cannot carry the type intact
        else:
            for i, epath in enumerate(listed):
                grade = _max_grade(tc.element(epath))
                if grade > ceiling:
                    raise doc.error(
                        f"{rtype}.{epath} is grade {grade}; this link carries grades "
                        f"{', '.join(map(str, sorted(grades)))}",
                        (*key, "elements", i),
                    )
        allowed[rtype] = tree

    k_anon: KAnonymity | None = None
    raw_k = data.get("k_anonymity")
    if raw_k is not None:
        if not isinstance(raw_k, dict) or set(raw_k) != {"k", "quasi"}:
            raise doc.error("k_anonymity has k and quasi", ("k_anonymity",))
        k = raw_k["k"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise doc.error("k is an integer of at least 2", ("k_anonymity", "k"))
        quasi = raw_k["quasi"]
        if not isinstance(quasi, list) or not quasi:
            raise doc.error("quasi is a non-empty list of FHIR paths", ("k_anonymity", "quasi"))
        for i, qpath in enumerate(quasi):
            qkey = ("k_anonymity", "quasi", i)
            if not isinstance(qpath, str) or "." not in qpath:
                raise doc.error("a quasi-identifier is a path like Patient.gender", qkey)
            qtype, _, rest = qpath.partition(".")
            if qtype not in resources:
                raise doc.error(f"{qtype} is not a resource of this profile", qkey)
            _resolve_path(doc, qtype, rest, qkey)
        k_anon = KAnonymity(k, tuple(quasi))

    return LinkProfile(
        name=data["profile"],
        title=str(data.get("title") or data["profile"]),
        source=str(data.get("source") or ""),
        allowed=allowed,
        grades=grades,
        transforms=transforms,
        ids=str(ids),
        level=level,
        k_anonymity=k_anon,
        classes=classes,
        matches=matches,
        rows=rows,
        focus=tuple(focus),
        cites=cites,
        refuse_without=tuple(refuse_without),
        uncovered_types=str(uncovered_types),
    )


def load_link_profile(name: str, *, level: str | None = None) -> LinkProfile:
    """Load the installed profile ``mappings/links/<name>.yaml``.

    ``name`` may carry the level after a colon (``regional-interoperability:notify``).
    """
    if ":" in name and level is None:
        name, level = name.split(":", 1)
    path = mappings_dir() / "links" / f"{name}.yaml"
    if not path.is_file():
        raise LoadError("no such link profile", location=str(path))
    return load_profile(path, level=level)
