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

from typing import Any

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
