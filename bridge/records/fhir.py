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

import typing
from typing import Any, NamedTuple

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
    choice element such as ``diagnosis[x]``, the choice's name (``"diagnosis"``)."""

    type_name: str | None
    required: bool
    required_choice: str | None = None


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
        specs[name] = ElementSpec(_complex_type(field.annotation), required, choice)
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
