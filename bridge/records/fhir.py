"""The one module that imports the FHIR models.

``fhir.resources`` ships R4B (4.3.0) and R5 models but no plain R4. R4B accepts the
R4 shapes this bridge emits, so validation runs against R4B here; everything that
reaches the wire is additionally kept to R4 elements by the mapping files. Keeping the
import in one place means a switch of model package touches one file.

``fhir.resources`` does not check required code bindings, minimum list cardinality or
invariants (see the library notes); :func:`validate_resource` adds the binding checks
the bridge depends on. The models also coerce (pydantic's lax mode: the number 1.5
becomes a dateTime, ``"true"`` a boolean, ``"1"`` an integer) and allow ids of 255
characters; :func:`validate_resource` holds every primitive to its one JSON form and
ids to FHIR's 64 characters, and checks invariant per-1 (a Period does not end before
it starts) on every Period.
"""

from __future__ import annotations

import functools
import re
import typing
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.constraints import FHIR_TYPES_MAPS
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from pydantic._internal._validators import import_string
from pydantic_core import SchemaValidator

from bridge.errors import ValidationError, bounded_path, member_label

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
    """The FHIR path of a model error's location. A member the models do not know is the
    client's text, named as :func:`~bridge.errors.member_label` names it."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{member_label(str(part))}"
    return bounded_path(path)


def validate_resource(resource: dict[str, Any], *, path: str | None = None) -> None:
    """Validate one resource (a Bundle validates its entries too); raise on the first problem.

    The models run first; then every primitive is held to its JSON form, every id to 64
    characters and every Period to invariant per-1 (:func:`_check_forms`); no value may be
    empty ("", [], {}, or null outside an array of primitives: FHIR JSON has none, and
    what passes holds every required element it names); and required codes are held to
    their value sets. The error names the FHIR path
    (``Bundle.entry[3].resource.status``), never the value.
    """
    prefix = _prefix(resource, path)
    model = _model_for(resource, prefix)
    _validate_model(model, resource, prefix)
    _check_forms(resource, model, prefix)
    empty = _first_empty(resource, prefix)
    if empty is not None:
        raise ValidationError("not valid FHIR R4: an empty value (FHIR JSON has none)",
                              location=bounded_path(empty))
    _check_codes(resource, prefix)


def _validate_model(model: type[pydantic.BaseModel], data: dict[str, Any], prefix: str) -> None:
    """Run the models on ``data``; raise the first error as :class:`ValidationError`."""
    try:
        model.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        raise ValidationError(
            f"not valid FHIR R4: {first.get('type', 'invalid')}",
            location=_location(tuple(first.get("loc", ())), prefix),
        ) from None
    except (TypeError, AttributeError):
        # A few of the models' own validators fail with TypeError or AttributeError on a
        # value of the wrong JSON type (a list or a number where a url belongs), which
        # pydantic does not wrap. The JSON forms name where such a value is.
        _check_forms(data, model, prefix)
        raise ValidationError(
            "not valid FHIR R4: a value of the wrong JSON type", location=prefix
        ) from None


# A member or array item that is "", [] or {}, or a member that is null: FHIR JSON has no
# empty values (null only as a placeholder inside an array of primitives). Read on the
# bytes first, by substring searches (memchr speed: a regular expression over a 12 KB
# claim took 0.15-0.3 ms, a tenth of the receiver's CPU per claim); only a body where
# one may be is walked to name the place. "" and null are written so whatever the
# spacing; an empty array or object is [] or {}, or an opener followed by JSON
# whitespace (which the bridge's own senders never write).
_MAYBE_EMPTY = (b'""', b"null", b"[]", b"{}",
                *(opener + space for opener in (b"[", b"{") for space in (b" ", b"\t", b"\n", b"\r")))


def _may_hold_empty(body: bytes) -> bool:
    return any(token in body for token in _MAYBE_EMPTY)


def empty_value(body: bytes, data: Any, prefix: str = "Bundle") -> str | None:
    """The FHIR path of the first empty value in ``data`` (``body`` parsed), or None."""
    if not _may_hold_empty(body):
        return None
    found = _first_empty(data, prefix)
    return bounded_path(found) if found is not None else None


def _first_empty(node: Any, path: str) -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{member_label(str(key))}"
            if value is None or value == "" or value == [] or value == {}:
                return where
            if isinstance(value, (dict, list)):
                found = _first_empty(value, where)
                if found is not None:
                    return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            where = f"{path}[{i}]"
            if value == "" or value == [] or value == {}:
                return where
            if isinstance(value, (dict, list)):
                found = _first_empty(value, where)
                if found is not None:
                    return found
    return None


def _prefix(resource: Any, path: str | None) -> str:
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    return path or (rtype if isinstance(rtype, str) else "$")


def _model_for(resource: Any, prefix: str) -> type[pydantic.BaseModel]:
    """The model class of ``resource``, after the checks the models would not make as
    validation errors (the models raise a bare ``KeyError`` for an unknown type in a Bundle)."""
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str):
        raise ValidationError("resource has no resourceType", location=prefix)
    try:
        model: type[pydantic.BaseModel] = get_fhir_model_class(rtype)
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
    return model


# The same bindings by resource type, in the order above.
_CODES_BY_TYPE: dict[str, list[tuple[str, frozenset[str]]]] = {}
for (_type, _element), _allowed in _REQUIRED_CODES.items():
    _CODES_BY_TYPE.setdefault(_type, []).append((_element, _allowed))


def _check_codes(resource: dict[str, Any], prefix: str) -> None:
    rtype = resource.get("resourceType", "")
    for element, allowed in _CODES_BY_TYPE.get(rtype, ()) if isinstance(rtype, str) else ():
        if element in resource and resource[element] not in allowed:
            raise ValidationError("code not in the required value set", location=f"{prefix}.{element}")
    if rtype == "Bundle":
        for i, entry in enumerate(resource.get("entry") or []):
            inner = entry.get("resource")
            if isinstance(inner, dict):
                _check_codes(inner, f"{prefix}.entry[{i}].resource")

# --- JSON forms, ids and invariant per-1 ----------------------------------------------
#
# FHIR's JSON gives each primitive one form: boolean is a JSON boolean; integer,
# unsignedInt and positiveInt are JSON numbers without a fraction (a float such as 1.0
# is not one); decimal is a JSON number; every other primitive (date, dateTime, instant,
# time, code, id, uri, string, ...) is a JSON string. The models are lax, so the form
# is checked here, by the Python class a JSON parser gives each form.

#: FHIR R4 ids are 1 to 64 characters (the models allow 255).
ID_MAX_LENGTH = 64

_BOOLEAN_FORM: tuple[type, ...] = (bool,)
_INTEGER_FORM: tuple[type, ...] = (int,)
_NUMBER_FORM: tuple[type, ...] = (int, float, Decimal)
_STRING_FORM: tuple[type, ...] = (str,)
_FORM_NAMES = {_BOOLEAN_FORM: "a JSON boolean", _INTEGER_FORM: "a JSON integer",
               _NUMBER_FORM: "a JSON number", _STRING_FORM: "a JSON string"}
_INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt"})


class _Form(NamedTuple):
    """What one element's value must be: for a primitive, the Python classes of its JSON
    form and its FHIR type; for a complex element, its model class (``resource``: the
    fhir_core type whose lookup by ``resourceType`` chooses the class)."""

    classes: tuple[type, ...] | None
    fhir_type: str
    child: Any = None
    resource: bool = False


_FORMS: dict[type, dict[str, _Form]] = {}


def _forms(model: type) -> dict[str, _Form]:
    """The form of every element of ``model``, by JSON name and by field name."""
    table = _FORMS.get(model)
    if table is not None:
        return table
    table = {}
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        form = _form_of(info.annotation)
        if form is None:
            continue
        table[name] = form
        if info.alias:
            table[info.alias] = form
    _FORMS[model] = table
    return table


def _form_of(annotation: Any) -> _Form | None:
    walked = _walk_annotation(annotation)
    fhir_types = {t for t in walked if isinstance(t, type) and issubclass(t, FhirBase)}
    if fhir_types:
        if len(fhir_types) != 1:
            return None
        fhir_type = fhir_types.pop()
        if issubclass(fhir_type, FhirElementOrResourceBase):
            return _Form(None, "Resource", fhir_type, True)
        return _Form(None, "Element", fhir_type.get_model_klass())
    primitive = _primitive_type(annotation)
    if primitive is None:
        if bool in walked:
            return _Form(_BOOLEAN_FORM, "boolean")
        return _Form(_STRING_FORM, "string") if str in walked else None
    if primitive in _INTEGER_TYPES:
        return _Form(_INTEGER_FORM, primitive)
    if primitive == "decimal":
        return _Form(_NUMBER_FORM, primitive)
    return _Form(_STRING_FORM, primitive)


def _check_forms(node: dict[str, Any], model: type, path: str) -> None:
    """Raise for the first primitive (in document order) not in its JSON form, id over
    64 characters, or Period ending before it starts, in ``node`` (valid by the models)."""
    forms = _forms(model)
    for key, value in node.items():
        form = forms.get(key)
        if form is None:
            continue
        where = f"{path}.{key}"
        many = type(value) is list
        for i, item in enumerate(value if many else (value,)):
            if item is None:
                continue
            at = f"{where}[{i}]" if many else where
            if form.classes is not None:
                _check_primitive(item, form, at)
            elif type(item) is dict:
                child = _resource_model(form.child, item) if form.resource else form.child
                if child is not None:
                    _check_forms(item, child, at)
    if model is _PERIOD and _reversed_period(node):
        raise ValidationError("a Period ends before it starts (FHIR invariant per-1)",
                              location=bounded_path(path))


def _check_primitive(value: Any, form: _Form, where: str) -> None:
    if type(value) not in typing.cast(tuple[type, ...], form.classes):
        raise ValidationError(
            f"not valid FHIR R4: a {form.fhir_type} is written as "
            f"{_FORM_NAMES[typing.cast(tuple[type, ...], form.classes)]}",
            location=bounded_path(where))
    if form.fhir_type == "id" and len(value) > ID_MAX_LENGTH:
        raise ValidationError(
            f"not valid FHIR R4: an id is at most {ID_MAX_LENGTH} characters",
            location=bounded_path(where))


def _holds_empty(node: dict[str, Any]) -> bool:
    """Whether a member of ``node`` is null, [] or {}, or an array holds {} (what
    :func:`_first_empty` finds directly in ``node``, strings aside; a null in an array
    is its business, as there)."""
    for value in node.values():
        if value is None:
            return True
        cls = type(value)
        if cls is list:
            if not value or any(type(item) is dict and not item for item in value):
                return True
        elif cls is dict and not value:
            return True
    return False


def _forms_hold(node: dict[str, Any], model: type) -> bool:
    """Whether each primitive directly in ``node`` has its JSON form (children not read)."""
    forms = _forms(model)
    for key, value in node.items():
        form = forms.get(key)
        if form is None or form.classes is None or value is None:
            continue
        classes = form.classes
        if type(value) is list:
            if any(item is not None and type(item) not in classes for item in value):
                return False
        elif type(value) not in classes:
            return False
    return True


class _IdValidator:
    """The models' validator of an ``id`` element, and FHIR's 64-character bound."""

    __slots__ = ("_inner",)

    def __init__(self, inner: SchemaValidator) -> None:
        self._inner = inner

    def validate_python(self, value: Any) -> Any:
        result = self._inner.validate_python(value)
        for item in value if type(value) is list else (value,):
            if type(item) is str and len(item) > ID_MAX_LENGTH:
                raise ValueError("id too long")
        return result


_PERIOD = get_fhir_model_class("Period")

# A FHIR date or dateTime: year, month, day, then the time with its zone.
_DATE_TIME = re.compile(
    r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?\Z")


def _reversed_period(node: dict[str, Any]) -> bool:
    """Whether a Period's end is before its start (invariant per-1), compared as FHIRPath
    compares dateTimes: two with a time as instants; otherwise year, month and day in
    turn, as far as both are given (``2026`` and ``2026-01-05`` cannot be ordered, and
    pass). A value the models would not take is left to them."""
    start, end = node.get("start"), node.get("end")
    if type(start) is not str or type(end) is not str:
        return False
    a, b = _DATE_TIME.match(start), _DATE_TIME.match(end)
    if a is None or b is None:
        return False
    if len(start) == len(end) and a.group(8) == b.group(8):
        # The same precision, fraction digits and zone: the text orders as time does.
        return start > end
    if a.group(4) and b.group(4):
        try:
            return _instant(a) > _instant(b)
        except ValueError:
            return False
    first = [int(g) for g in a.groups()[:3] if g]
    last = [int(g) for g in b.groups()[:3] if g]
    shared = min(len(first), len(last))
    return first[:shared] > last[:shared]


def _instant(m: re.Match[str]) -> datetime:
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute),
                    min(int(second), 59), micro, tzinfo=_zone(zone))


@functools.lru_cache(maxsize=256)
def _zone(zone: str | None) -> tzinfo:
    if not zone or zone == "Z":
        return UTC  # a time without a zone is refused by the models; compared as UTC here
    sign = -1 if zone[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))


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
        one_of = extra.get("one_of_many")
        choice = one_of if isinstance(one_of, str) and extra.get("one_of_many_required") is True else None
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


# --- fast validation by structure ---------------------------------------------------
#
# Why this equals full validation. Validating a dict with a fhir.resources model (pydantic
# 2 and fhir_core) does the following, and nothing else:
#
# 1. ``FHIRAbstractModel.__init__`` pops ``resource_type`` and ``resourceType`` (unless a
#    field) and compares them with the model's resource type.
# 2. The "before" model validators read the raw dict: ``reject_null_complex_elements``
#    (is there a ``None`` item in a list of a complex type), and on primitive extensions
#    ``validate_extension_or_fhir_comment_required`` (are ``id``, ``extension`` and
#    ``fhir_comments`` all missing or ``None``).
# 3. Each key is matched to a field by alias or name; any other key is refused
#    (``extra="forbid"``); a required field that is missing is refused.
# 4. Each field's value goes through that field's own core schema, which sees only the
#    value: a primitive's validator (the ``String``/``Code``/``Id``/``Decimal``/``Date``/
#    ``DateTime``/``Uri``... markers of fhir_core, with their patterns, ranges and date
#    rules), or for a complex element ``None``, a list, or ``FhirBase``'s validator, which
#    validates a dict with the element's model class (a ``Resource``-typed element chooses
#    the class by the dict's ``resourceType``) and accepts an instance of that class as it
#    is. No validator reads another field (no ``ValidationInfo.data``), none reads a
#    context.
# 5. The "after" model validators read the validated fields: which choice elements
#    (``value[x]``) and required primitives are not ``None``, and for a required primitive
#    that is ``None``, how many items the ``extension`` of its ``_element`` sibling has.
#
# Define the *shape* of a dict validated with model M as: M, and for each key in order,
# the key and a description of its value: for a primitive field, the Python class of the
# value (of each item, for a list); for a complex field, ``None``, or the shape of the dict
# (with the model the library chooses for it), or a list of such; for ``resourceType`` and
# ``resource_type``, the literal string. Anything else (an unknown key, a string where a
# complex element belongs: ``FhirBase`` would parse it as JSON) has no shape, and such a
# resource is accepted only by full validation. Steps 1, 2, 3 and 5 and the recursion of step 4 read
# only what the shape records (keys, ``None``-ness, list lengths, literal resource types,
# the model class chosen); a primitive validator never turns a value into ``None``. So two
# dicts of the same shape are both accepted, or not, unless a primitive value fails its
# field's validator. Hence: if a dict of shape S was accepted, another dict of shape S is
# accepted exactly when every primitive field value in it passes the validator of its
# field — and these validators are taken from the models' own core schemas, so the rules
# are the library's.
#
# The checks :func:`validate_resource` makes before the models (a known resourceType, known
# types in Bundle entries) are the same function, :func:`_model_for`, on both paths.
# The cache holds shapes that the models accepted, as small integers: each dict's
# shape refers to its children's shapes by number (hash consing), numbers are never
# reused, so a number always means one shape. A resource whose shape is known is checked
# with the primitive validators only; a validator's verdict depends on the value alone, so
# strings and ints a validator has already passed (equal strings, or equal ints, are the
# same value) are not run through it again. A resource with a new shape is validated by the models with every
# child element whose shape is known (and not a primitive extension,
# whose content step 5 reads) replaced by an instance of its model class built without
# validation: by step 4 that instance is accepted as it is, exactly as the validated child
# would have been, and nothing else in the parent reads it; after success every shape in
# the resource is known. Whenever the fast path would refuse (a primitive fails, the
# models refuse), the models run once more on the resource with every child whose shape
# is known and whose primitives pass standing in the same way, and everything else as
# received: a valid child adds no error, the other fields report theirs in field order,
# so the first error and its location are those of full validation, without validating
# the known parts again (:meth:`ValidationCache._refuse`). If that run accepts, the
# resource is validated fully and that verdict stands. The binding checks of
# :func:`_check_codes` run on every accepted resource, as they do after full validation.
#
# Full validation then holds each primitive to its JSON form, ids to 64 characters and
# Periods to per-1 (:func:`_check_forms`). A form is a matter of the value's Python
# class, which the shape records: a dict's primitives are checked when its signature is
# first met, and a signature that fails is never numbered. The id bound is part of the
# id elements' validators here, so a remembered id passed it. Per-1 reads the values and
# runs on every Period walked (a Period known by its text passed it before). A failure
# of any of them makes the walk fail, and the refusal is found as above: the models
# accept, so full validation runs and names the first such problem.

_PRIMITIVE, _COMPLEX, _RESOURCE, _LITERAL = range(4)
# Markers in a shape: a dict follows, a list of n items follows.
_DICT = ("dict",)
_LIST = ("list",)


class _Field(NamedTuple):
    kind: int
    # _PRIMITIVE: the field's validator; _COMPLEX: the element's model class; _RESOURCE: the
    # fhir_core type whose lookup chooses the model; _LITERAL: None.
    target: Any
    # _COMPLEX: whether a known child may stand in as an unvalidated instance (bool);
    # _PRIMITIVE: the strings and ints the validator has passed, at most _PASSED_MAX.
    extra: Any = None


_TABLES: dict[type, dict[str, _Field]] = {}
_PASSED_MAX = 4096


def _fields(model: type) -> dict[str, _Field]:
    """Every key a dict validated with ``model`` may hold, by alias and by name."""
    table = _TABLES.get(model)
    if table is not None:
        return table
    schemas = _field_schemas(model)
    config = _core_config(model)
    table = {}
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        field = _classify(info.annotation, schemas.get(name), config)
        if field is None:
            continue
        table[name] = field
        if info.alias:
            table[info.alias] = field
    for literal in ("resourceType", "resource_type"):
        if literal not in model.model_fields:  # type: ignore[attr-defined]
            table[literal] = _Field(_LITERAL, None)
    _TABLES[model] = table
    return table


def _field_schemas(model: type) -> dict[str, Any]:
    schema: Any = model.__pydantic_core_schema__  # type: ignore[attr-defined]
    while isinstance(schema, dict) and schema.get("type") != "model-fields":
        schema = schema.get("schema")
    if not isinstance(schema, dict):
        return {}
    return {name: f.get("schema") for name, f in schema["fields"].items()}


def _core_config(model: type) -> Any:
    schema: Any = model.__pydantic_core_schema__  # type: ignore[attr-defined]
    while isinstance(schema, dict):
        if schema.get("type") == "model":
            return schema.get("config")
        schema = schema.get("schema")
    return None


def _classify(annotation: Any, schema: Any, config: Any) -> _Field | None:
    """How the walk treats one field; None leaves the field out (any dict using it is
    validated fully)."""
    fhir_types = [t for t in _walk_annotation(annotation)
                  if isinstance(t, type) and issubclass(t, FhirBase)]
    if not fhir_types:
        if not isinstance(schema, dict):
            return None
        validator: Any = SchemaValidator(schema, config)
        if _primitive_type(annotation) == "id":
            validator = _IdValidator(validator)
        return _Field(_PRIMITIVE, validator, set())
    if len(set(fhir_types)) != 1 or not _is_fhir_element_schema(schema):
        return None
    fhir_type = fhir_types[0]
    if issubclass(fhir_type, FhirElementOrResourceBase):
        return _Field(_RESOURCE, fhir_type)
    klass = fhir_type.get_model_klass()
    return _Field(_COMPLEX, klass, klass.get_resource_type() != "FHIRPrimitiveExtension")


def _walk_annotation(annotation: Any) -> list[Any]:
    out, stack = [], [annotation]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(typing.get_args(current))
    return out


def _is_fhir_element_schema(schema: Any) -> bool:
    # ``default(nullable([list(] wrap(FhirBase validator, any) [)]))``: the structure step
    # 4 of the argument describes; anything else is left to full validation.
    for wrapper in ("default", "nullable", "list"):
        if isinstance(schema, dict) and schema.get("type") == wrapper:
            schema = schema.get("items_schema" if wrapper == "list" else "schema")
    if not isinstance(schema, dict) or schema.get("type") != "function-wrap":
        return False
    function = schema.get("function", {}).get("function")
    return (getattr(function, "__qualname__", "").startswith("FhirBase.")
            and schema.get("schema", {}).get("type") == "any")


_RESOURCE_MODELS: dict[tuple[type, str], type | None] = {}


def _resource_model(fhir_type: Any, node: dict[str, Any]) -> type | None:
    """The class ``FhirElementOrResourceBase`` validates ``node`` with, by the same lookup."""
    rtype = node.get("resourceType")
    if rtype is None and "resourceType" not in node:
        return typing.cast(type, fhir_type.get_model_klass())
    if not isinstance(rtype, str):
        return None
    key = (fhir_type, rtype)
    if key not in _RESOURCE_MODELS:
        try:
            klass = import_string(FHIR_TYPES_MAPS[fhir_type._prefix + rtype + "Type"])
        except Exception:  # noqa: BLE001 - the models raise bare errors; full validation decides
            klass = None
        _RESOURCE_MODELS[key] = klass
    return _RESOURCE_MODELS[key]


_LIST_FIELDS: dict[type, frozenset[str]] = {}


def _list_fields(model: type) -> frozenset[str]:
    """The keys (names and aliases) of ``model``'s fields that hold a list."""
    keys = _LIST_FIELDS.get(model)
    if keys is None:
        schemas = _field_schemas(model)
        found: set[str] = set()
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            schema = schemas.get(name)
            while isinstance(schema, dict) and schema.get("type") in ("default", "nullable"):
                schema = schema.get("schema")
            if isinstance(schema, dict) and schema.get("type") == "list":
                found.add(name)
                if info.alias:
                    found.add(info.alias)
        keys = _LIST_FIELDS[model] = frozenset(found)
    return keys


_PLACEHOLDERS: dict[type, Any] = {}


def _placeholder(model: type) -> Any:
    """An instance of ``model`` built without validation, standing in for a valid child."""
    instance = _PLACEHOLDERS.get(model)
    if instance is None:
        instance = _PLACEHOLDERS[model] = model.model_construct()  # type: ignore[attr-defined]
    return instance


# Known dicts by text: at most this many, holding at most this many bytes of text (a
# received message may be megabytes, and its every dict is known by its whole text),
# and a model is judged on its first lookups (kept when at least half of them find a
# dict met before).
_TEXT_MAX = 50_000
_TEXT_BYTES_MAX = 32 * 1024 * 1024
_TEXT_TRIAL = 256
_NEW_TRIAL: list[int] = []


class _NoShape(Exception):
    """The resource has something the structure argument does not cover."""


class ValidationCache:
    """Validate resources as :func:`validate_resource` does, proving each shape once.

    The shape of a resource is its structure: keys, list lengths, the Python class of each
    primitive value, literal resource types. Once full validation has accepted a shape, a
    resource of that shape is accepted when each primitive value passes the validator of
    its element in the FHIR models, and its required codes are in their value sets; any
    refusal is full validation's first error and location, found without validating the
    known parts again. The comment above this class argues the
    equivalence; ``tests/test_mapping_validation_cache.py`` checks it on random mutations.
    At most ``max_entries`` shapes are kept; the cache then starts over.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._ids: dict[tuple[Any, ...], int] = {}
        self._accepted: set[int] = set()
        self._next = 0
        # Parsed JSON only (see validate): the shape of a dict by its model and JSON text,
        # for dicts whose primitives all passed; and, per model, lookups and hits while
        # it is on trial, or None once it is known to repeat too rarely to be worth it.
        self._by_text: dict[tuple[type, bytes], int] = {}
        self._text_bytes = 0
        self._text_trial: dict[type, list[int] | None] = {}

    def clear(self) -> None:
        """Forget every shape (numbers already given out are never given again)."""
        self._ids = {}
        self._accepted = set()
        self._by_text = {}
        self._text_bytes = 0

    def __len__(self) -> int:
        return len(self._accepted)

    def validate(self, resource: dict[str, Any], *, path: str | None = None,
                 parsed: bool = False) -> None:
        """Raise :class:`ValidationError` exactly when :func:`validate_resource` would.

        ``parsed``: ``resource`` is what a JSON parser returned (dicts, lists, strings,
        numbers, booleans, None only), as a received message is. Its JSON text then
        says exactly what a dict holds, types included, so a dict met before with the
        same text and model has the shape found then, its primitives having passed
        (their verdicts depend on the values alone), and is not walked again.
        """
        prefix = _prefix(resource, path)
        model = _model_for(resource, prefix)
        if len(self._ids) > self.max_entries:
            self.clear()
        try:
            root = self._shape(resource, model, None, parsed)
        except Exception:  # noqa: BLE001 - no shape, or a primitive failed: see _refuse
            self._refuse(resource, model, prefix)
            validate_resource(resource, path=path)
            return
        if root not in self._accepted:
            shapes: dict[int, tuple[type, int]] = {}
            self._shape(resource, model, shapes)
            try:
                model.model_validate(self._skeleton(resource, model, shapes))
            except Exception:  # noqa: BLE001 - see _refuse
                self._refuse(resource, model, prefix)
                validate_resource(resource, path=path)
            self._accepted.update(shape for _, shape in shapes.values())
        _check_codes(resource, prefix)

    def _refuse(self, resource: dict[str, Any], model: type, prefix: str) -> None:
        """Raise full validation's first error for a resource the fast path did not accept,
        without validating its known parts again.

        Every child element whose shape is known and whose primitives pass is valid (the
        argument above) and stands in as an unvalidated instance; the rest, down to the
        failing values, stays as it was. A valid child adds no error to what the models
        report, and the models report the errors of the other fields, in field order,
        whatever stands in it: so the first error, and its location, are those of full
        validation. Returns without raising when the models accept the stand-in (something
        this walk does not cover); the caller then validates fully.
        """
        _validate_model(model, self._partial(resource, model), prefix)

    def _partial(self, node: dict[str, Any], model: type) -> dict[str, Any]:
        table = _fields(model)
        many = _list_fields(model)
        out: dict[str, Any] = {}
        for key, value in node.items():
            field = table.get(key)
            if field is not None and (field.kind == _COMPLEX or field.kind == _RESOURCE):
                # A dict where a list belongs, or a list where a dict belongs, is refused
                # by the field itself: it stays as received.
                if type(value) is dict and key not in many:
                    value = self._partial_child(field, value)
                elif type(value) is list and key in many:
                    value = [self._partial_child(field, item) if type(item) is dict else item
                             for item in value]
            out[key] = value
        return out

    def _partial_child(self, field: _Field, node: dict[str, Any]) -> Any:
        model = field.target if field.kind == _COMPLEX else _resource_model(field.target, node)
        if model is None:
            return node
        try:
            shape = self._shape(node, model, None)
        except Exception:  # noqa: BLE001 - the failure is below: keep this level as it is
            return self._partial(node, model)
        if shape in self._accepted and (field.kind == _RESOURCE or field.extra):
            return _placeholder(model)
        return self._partial(node, model)

    def _shape(self, node: dict[str, Any], model: type,
               shapes: dict[int, tuple[type, int]] | None, parsed: bool = False) -> int:
        """The number of ``node``'s shape; raises if it has none or a primitive fails its
        validator. With ``shapes``, also records each dict's model and shape by ``id()``.
        With ``parsed`` (see :meth:`validate`), a dict is first looked up by its text."""
        if not parsed or shapes is not None:
            return self._walk(node, model, shapes, parsed)
        trial = self._text_trial.get(model, _NEW_TRIAL)
        if trial is None:  # this model's dicts seldom repeat: walking is cheaper
            return self._walk(node, model, None, True)
        key = (model, orjson.dumps(node))
        shape = self._by_text.get(key)
        if trial is _NEW_TRIAL:
            trial = self._text_trial[model] = [0, 0]
        if trial[0] < _TEXT_TRIAL:
            trial[0] += 1
            if shape is not None:
                trial[1] += 1
            elif trial[0] == _TEXT_TRIAL and trial[1] * 2 < _TEXT_TRIAL:
                self._text_trial[model] = None
        if shape is None:
            shape = self._walk(node, model, None, True)
            size = len(key[1])
            if len(self._by_text) >= _TEXT_MAX or self._text_bytes + size > _TEXT_BYTES_MAX:
                self._by_text = {}
                self._text_bytes = 0
            if size <= _TEXT_BYTES_MAX:
                self._by_text[key] = shape
                self._text_bytes += size
        return shape

    def _walk(self, node: dict[str, Any], model: type,
              shapes: dict[int, tuple[type, int]] | None, parsed: bool) -> int:
        """:meth:`_shape` by walking ``node``'s keys and values."""
        # The hot loop of the fast path: plain tuples and locals on purpose.
        table = _TABLES.get(model) or _fields(model)
        sig: list[Any] = [model, tuple(node)]
        add = sig.append
        # Children are looked up by text only where this dict would be (see _shape).
        step = self._shape if parsed and shapes is None else self._walk
        for key, value in node.items():
            field = table.get(key)
            if field is None:
                raise _NoShape
            kind, target, extra = field
            cls = type(value)
            if kind == _PRIMITIVE:
                if cls is str or cls is int:
                    # A validator's verdict is a function of the value alone; equal
                    # strings are the same value, and so are equal ints (a str never
                    # equals an int; bools and floats, which may equal an int, are not
                    # kept), so a value that passed need not be run again. An empty
                    # string is never kept: it is refused whatever the validator says.
                    if value not in extra:
                        if value == "":
                            raise _NoShape
                        target.validate_python(value)
                        if len(extra) >= _PASSED_MAX:
                            extra.clear()
                        extra.add(value)
                    add(cls)
                    continue
                target.validate_python(value)
                if cls is list:
                    if "" in value:
                        raise _NoShape  # an empty string in an array of primitives
                    add(_LIST)
                    add(len(value))
                    sig.extend(map(type, value))
                else:
                    add(cls)
            elif kind == _LITERAL:
                if cls is not str:
                    raise _NoShape
                add(value)
            elif cls is dict:
                child = target if kind == _COMPLEX else _resource_model(target, value)
                if child is None:
                    raise _NoShape
                add(_DICT)
                add(step(value, child, shapes, parsed))
            elif cls is list:
                add(_LIST)
                add(len(value))
                for item in value:
                    if type(item) is dict:
                        child = target if kind == _COMPLEX else _resource_model(target, item)
                        if child is None:
                            raise _NoShape
                        add(step(item, child, shapes, parsed))
                    elif item is None:
                        add(None)
                    else:
                        raise _NoShape
            elif value is None:
                add(None)
            else:
                raise _NoShape
        if model is _PERIOD and _reversed_period(node):
            raise _NoShape  # invariant per-1: a verdict on the values, not the shape
        signature = tuple(sig)
        shape: int | None = self._ids.get(signature)
        if shape is None:
            # The JSON form of each primitive is a matter of its Python class, which the
            # signature records: checked once per new signature. So is an empty value
            # other than a string: an empty object, an empty array (its length), a null
            # member (null is recorded as such, in an array of primitives too).
            if not node or not _forms_hold(node, model) or _holds_empty(node):
                raise _NoShape
            shape = self._ids[signature] = self._next
            self._next += 1
        if shapes is not None and shapes.setdefault(id(node), (model, shape))[1] != shape:
            raise _NoShape  # one dict object in two places of different shape
        return shape

    def _skeleton(self, node: dict[str, Any], model: type,
                  shapes: dict[int, tuple[type, int]]) -> dict[str, Any]:
        table = _TABLES[model]
        out: dict[str, Any] = {}
        for key, value in node.items():
            field = table[key]
            if field.kind == _COMPLEX or field.kind == _RESOURCE:
                if type(value) is dict:
                    value = self._stand_in(field, value, shapes)
                elif type(value) is list:
                    value = [self._stand_in(field, item, shapes) if type(item) is dict else item
                             for item in value]
            out[key] = value
        return out

    def _stand_in(self, field: _Field, node: dict[str, Any],
                  shapes: dict[int, tuple[type, int]]) -> Any:
        model, shape = shapes[id(node)]
        if shape in self._accepted and (field.kind == _RESOURCE or field.extra):
            return _placeholder(model)
        return self._skeleton(node, model, shapes)


_DEFAULT_CACHE = ValidationCache()


def validate_resource_cached(resource: dict[str, Any], *, path: str | None = None) -> None:
    """:func:`validate_resource` through the process-wide :class:`ValidationCache`: the
    same verdict and error location, at a fraction of the cost for known shapes."""
    _DEFAULT_CACHE.validate(resource, path=path)


def validation_cache() -> ValidationCache:
    """The process-wide cache used by :func:`validate_resource_cached`."""
    return _DEFAULT_CACHE
