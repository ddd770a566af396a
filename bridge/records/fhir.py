"""The one module that imports the FHIR models.

``fhir.resources`` ships R4B (4.3.0) and R5 models but no plain R4. R4B accepts the
R4 shapes this bridge emits, so validation runs against R4B here; everything that
reaches the wire is additionally kept to R4 elements by the mapping files. Keeping the
import in one place means a switch of model package touches one file.

``fhir.resources`` does not check required code bindings, minimum list cardinality or
invariants (see the library notes); :func:`validate_resource` adds the binding checks
the bridge depends on.
"""

from __future__ import annotations

import hashlib
import typing
from typing import Any, NamedTuple

import orjson
import pydantic
from fhir.resources.R4B import get_fhir_model_class

from bridge.errors import ValidationError

# Required bindings that the models leave unchecked but partners rely on.
_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Bundle", "type"): frozenset(
        {"document", "message", "transaction", "transaction-response", "batch",
         "batch-response", "history", "searchset", "collection"}
    ),
    ("Claim", "status"): frozenset({"active", "cancelled", "draft", "entered-in-error"}),
    ("Claim", "use"): frozenset({"claim", "preauthorization", "predetermination"}),
    ("Coverage", "status"): frozenset({"active", "cancelled", "draft", "entered-in-error"}),
    ("Encounter", "status"): frozenset(
        {"planned", "arrived", "triaged", "in-progress", "onleave", "finished",
         "cancelled", "entered-in-error", "unknown"}
    ),
    ("Procedure", "status"): frozenset(
        {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
         "entered-in-error", "unknown"}
    ),
    ("Consent", "status"): frozenset(
        {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
    ),
}


def _location(loc: tuple[Any, ...], prefix: str) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}"
    return path


def validate_resource(resource: dict[str, Any], *, path: str | None = None) -> None:
    """Validate one resource (a Bundle validates its entries too); raise on the first problem.

    The error names the FHIR path (``Bundle.entry[3].resource.status``), never the value.
    """
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    prefix = path or (rtype if isinstance(rtype, str) else "$")
    if not isinstance(rtype, str):
        raise ValidationError("resource has no resourceType", location=prefix)
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError, AttributeError) as exc:
        raise ValidationError("unknown FHIR resource type", location=f"{prefix}.resourceType") from exc
    if rtype == "Bundle":
        for i, entry in enumerate(resource.get("entry") or []):
            inner = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(inner, dict):
                inner_type = inner.get("resourceType")
                try:
                    get_fhir_model_class(str(inner_type))
                except (KeyError, ValueError, AttributeError) as exc:
                    raise ValidationError(
                        "unknown FHIR resource type",
                        location=f"{prefix}.entry[{i}].resource.resourceType",
                    ) from exc
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        raise ValidationError(
            f"not valid FHIR R4: {first.get('type', 'invalid')}",
            location=_location(tuple(first.get("loc", ())), prefix),
        ) from None
    _check_codes(resource, prefix)


def _check_codes(resource: dict[str, Any], prefix: str) -> None:
    rtype = resource.get("resourceType", "")
    for (want_type, element), allowed in _REQUIRED_CODES.items():
        if want_type == rtype and element in resource and resource[element] not in allowed:
            raise ValidationError("code not in the required value set", location=f"{prefix}.{element}")
    if rtype == "Bundle":
        for i, entry in enumerate(resource.get("entry") or []):
            inner = entry.get("resource")
            if isinstance(inner, dict):
                _check_codes(inner, f"{prefix}.entry[{i}].resource")


class ElementSpec(NamedTuple):
    """What the model knows about one element: its complex type (None for primitives),
    whether it is required (min cardinality 1), and, for one alternative of a required
    choice element such as ``diagnosis[x]``, the choice's name (``"diagnosis"``); for a
    primitive, its FHIR primitive type (``"date"``, ``"dateTime"``, ``"string"``)."""

    type_name: str | None
    required: bool
    required_choice: str | None = None
    primitive: str | None = None


_ELEMENTS_CACHE: dict[str, dict[str, ElementSpec]] = {}


def element_specs(type_name: str) -> dict[str, ElementSpec]:
    """Return the FHIR elements of a resource, backbone element or datatype model.

    Keys are the JSON element names (``class``, ``performedDateTime``), without the
    ``_element`` primitive-extension siblings. Raises ``KeyError`` for an unknown type.
    """
    cached = _ELEMENTS_CACHE.get(type_name)
    if cached is not None:
        return cached
    try:
        model = get_fhir_model_class(type_name)
    except (ValueError, AttributeError) as exc:
        raise KeyError(type_name) from exc
    specs: dict[str, ElementSpec] = {}
    for field_name, field in model.model_fields.items():
        name = field.alias or field_name
        if name.startswith("_") or name == "fhir_comments" or name == "resourceType":
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        required = field.is_required() or bool(extra.get("element_required"))
        choice = extra.get("one_of_many") if extra.get("one_of_many_required") is True else None
        complex_type = _complex_type(field.annotation)
        primitive = None if complex_type is not None else _primitive_type(field.annotation)
        specs[name] = ElementSpec(complex_type, required, choice, primitive)
    _ELEMENTS_CACHE[type_name] = specs
    return specs


def element_names(type_name: str) -> frozenset[str]:
    """The JSON element names of a FHIR resource or datatype (see :func:`element_specs`)."""
    return frozenset(element_specs(type_name))


def _complex_type(annotation: Any) -> str | None:
    # Annotations look like ``abc.AddressType | None`` or ``List[abc.AddressType]``; the
    # abc placeholder knows its model class. Primitives are plain Python types.
    stack = [annotation]
    while stack:
        current = stack.pop()
        klass_getter = getattr(current, "get_model_klass", None)
        if callable(klass_getter):
            klass = klass_getter()
            return str(getattr(klass, "__resource_type__", None) or klass.__name__)
        stack.extend(typing.get_args(current))
    return None


def _primitive_type(annotation: Any) -> str | None:
    # Primitives are ``Annotated[<python type>, <FHIR primitive marker>()]``; the marker's
    # class name is the FHIR type with a capital (``Date``, ``DateTime``, ``Code``).
    stack = [annotation]
    while stack:
        current = stack.pop()
        for meta in getattr(current, "__metadata__", ()):
            name = type(meta).__name__
            if name and name[0].isupper():
                return name[0].lower() + name[1:]
        stack.extend(typing.get_args(current))
    return None


# --- validation with a content cache ------------------------------------------------
#
# Why this equals full validation. A fhir.resources model validates each field against
# that field's annotation alone, then runs model validators that look only at which
# fields are present (required primitives, one-of-many choice types) and at nulls inside
# lists of complex types. pydantic accepts an instance of the field's model class as it
# is (``revalidate_instances`` is ``never``). So replacing, in a resource about to be
# validated, a complex element by the very model instance that validating that same JSON
# in that same (model, element) produced before changes nothing: the element's own
# validity is already proven, presence is unchanged, and an instance is never null.
# Cache entries are made only from validations that succeeded, keyed by the owning model,
# the element and a digest of the element's JSON. Primitive values are never replaced
# (they are cheap, and the binding checks read them). Elements whose JSON contains
# ``null`` are never cached (orjson writes NaN and infinities as ``null``, so a digest could
# confuse them). Elements typed ``Resource`` (Bundle entries, contained resources) are
# never replaced: their model is chosen by their content. A refusal is always re-derived
# by a full, uncached validation of the original, so its location is exact.


class ValidationCache:
    """Validate resources as :func:`validate_resource` does, proving each content once.

    A resource seen before (same JSON) is accepted at once. In a new resource, complex
    elements whose JSON was validated before in the same model and element are handed to
    the models as the already validated instances; the rest is validated as usual.
    The comment above this class argues why the outcome equals full validation;
    ``tests/test_mapping_validation_cache.py`` checks it on random mutations.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._resources: set[bytes] = set()
        self._elements: dict[tuple[str, str, bytes], Any] = {}

    def clear(self) -> None:
        """Forget everything that was proven."""
        self._resources.clear()
        self._elements.clear()

    def __len__(self) -> int:
        return len(self._resources) + len(self._elements)

    def validate(self, resource: dict[str, Any], *, path: str | None = None) -> None:
        """Raise :class:`ValidationError` exactly when :func:`validate_resource` would."""
        digest = _digest(resource)
        if digest is not None and digest in self._resources:
            return
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        model = None
        if isinstance(rtype, str) and rtype != "Bundle":
            try:
                model = get_fhir_model_class(rtype)
                element_specs(rtype)
            except (KeyError, ValueError, AttributeError):
                model = None
        if model is None:
            validate_resource(resource, path=path)
        else:
            assert isinstance(rtype, str)
            skeleton = self._skeleton(resource, rtype)
            try:
                instance = model.model_validate(skeleton)
            except pydantic.ValidationError:
                validate_resource(resource, path=path)
                raise ValidationError(  # pragma: no cover - the line above raises
                    "not valid FHIR R4", location=path or rtype) from None
            _check_codes(resource, path or rtype)
            if len(self._elements) > self.max_entries:
                self.clear()
            self._harvest(resource, instance, rtype)
        if digest is not None:
            self._resources.add(digest)

    def _skeleton(self, node: dict[str, Any], type_name: str) -> dict[str, Any]:
        specs = element_specs(type_name)
        out: dict[str, Any] = {}
        for key, value in node.items():
            spec = specs.get(key)
            child = spec.type_name if spec is not None else None
            if child is None or child == "Resource" or not isinstance(value, (dict, list)):
                out[key] = value
            elif isinstance(value, dict):
                out[key] = self._element(type_name, key, value, child)
            else:
                item_key = key + "[]"
                out[key] = [self._element(type_name, item_key, item, child)
                            if isinstance(item, dict) else item for item in value]
        return out

    def _element(self, owner: str, key: str, value: dict[str, Any], child: str) -> Any:
        d = _digest(value)
        if d is not None:
            known = self._elements.get((owner, key, d))
            if known is not None:
                return known
        return self._skeleton(value, child)

    def _harvest(self, node: dict[str, Any], instance: Any, type_name: str) -> None:
        specs = element_specs(type_name)
        names = _field_names(type_name)
        for key, value in node.items():
            spec = specs.get(key)
            child = spec.type_name if spec is not None else None
            if child is None or child == "Resource" or not isinstance(value, (dict, list)):
                continue
            sub = getattr(instance, names[key], None)
            if isinstance(value, dict):
                self._remember(type_name, key, value, sub, child)
            elif isinstance(sub, list) and len(sub) == len(value):
                for item, sub_item in zip(value, sub, strict=True):
                    if isinstance(item, dict):
                        self._remember(type_name, key + "[]", item, sub_item, child)

    def _remember(self, owner: str, key: str, value: dict[str, Any], sub: Any, child: str) -> None:
        if sub is None:
            return
        d = _digest(value)
        if d is None:
            self._harvest(value, sub, child)
            return
        if (owner, key, d) in self._elements:
            return
        self._elements[(owner, key, d)] = sub
        self._harvest(value, sub, child)


_FIELD_NAMES: dict[str, dict[str, str]] = {}


def _field_names(type_name: str) -> dict[str, str]:
    """JSON element name -> Python attribute name (``class`` -> ``class_fhir``)."""
    names = _FIELD_NAMES.get(type_name)
    if names is None:
        model = get_fhir_model_class(type_name)
        names = {(f.alias or n): n for n, f in model.model_fields.items()}
        _FIELD_NAMES[type_name] = names
    return names


def _digest(node: Any) -> bytes | None:
    try:
        raw = orjson.dumps(node)
    except (TypeError, orjson.JSONEncodeError):
        return None
    if b"null" in raw:
        return None
    return hashlib.blake2b(raw, digest_size=20).digest()


_DEFAULT_CACHE = ValidationCache()


def validate_resource_cached(resource: dict[str, Any], *, path: str | None = None) -> None:
    """:func:`validate_resource` through the process-wide :class:`ValidationCache`."""
    _DEFAULT_CACHE.validate(resource, path=path)


def validation_cache() -> ValidationCache:
    """The process-wide cache used by :func:`validate_resource_cached`."""
    return _DEFAULT_CACHE
