"""Link profiles: the minimum-necessary allow-list of a link (GB/T 39725-2020 §7 j).

A profile is a YAML file in ``mappings/links/`` (format in ``mappings/links/README.md``)
listing, per resource type, the element paths a recipient may receive. A path is an
element name (``identifier``: the element and everything in it) or a dotted path into a
complex element (``address.city``: only that child of each address). ``resourceType``,
``id`` and ``meta`` (which carries the security labels) are always kept.

Every path is checked against the FHIR model when the file is loaded, and so is the
profile's own consistency: a resource type whose required elements are not allowed
could never be sent intact, so that is a load error too.

:meth:`LinkProfile.minimize` keeps only allowed elements of allowed resource types and
lists what it removed as FHIR paths (``Patient.address.line``, ``Practitioner``),
never values. It never sends a broken resource: a resource that lacks a required
element after minimizing is omitted whole, references to omitted resources are removed,
and so are the repeating elements that such a removal leaves incomplete (a
``Claim.diagnosis`` entry whose ``diagnosisReference`` pointed at an omitted Condition).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import LoadError
from bridge.policy._yaml import LocatedYAML, load_located
from bridge.records.fhir import ElementSpec, element_specs
from bridge.resources import mappings_dir

ALWAYS_KEPT = frozenset({"resourceType", "id", "meta"})
_BUNDLE_KEPT = frozenset({"resourceType", "id", "meta", "type", "identifier", "timestamp"})

# An allow tree maps an element name to None (the whole element) or to the allow tree
# of its children.
AllowTree = dict[str, "AllowTree | None"]


@dataclass(frozen=True)
class MinimizeResult:
    """A minimized bundle and the FHIR paths that were removed from it."""

    bundle: dict[str, Any]
    removed: list[str]


@dataclass(frozen=True)
class LinkProfile:
    """An allow-list of resource types and element paths for one kind of link."""

    name: str
    title: str
    source: str
    allowed: dict[str, AllowTree]

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

    def minimize(self, bundle: dict[str, Any]) -> MinimizeResult:
        """Return a new bundle holding only what this profile allows, and what was removed."""
        removed: list[str] = []
        out: dict[str, Any] = {}
        for key, value in bundle.items():
            if key in _BUNDLE_KEPT:
                out[key] = copy.deepcopy(value)
            elif key != "entry":
                removed.append(f"Bundle.{key}")
        entries: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                removed.append("Bundle.entry")
                continue
            rtype = str(resource.get("resourceType"))
            tree = self.allowed.get(rtype)
            if tree is None:
                removed.append(rtype)
                dropped.append(entry)
                continue
            for key in entry:
                if key not in ("fullUrl", "resource"):
                    removed.append(f"Bundle.entry.{key}")
            new_entry: dict[str, Any] = {}
            if "fullUrl" in entry:
                new_entry["fullUrl"] = entry["fullUrl"]
            new_entry["resource"] = _prune_resource(resource, tree, rtype, removed)
            entries.append(new_entry)
        out["entry"] = entries
        out = _settle(out, _reference_keys(dropped), removed)
        return MinimizeResult(out, _unique(removed))


# --- pruning and reference cleaning -------------------------------------------------


def _prune_resource(
    resource: dict[str, Any], tree: AllowTree, rtype: str, removed: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in resource.items():
        if key in ALWAYS_KEPT:
            out[key] = copy.deepcopy(value)
    out.update(_prune(resource, tree, rtype, removed, skip=ALWAYS_KEPT))
    return out


def _prune(
    obj: dict[str, Any],
    tree: AllowTree,
    path: str,
    removed: list[str],
    skip: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in skip:
            continue
        # A primitive's extension sibling (``_birthDate``) follows its element.
        base = key[1:] if key.startswith("_") else key
        if base not in tree:
            removed.append(f"{path}.{base}")
            continue
        sub = tree[base]
        if sub is None:
            out[key] = copy.deepcopy(value)
            continue
        if key != base:
            removed.append(f"{path}.{key}")
            continue
        child_path = f"{path}.{key}"
        if isinstance(value, list):
            items = [
                _prune(item, sub, child_path, removed) for item in value if isinstance(item, dict)
            ]
            # Items pruned to nothing go; their removed children are already listed.
            kept = [item for item in items if item]
            if kept:
                out[key] = kept
        elif isinstance(value, dict):
            pruned = _prune(value, sub, child_path, removed)
            if pruned:
                out[key] = pruned
        else:
            removed.append(child_path)
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


def _complete(obj: dict[str, Any], specs: dict[str, ElementSpec]) -> bool:
    """Are all required elements and required choices of this object present?"""
    choices: dict[str, bool] = {}
    for name, spec in specs.items():
        present = obj.get(name) not in (None, [], {}, "")
        if spec.required and not present:
            return False
        if spec.required_choice is not None:
            choices[spec.required_choice] = choices.get(spec.required_choice, False) or present
    return all(choices.values())


def _clean(
    obj: dict[str, Any], type_name: str, path: str, dropped: set[str], removed: list[str]
) -> bool:
    """Remove references to dropped resources and the elements they leave incomplete.

    Works in place; returns False when ``obj`` itself is left incomplete.
    """
    specs = _specs(type_name)
    if specs is None:
        return True
    for key in list(obj):
        spec = specs.get(key)
        if spec is None or spec.type_name is None or spec.type_name == "Resource":
            continue
        value = obj[key]
        if isinstance(value, list):
            kept = [
                item
                for item in value
                if not isinstance(item, dict)
                or _item_ok(item, spec.type_name, f"{path}.{key}", dropped, removed)
            ]
            if len(kept) != len(value):
                removed.append(f"{path}.{key}")
            if kept:
                obj[key] = kept
            else:
                del obj[key]
        elif isinstance(value, dict):
            if not _item_ok(value, spec.type_name, f"{path}.{key}", dropped, removed):
                removed.append(f"{path}.{key}")
                del obj[key]
    return _complete(obj, specs)


def _item_ok(
    item: dict[str, Any], type_name: str, path: str, dropped: set[str], removed: list[str]
) -> bool:
    target = item.get("reference")
    if type_name == "Reference" and isinstance(target, str) and target in dropped:
        return False
    return _clean(item, type_name, path, dropped, removed)


def _settle(bundle: dict[str, Any], dropped: set[str], removed: list[str]) -> dict[str, Any]:
    """Clean references and omit incomplete resources until nothing changes.

    Omitting a resource can leave another one pointing at it, so this repeats; each
    round either omits a resource or stops, so it ends.
    """
    entries: list[dict[str, Any]] = list(bundle.get("entry") or [])
    while True:
        keep: list[dict[str, Any]] = []
        newly: list[dict[str, Any]] = []
        for entry in entries:
            resource = entry["resource"]
            rtype = str(resource.get("resourceType"))
            if _clean(resource, rtype, rtype, dropped, removed):
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


def omit_entries(bundle: dict[str, Any], indices: set[int]) -> MinimizeResult:
    """Return a copy of ``bundle`` without the entries at ``indices``, references cleaned.

    ``removed`` names the omitted resource types and every element path that had to go
    with them (for example ``Claim.diagnosis``).
    """
    out = copy.deepcopy(bundle)
    entries = out.get("entry") or []
    gone = [e for i, e in enumerate(entries) if i in indices]
    removed = [str((e.get("resource") or {}).get("resourceType")) for e in gone]
    out["entry"] = [e for i, e in enumerate(entries) if i not in indices]
    out = _settle(out, _reference_keys(gone), removed)
    return MinimizeResult(out, _unique(removed))


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


# --- loading ------------------------------------------------------------------------


def _is_resource_type(name: str) -> bool:
    specs = _specs(name)
    # Resources (and only resources) carry meta and implicitRules.
    return specs is not None and "meta" in specs and "implicitRules" in specs


def _compile_paths(doc: LocatedYAML, rtype: str, paths: list[Any]) -> AllowTree:
    tree: AllowTree = {}
    for i, raw in enumerate(paths):
        key = ("resources", rtype, "elements", i)
        if not isinstance(raw, str) or not raw.strip():
            raise doc.error("an element path is a non-empty string", key)
        node = tree
        type_name = rtype
        segments = raw.strip().split(".")
        for depth, seg in enumerate(segments):
            specs = element_specs(type_name)
            if seg in ALWAYS_KEPT and depth == 0:
                raise doc.error(f"{seg} is always kept; do not list it", key)
            if seg not in specs:
                raise doc.error(
                    f"{'.'.join(segments[: depth + 1])} is not an element of {rtype}", key
                )
            last = depth == len(segments) - 1
            if last:
                node[seg] = None
                break
            child_type = specs[seg].type_name
            if child_type is None:
                raise doc.error(f"{'.'.join(segments[: depth + 1])} has no child elements", key)
            existing = node.get(seg, {})
            if existing is None:
                break  # the whole element is already allowed
            node[seg] = existing
            node = existing
            type_name = child_type
    _check_required(doc, rtype, tree, rtype, ("resources", rtype, "elements"))
    return tree


def _check_required(
    doc: LocatedYAML, type_name: str, tree: AllowTree, path: str, key: tuple[str | int, ...]
) -> None:
    """A profile must allow every required element of what it allows, or it sends nothing."""
    specs = element_specs(type_name)
    choices: dict[str, bool] = {}
    for name, spec in specs.items():
        if spec.required and name not in tree:
            raise doc.error(f"required element {path}.{name} is not allowed", key)
        if spec.required_choice is not None:
            choices[spec.required_choice] = choices.get(spec.required_choice, False) or (
                name in tree
            )
    for choice, ok in choices.items():
        if not ok:
            raise doc.error(f"required element {path}.{choice}[x] is not allowed", key)
    for name, sub in tree.items():
        child_type = specs[name].type_name
        if sub is not None and child_type is not None:
            _check_required(doc, child_type, sub, f"{path}.{name}", key)


def load_profile(path: Path) -> LinkProfile:
    """Load and check a link profile; any mistake raises LoadError naming file:line key."""
    doc = load_located(path)
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("a profile is a mapping", ())
    for required in ("profile", "resources"):
        if required not in data:
            raise doc.error(f"missing key {required}", (required,))
    unknown = set(data) - {"profile", "title", "source", "resources"}
    if unknown:
        raise doc.error("unknown key", (sorted(unknown)[0],))
    if not isinstance(data["profile"], str) or not data["profile"]:
        raise doc.error("profile must be a name", ("profile",))
    resources = data["resources"]
    if not isinstance(resources, dict) or not resources:
        raise doc.error("resources must map resource types to element lists", ("resources",))
    allowed: dict[str, AllowTree] = {}
    for rtype, body in resources.items():
        key = ("resources", rtype)
        if not _is_resource_type(str(rtype)):
            raise doc.error(f"{rtype} is not a FHIR resource type", key)
        if not isinstance(body, dict) or set(body) - {"elements", "note"}:
            raise doc.error("a resource entry has elements (and an optional note)", key)
        elements = body.get("elements")
        if not isinstance(elements, list) or not elements:
            raise doc.error("elements must be a non-empty list", (*key, "elements"))
        allowed[str(rtype)] = _compile_paths(doc, str(rtype), elements)
    return LinkProfile(
        name=data["profile"],
        title=str(data.get("title") or data["profile"]),
        source=str(data.get("source") or ""),
        allowed=allowed,
    )


def load_link_profile(name: str) -> LinkProfile:
    """Load the installed profile ``mappings/links/<name>.yaml``."""
    path = mappings_dir() / "links" / f"{name}.yaml"
    if not path.is_file():
        raise LoadError("no such link profile", location=str(path))
    return load_profile(path)
