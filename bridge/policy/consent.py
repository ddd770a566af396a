"""Consent registry: FHIR R4 Consent resources, and the one question they answer.

*May this controller disclose this piece of this patient's data to that recipient, for
that purpose, now?* No consent means no (GB/T 39725-2020 §7 a: use and disclosure must
not exceed the subject's authorisation, which names the recipient, the purpose and the
duration). The piece of data is an :class:`Item`: a resource type, its §6.1 data
categories and its security labels (``meta.security``, written by classification).

The rule, for one consent and one item (this is the specification the tests check
against an independent evaluator):

1. The consent says nothing (``none``) unless its status is ``active`` and its root
   provision *matches*.
2. A provision matches when each condition it has holds (an absent condition holds):
   ``period`` contains now; ``actor`` (role IRCP) names the recipient; ``purpose``
   names the purpose of use (v3 PurposeOfUse); ``action`` names the action
   (``disclose``); ``dataPeriod`` — for a permit the requested data lies inside it,
   for a deny it overlaps it or the data's dates are unknown; ``class`` names the
   resource type or one of the item's data categories; and, for a deny only,
   ``securityLabel`` shares a label with the item. A permit's ``securityLabel`` is not
   a condition: it names the sensitive labels the permit explicitly covers.
3. Walk down from the root through matching provisions. A maximal matching path ends at
   a provision none of whose children match. If any maximal path ends at a ``deny``,
   the consent denies (the first such path in document order decides); otherwise it
   permits and the first maximal path decides. (Equivalently: each provision's outcome
   is its own type unless a child matches, in which case any child denying makes it
   deny, else it permits — deny overrides among siblings, the deepest rule decides.)
4. A permit's *cover* is the union of the ``securityLabel`` of the permit provisions
   on all its maximal paths. An item carrying special-disease classes (grade 5) is
   permitted only when the cover names every class, or names confidentiality V;
   otherwise the outcome is ``uncovered`` (the item is held back, §6.2 e).

Across the patient's consents (by id order): any deny wins (a patient's restriction,
§7 h, overrides every permit; lift it by amending or revoking the consent that carries
it); else a permit (the most recently updated consent is recorded); else ``uncovered``;
else ``none``.

:meth:`ConsentRegistry.require_consent` asks this for each resource type of a
disclosure (without labels) and raises :class:`~bridge.errors.ConsentDenied` unless
every type is permitted; the policy engine then asks it for every labelled resource and
item and holds back what is not permitted. An :class:`EmergencyOverride` (purpose
ETREAT, a named actor and a reason, §7 b 2 and §7 h) permits without consent; it is
never implied and the decision is marked as an override.

Lookups go through an index from patient identifier (system|value) to consent ids, so
the cost of a decision depends on how many consents that patient has, not on how many
are registered. Errors name FHIR paths (``Consent.provision.period``), never a value.
"""

from __future__ import annotations

import builtins
import copy
import gc
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from functools import cached_property, lru_cache
from typing import Any, Literal

from bridge.errors import ConsentDenied, MappingError, bounded_path, member_label
from bridge.instants import utc
from bridge.policy.classify import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    GRADE_SYSTEM,
    GRADES,
    SENSITIVITY_SYSTEM,
    default_classification,
    default_sensitive_codes,
)
from bridge.policy.identity import ID_CARD_SYSTEM, IdentityIndex, id_card_pseudonyms
from bridge.records.fhir import validate_resource

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentaction"
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
CONSENT_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentcategorycodes"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

#: PurposeOfUse codes (v3-ActReason) this bridge understands. Unknown codes are
#: rejected when a consent is registered, so a typo cannot silently widen or narrow it.
SUPPORTED_PURPOSES: frozenset[str] = frozenset(
    {
        "HPAYMT",  # healthcare payment
        "CLMATTCH",  # claim attachment
        "COVAUTH",  # coverage authorisation
        "TREAT",  # treatment
        "ETREAT",  # emergency treatment
        "HRESCH",  # healthcare research
        "PUBHLTH",  # public health
        "HOPERAT",  # healthcare operations
        "HMARKT",  # marketing (§7 c: needs its own explicit authorisation)
        "PATRQT",  # patient requested
    }
)

#: Consent actions (http://terminology.hl7.org/CodeSystem/consentaction).
SUPPORTED_ACTIONS: frozenset[str] = frozenset({"collect", "access", "use", "disclose", "correct"})

RECIPIENT_ROLE = "IRCP"
#: ``meta.source`` of a consent a partner submitted, followed by the partner's id.
PARTNER_SOURCE = "urn:ws-fhir-bridge:partner:"
EMERGENCY_PURPOSE = "ETREAT"

# China Standard Time: a consent date without a time is a calendar day in China.
_CST = timezone(timedelta(hours=8))
_DATETIME_RE = re.compile(r"^([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})(T.+)?)?)?\Z")

Span = tuple[datetime | None, datetime | None]
Label = tuple[str, str]


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """One parsed provision (the root or a nested one) with its FHIR path."""

    path: str
    type: str  # "permit" or "deny"
    period: Span | None
    data_period: Span | None
    recipients: frozenset[str]
    purposes: frozenset[str]
    classes: frozenset[str]
    security_labels: frozenset[Label]
    children: tuple[Provision, ...] = ()
    actions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ConsentRecord:
    """A registered consent: the validated resource and its parsed rules."""

    id: str
    status: str
    version: str | None
    last_updated: str | None
    patient: tuple[str, str]
    provision: Provision
    resource: dict[str, Any] = field(repr=False, compare=False)
    registered_at: datetime | None = None
    #: The partner that submitted this consent through the consent API (its
    #: ``meta.source`` is :data:`PARTNER_SOURCE` + the partner id), or None.
    submitted_by: str | None = None

    @property
    def patient_key(self) -> str:
        """``system|value`` of the consent's patient (the registry's index key)."""
        return patient_key(*self.patient)


def patient_key(system: str, value: str) -> str:
    """The index key of a patient identifier: ``system|value``."""
    return f"{system}|{value}"


@dataclass(frozen=True)
class EmergencyOverride:
    """Disclosure for emergency treatment without a permitting consent (§7 b 2, §7 h).

    Only honoured for purpose ETREAT, with the person who invokes it (``actor``, an
    operator or clinician id) and a non-empty ``reason``; both go into the audit record.
    """

    actor: str
    reason: str


@dataclass(frozen=True)
class ConsentDecision:
    """Why a disclosure is permitted: which consent, which version, which rule decided.

    ``allowed_labels`` are the security labels the permitting rules explicitly cover;
    ``denied_labels`` those of deny rules that apply to this recipient and purpose when
    the data carries the label. ``by_type`` records, per resource type, the consent and
    provision that permitted it. ``override`` is set when an emergency override, not a
    consent, permitted the disclosure (``consent_id`` is then empty).
    """

    consent_id: str
    version: str | None
    last_updated: str | None
    provision_path: str
    recipient: str
    purpose: str
    resource_types: frozenset[str]
    allowed_labels: frozenset[Label]
    denied_labels: frozenset[Label]
    decided_at: datetime
    consent_ids: tuple[str, ...] = ()
    by_type: tuple[tuple[str, str, str], ...] = ()
    override: EmergencyOverride | None = None


@dataclass(frozen=True)
class Request:
    """The request-wide part of the consent question (``now`` in UTC)."""

    recipient: str
    purpose: str
    now: datetime
    data_period: tuple[datetime, datetime] | None = None
    action: str = "disclose"


@dataclass(frozen=True)
class Item:
    """One piece of data a consent is asked about: a resource, or one entry of a
    repeating element (``Claim.diagnosis[2]``), with its categories and labels."""

    resource_type: str
    categories: frozenset[str] = frozenset()
    labels: frozenset[Label] = frozenset()

    @cached_property
    def sensitive(self) -> frozenset[str]:
        """The special-disease classes among the labels (need explicit cover). Worked out
        once per item: the items of a disclosure are shared values, asked again and again."""
        return _sensitive(self.labels)


# Few label sets occur, and every item of every disclosure is asked for its classes.
@lru_cache(maxsize=4096)
def _sensitive(labels: frozenset[Label]) -> frozenset[str]:
    return frozenset(code for system, code in labels if system == SENSITIVITY_SYSTEM)


Outcome = Literal["permit", "deny", "uncovered", "none"]


@dataclass(frozen=True)
class Verdict:
    """The answer for one item: ``outcome``, the consent and provision that decided (for
    ``none``, the location of the condition that failed), and the permit's cover."""

    outcome: Outcome
    consent_id: str | None
    provision_path: str
    message: str
    cover: frozenset[Label] = frozenset()

    @property
    def permitted(self) -> bool:
        return self.outcome == "permit"


# --- parsing ------------------------------------------------------------------------


def _bad(message: str, path: str) -> MappingError:
    return MappingError(message, location=path)


def _parse_instant(value: Any, path: str, *, end: bool) -> datetime:
    """Parse a FHIR date or dateTime to the first (or, for an end, last) instant it covers."""
    if not isinstance(value, str):
        raise _bad("not a FHIR dateTime", path)
    m = _DATETIME_RE.match(value)
    if not m:
        raise _bad("not a FHIR dateTime", path)
    year, month, day, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    try:
        if rest:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise _bad("a dateTime with a time needs a zone", path)
            return utc(parsed)
        if day:
            start = date(int(year), int(month), int(day))
            last = start
        elif month:
            start = date(int(year), int(month), 1)
            nxt = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
            last = nxt - timedelta(days=1)
        else:
            start = date(int(year), 1, 1)
            last = date(int(year), 12, 31)
    except ValueError:
        raise _bad("not a FHIR dateTime", path) from None
    # A date at the edge of the calendar keeps its meaning (from always, until ever).
    if end:
        return utc(datetime.combine(last, time.max, _CST))
    return utc(datetime.combine(start, time.min, _CST))


def _parse_period(raw: Any, path: str) -> Span | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("not a Period", path)
    start = _parse_instant(raw["start"], f"{path}.start", end=False) if "start" in raw else None
    end = _parse_instant(raw["end"], f"{path}.end", end=True) if "end" in raw else None
    if start is not None and end is not None and end < start:
        raise _bad("period ends before it starts", path)
    return (start, end)


def _codings(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, dict):
        return [c for c in raw.get("coding") or [] if isinstance(c, dict)]
    return []


def _has_code(concepts: Iterable[Any], system: str, code: str) -> bool:
    return any(
        c.get("system") == system and c.get("code") == code
        for concept in concepts
        for c in _codings(concept)
    )


def _list(raw: dict[str, Any], key: str, path: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"{key} must be a list", f"{path}.{key}")
    return value


def _parse_provision(
    raw: Any, path: str, *, root: bool, scoped: bool = False
) -> Provision:
    """Parse one provision; ``scoped`` says an enclosing permit already names the
    recipient and purpose, which a nested permit then inherits."""
    if not isinstance(raw, dict):
        raise _bad("not a provision", path)
    ptype = raw.get("type")
    if ptype is None:
        if not root:
            raise _bad("a nested provision needs a type", f"{path}.type")
        ptype = "permit"
    if ptype not in ("permit", "deny"):
        raise _bad("provision type must be permit or deny", f"{path}.type")
    for unsupported in ("code", "data"):
        # A condition the bridge cannot evaluate would silently widen a permit or
        # narrow a deny; refuse the consent instead.
        if raw.get(unsupported):
            raise _bad(f"provision.{unsupported} is not supported", f"{path}.{unsupported}")

    recipients: set[str] = set()
    for i, actor in enumerate(_list(raw, "actor", path)):
        apath = f"{path}.actor[{i}]"
        if not isinstance(actor, dict):
            raise _bad("not an actor", apath)
        if not _has_code([actor.get("role")], PARTICIPATION_SYSTEM, RECIPIENT_ROLE):
            # Other roles (e.g. the disclosing custodian) do not name a recipient.
            continue
        ident = (actor.get("reference") or {}).get("identifier") or {}
        if ident.get("system") != PARTNER_SYSTEM or not ident.get("value"):
            raise _bad(
                "a recipient actor must be identified by a partner identifier",
                f"{apath}.reference.identifier",
            )
        recipients.add(str(ident["value"]))
    if ptype == "permit" and not scoped and not recipients:
        raise _bad("a permit provision needs a recipient actor (role IRCP)", f"{path}.actor")

    purposes: set[str] = set()
    for i, coding in enumerate(_list(raw, "purpose", path)):
        ppath = f"{path}.purpose[{i}]"
        if (
            not isinstance(coding, dict)
            or coding.get("system") != PURPOSE_SYSTEM
            or coding.get("code") not in SUPPORTED_PURPOSES
        ):
            raise _bad("purpose is not a supported v3 PurposeOfUse code", ppath)
        purposes.add(str(coding["code"]))
    if ptype == "permit" and not scoped and not purposes:
        # §7 a: an authorisation states the purpose; a permit without one permits nothing.
        raise _bad("a permit provision needs a purpose", f"{path}.purpose")

    actions: set[str] = set()
    for i, concept in enumerate(_list(raw, "action", path)):
        codings = _codings(concept)
        if not codings:
            raise _bad("action needs a coding", f"{path}.action[{i}]")
        for coding in codings:
            if coding.get("system") != ACTION_SYSTEM or coding.get("code") not in SUPPORTED_ACTIONS:
                raise _bad("action is not a consentaction code", f"{path}.action[{i}]")
            actions.add(str(coding["code"]))

    classes: set[str] = set()
    categories = default_classification().categories
    for i, coding in enumerate(_list(raw, "class", path)):
        cpath = f"{path}.class[{i}]"
        if not isinstance(coding, dict) or not coding.get("code"):
            raise _bad("class must be a FHIR resource type or a data category", cpath)
        system, code = coding.get("system"), str(coding["code"])
        if (system == CATEGORY_SYSTEM and code in categories) or (
            system == RESOURCE_TYPES_SYSTEM and code[:1].isupper()
        ):
            classes.add(code)
        else:
            raise _bad("class must be a FHIR resource type or a data category", cpath)

    labels: set[Label] = set()
    for i, coding in enumerate(_list(raw, "securityLabel", path)):
        if not isinstance(coding, dict) or not coding.get("system") or not coding.get("code"):
            raise _bad("security label needs system and code", f"{path}.securityLabel[{i}]")
        labels.add((str(coding["system"]), str(coding["code"])))

    children = tuple(
        _parse_provision(
            child, f"{path}.provision[{i}]", root=False, scoped=scoped or ptype == "permit"
        )
        for i, child in enumerate(_list(raw, "provision", path))
    )
    return Provision(
        path=path,
        type=ptype,
        period=_parse_period(raw.get("period"), f"{path}.period"),
        data_period=_parse_period(raw.get("dataPeriod"), f"{path}.dataPeriod"),
        recipients=frozenset(recipients),
        purposes=frozenset(purposes),
        classes=frozenset(classes),
        security_labels=frozenset(labels),
        children=children,
        actions=frozenset(actions),
    )


def parse_consent(resource: dict[str, Any], *, trusted: bool = False) -> ConsentRecord:
    """Validate a FHIR R4 Consent and parse its rules.

    Raises :class:`~bridge.errors.MappingError` (422) naming the FHIR path of the first
    problem: not valid FHIR, scope other than patient-privacy, no category, a patient
    that is not a logical reference by identifier, a period ending before it starts,
    an unsupported purpose or action, a provision using ``code`` or ``data``, a
    permit without a recipient (IRCP) actor, or a code in one of the label systems the
    bridge matches that is not on its list (:func:`own_code_lists`).

    ``trusted=True`` is for consents this bridge validated before and stored itself:
    it skips the FHIR model validation (the costly part) and takes ownership of
    ``resource`` instead of copying it. Every rule above is still checked, so a
    damaged store row still fails with a located error.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise _bad("not a Consent resource", "Consent.resourceType")
    if not trusted:
        validate_resource(resource)
        _check_own_codes(resource, "Consent")
    try:
        return _parse_checked(resource, trusted=trusted)
    except (AttributeError, TypeError, KeyError):
        # Only reachable on the trusted path, where the model did not check the shapes.
        raise _bad("not a valid Consent", "Consent") from None


#: v3-Confidentiality (http://terminology.hl7.org/CodeSystem/v3-Confidentiality).
CONFIDENTIALITY_CODES: frozenset[str] = frozenset({"U", "L", "M", "N", "R", "V"})


@lru_cache(maxsize=1)
def own_code_lists() -> dict[str, tuple[frozenset[str], str]]:
    """The code systems whose codes the bridge writes and matches in labels, each with
    its codes (from the installed policy files) and what the codes are called."""
    return {
        SENSITIVITY_SYSTEM: (frozenset(default_sensitive_codes().titles),
                             "the special-disease classes"),
        CATEGORY_SYSTEM: (frozenset(default_classification().categories),
                          "the data categories"),
        GRADE_SYSTEM: (frozenset(str(g) for g in GRADES), "the grades 1-5"),
        CONFIDENTIALITY_SYSTEM: (CONFIDENTIALITY_CODES, "the v3 confidentiality codes"),
    }


def _check_own_codes(node: Any, path: str) -> None:
    """Refuse a coding anywhere in ``node`` whose system is one the bridge matches
    labels in (:func:`own_code_lists`) and whose code is not on that system's list: a
    typo there would silently fail to cover, or to hold back, what it names. The error
    names the path, never the code (it may be anything a client sent)."""
    if isinstance(node, dict):
        system = node.get("system")
        if isinstance(system, str) and "code" in node:
            known = own_code_lists().get(system)
            if known is not None and node["code"] not in known[0]:
                raise _bad(f"code is not one of {known[1]} of {system}",
                           bounded_path(f"{path}.code"))
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                _check_own_codes(value, f"{path}.{member_label(str(key))}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_own_codes(item, f"{path}[{i}]")


def _parse_checked(resource: dict[str, Any], *, trusted: bool) -> ConsentRecord:
    if not resource.get("id"):
        raise _bad("a registered consent needs an id", "Consent.id")
    status = resource.get("status")
    if status not in ("draft", "proposed", "active", "rejected", "inactive", "entered-in-error"):
        raise _bad("code not in the required value set", "Consent.status")
    if not _has_code([resource.get("scope")], SCOPE_SYSTEM, "patient-privacy"):
        raise _bad("scope must be patient-privacy", "Consent.scope")
    if not any(_codings(c) for c in resource.get("category") or []):
        raise _bad("category is required", "Consent.category")
    ident = (resource.get("patient") or {}).get("identifier") or {}
    if not ident.get("system") or not ident.get("value"):
        raise _bad(
            "patient must be a logical reference by identifier", "Consent.patient.identifier"
        )
    raw_provision = resource.get("provision")
    if not isinstance(raw_provision, dict):
        raise _bad("a consent without provision permits nothing", "Consent.provision")
    provision = _parse_provision(raw_provision, "Consent.provision", root=True)
    meta = resource.get("meta") or {}
    source = meta.get("source")
    submitted_by = (
        source.removeprefix(PARTNER_SOURCE)
        if isinstance(source, str) and source.startswith(PARTNER_SOURCE) else None
    )
    return ConsentRecord(
        id=str(resource["id"]),
        status=str(status),
        version=meta.get("versionId"),
        last_updated=meta.get("lastUpdated"),
        patient=(str(ident["system"]), str(ident["value"])),
        provision=provision,
        resource=resource if trusted else copy.deepcopy(resource),
        submitted_by=submitted_by,
    )


# --- evaluation ---------------------------------------------------------------------


def _within(now: datetime, period: Span | None) -> bool:
    if period is None:
        return True
    start, end = period
    return (start is None or start <= now) and (end is None or now <= end)


def _data_period_ok(prov: Provision, req: Request) -> bool:
    """Does a rule's dataPeriod condition hold for the requested data?

    For a permit the requested data must lie inside it (unknown data dates do not);
    for a deny any overlap counts, and unknown data dates count too: both err on the
    side of not disclosing.
    """
    if prov.data_period is None:
        return True
    lo, hi = prov.data_period
    if req.data_period is None:
        return prov.type == "deny"
    start, end = req.data_period
    if prov.type == "permit":
        return (lo is None or lo <= start) and (hi is None or end <= hi)
    return (lo is None or lo <= end) and (hi is None or start <= hi)


# The order in which conditions are checked; the first that fails is the one reported.
_MISMATCH_MESSAGES = {
    "period": "consent is outside its period",
    "actor": "consent does not name the recipient",
    "purpose": "purpose is not permitted by the consent",
    "action": "action is not permitted by the consent",
    "dataPeriod": "data period is outside the consent",
    "class": "resource type is not covered by the consent",
    "securityLabel": "security labels do not match",
}


def _mismatch(prov: Provision, req: Request, item: Item) -> str | None:
    """The first condition of ``prov`` that fails for this request and item, or None."""
    if not _within(req.now, prov.period):
        return "period"
    if prov.recipients and req.recipient not in prov.recipients:
        return "actor"
    if prov.purposes and req.purpose not in prov.purposes:
        return "purpose"
    if prov.actions and req.action not in prov.actions:
        return "action"
    if not _data_period_ok(prov, req):
        return "dataPeriod"
    if prov.classes and item.resource_type not in prov.classes and not (
        prov.classes & item.categories
    ):
        return "class"
    if prov.type == "deny" and prov.security_labels and not (prov.security_labels & item.labels):
        return "securityLabel"
    return None


def _walk(
    prov: Provision, req: Request, item: Item, cover: frozenset[Label]
) -> tuple[str, str, frozenset[Label]]:
    """(outcome type, deciding path, cover) of a matching provision (rule 3 and 4)."""
    if prov.type == "permit" and prov.security_labels:
        cover = cover | prov.security_labels
    permit: tuple[str, str, frozenset[Label]] | None = None
    for child in prov.children:
        if _mismatch(child, req, item) is not None:
            continue
        result = _walk(child, req, item, cover)
        if result[0] == "deny":
            return result
        permit = result if permit is None else (permit[0], permit[1], permit[2] | result[2])
    if permit is not None:
        return permit
    return (prov.type, prov.path, cover)


def covers(cover: frozenset[Label], classes: frozenset[str]) -> bool:
    """Does a permit's cover name every special-disease class (or confidentiality V)?"""
    if not classes or (CONFIDENTIALITY_SYSTEM, "V") in cover:
        return True
    return all((SENSITIVITY_SYSTEM, c) in cover for c in classes)


def evaluate_consent(record: ConsentRecord, req: Request, item: Item) -> Verdict:
    """The verdict of one consent for one item (rules 1-4 of the module docstring)."""
    if record.status != "active":
        return Verdict("none", record.id, "Consent.status", "consent is not active")
    root = record.provision
    failed = _mismatch(root, req, item)
    if failed is not None:
        return Verdict("none", record.id, f"{root.path}.{failed}", _MISMATCH_MESSAGES[failed])
    outcome, path, cover = _walk(root, req, item, frozenset())
    if outcome == "deny":
        message = "a deny provision matches" if path != root.path else "the consent denies"
        return Verdict("deny", record.id, path, message)
    if not covers(cover, item.sensitive):
        return Verdict(
            "uncovered", record.id, path,
            "special-disease data needs a consent that names its class", cover,
        )
    return _permit(record.id, path, cover)


# Verdicts are values; a patient's permits recur for every item they cover.
@lru_cache(maxsize=4096)
def _permit(consent_id: str, path: str, cover: frozenset[Label]) -> Verdict:
    return Verdict("permit", consent_id, path, "permitted", cover)


@lru_cache(maxsize=1024)
def _type_item(resource_type: str, category: str) -> Item:
    """The item a resource type is asked as: the type with its data category."""
    return Item(resource_type, frozenset({category}) if category else frozenset())


@lru_cache(maxsize=1024)
def _bare_item(resource_type: str) -> Item:
    return Item(resource_type)


def decide(records: Sequence[ConsentRecord], req: Request, item: Item) -> Verdict:
    """Combine the verdicts of a patient's consents for one item (deny wins, then the
    most recently updated permit, then uncovered, then none)."""
    if not records:
        return Verdict("none", None, "Consent", "no consent is registered for this patient")
    if len(records) == 1:
        return evaluate_consent(records[0], req, item)  # what the rules below give for one
    ordered = sorted(records, key=lambda r: r.id)
    verdicts = [(r, evaluate_consent(r, req, item)) for r in ordered]
    for _, v in verdicts:
        if v.outcome == "deny":
            return v
    for wanted in ("permit", "uncovered"):
        found = [(r, v) for r, v in verdicts if v.outcome == wanted]
        if found:
            return max(found, key=lambda rv: (rv[0].last_updated or "", rv[0].id))[1]
    return verdicts[0][1]


class ConsentQuestion:
    """One patient's consents asked one request's question (:func:`decide`) about many
    items: every resource type of a disclosure, then every labelled resource and entry.

    An item reaches the rules only through a few facts, and the answer is worked out
    once per combination of them that occurs. Its type and §6.1 categories matter only
    where some provision's ``class`` names them, its labels only where a deny
    provision's ``securityLabel`` names them, and its special-disease classes through a
    permit's cover (rule 4). Most consents name no class and deny nothing, so every
    item without a special-disease class gets the same answer, and a disclosure needs
    one evaluation for those and one per set of classes it carries.
    """

    def __init__(self, records: Sequence[ConsentRecord], req: Request) -> None:
        self.records = records
        self.req = req
        classes: set[str] = set()
        deny_labels: set[Label] = set()
        stack = [r.provision for r in records]
        while stack:
            prov = stack.pop()
            classes |= prov.classes
            if prov.type == "deny":
                deny_labels |= prov.security_labels
            stack.extend(prov.children)
        self._classes = frozenset(classes)
        self._deny_labels = frozenset(deny_labels)
        # With neither, the special-disease classes alone tell items apart.
        self._by_classes_only = not classes and not deny_labels
        self._answers: dict[Any, Verdict] = {}

    def verdict(self, item: Item) -> Verdict:
        """``decide(records, req, item)``."""
        key: Any
        if self._by_classes_only:
            key = item.sensitive
        else:
            classes = self._classes
            rtype = item.resource_type
            key = (
                rtype if rtype in classes else None,
                item.categories & classes,
                item.labels & self._deny_labels,
                item.sensitive,
            )
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = decide(self.records, self.req, item)
        return found


def override_deny(records: Sequence[ConsentRecord], req: Request, item: Item) -> Verdict | None:
    """The deny provision that holds against an emergency override for this item, or None.

    An override stands in for a missing permit, never against a refusal the patient
    recorded. Every deny provision of the patient's active consents, at any depth,
    holds when its own conditions match (recipient, purpose if it names one, class,
    labels, action, data period) within its consent's period: a deny nested in a
    permit for treatment ("but never my observations") still holds when the override's
    purpose, emergency treatment, is not the permit's."""
    for record in sorted(records, key=lambda r: r.id):
        if record.status != "active" or not _within(req.now, record.provision.period):
            continue
        found = _deny_matching(record.provision, req, item)
        if found is not None:
            return Verdict("deny", record.id, found, "a deny provision matches")
    return None


def _deny_matching(prov: Provision, req: Request, item: Item) -> str | None:
    if prov.type == "deny" and _mismatch(prov, req, item) is None:
        return prov.path
    for child in prov.children:
        found = _deny_matching(child, req, item)
        if found is not None:
            return found
    return None


def _label_denies(prov: Provision, req: Request, item: Item) -> set[Label]:
    """Labels of deny rules that would apply to ``item`` if it carried them."""
    out: set[Label] = set()
    for child in prov.children:
        probe = Item(item.resource_type, item.categories, child.security_labels)
        if _mismatch(child, req, probe) is not None:
            continue
        if child.type == "deny":
            out |= child.security_labels
        out |= _label_denies(child, req, item)
    return out


def check_override(emergency: EmergencyOverride, purpose: str) -> None:
    """Raise ConsentDenied unless the override is complete and the purpose is ETREAT."""
    if purpose != EMERGENCY_PURPOSE:
        raise ConsentDenied(
            "an emergency override is only for emergency treatment (ETREAT)", location="purpose"
        )
    if not isinstance(emergency.actor, str) or not emergency.actor.strip():
        raise ConsentDenied("an emergency override names who invokes it", location="emergency.actor")
    if not isinstance(emergency.reason, str) or not emergency.reason.strip():
        raise ConsentDenied("an emergency override states a reason", location="emergency.reason")


def request(
    recipient: str, purpose: str, now: datetime, data_period: tuple[date, date] | None,
    action: str = "disclose",
) -> Request:
    """The request :meth:`ConsentRegistry.require_consent` asks its question with."""
    return Request(recipient, purpose, _utc(now), data_instants(data_period), action)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def data_instants(
    data_period: tuple[date, date] | None,
) -> tuple[datetime, datetime] | None:
    """A span of calendar days (China Standard Time) as UTC instants."""
    if data_period is None:
        return None
    start, end = data_period
    return _instants(start, end)


# Each span is asked about twice per disclosure, and stays recur.
@lru_cache(maxsize=4096)
def _instants(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        utc(datetime.combine(start, time.min, _CST)),
        utc(datetime.combine(end, time.max, _CST)),
    )


# --- registry -----------------------------------------------------------------------


class ConsentRegistry:
    """Consents by id, indexed by patient identifier for constant-cost lookups.

    ``put`` registers, amends (same id) or revokes (status ``inactive``) a consent; the
    change takes effect for the next question, so a revocation stops messages that are
    still waiting for dispatch once they are asked again.
    """

    def __init__(self, identity: IdentityIndex | None = None) -> None:
        self._by_id: dict[str, ConsentRecord] = {}
        self._by_patient: dict[tuple[str, str], set[str]] = {}
        self._by_pseudonym: dict[str, set[str]] = {}
        self._identity: IdentityIndex | None = None
        self.identity = identity

    @property
    def identity(self) -> IdentityIndex | None:
        """With an identity index, consents are found by any identifier linked to the
        one they name (one patient across identifiers)."""
        return self._identity

    @identity.setter
    def identity(self, index: IdentityIndex | None) -> None:
        # The index keeps, per person, the pseudonyms consents are registered under and
        # the ID card numbers they name: an index put in place (a copy for a dry run,
        # then the original back; one given to a registry that had none) learns them
        # from every consent registered.
        self._identity = index
        self._by_pseudonym = {}
        if index is not None:
            for record in self._by_id.values():
                self._index_pseudonym(index, record)

    def _index_pseudonym(self, index: IdentityIndex, record: ConsentRecord) -> None:
        pseudonym = index.pseudonym(*record.patient)
        self._by_pseudonym.setdefault(pseudonym, set()).add(record.id)
        index.mark(pseudonym)
        if record.patient[0] == ID_CARD_SYSTEM:
            # A consent names its patient's resident ID card number: known as one
            # here, so no record can join another holder to this person (stores
            # linked before ID card numbers were noted apart included).
            index.note_id_cards((pseudonym,))

    def put(
        self, resource: dict[str, Any], *, now: datetime, trusted: bool = False
    ) -> ConsentRecord:
        """Register or replace the consent with this resource's id; return the parsed record.

        ``trusted=True`` skips FHIR model validation for consents read back from the
        bridge's own store (see :func:`parse_consent`).
        """
        parsed = parse_consent(resource, trusted=trusted)
        record = ConsentRecord(
            id=parsed.id,
            status=parsed.status,
            version=parsed.version,
            last_updated=parsed.last_updated,
            patient=parsed.patient,
            provision=parsed.provision,
            resource=parsed.resource,
            registered_at=now,
            submitted_by=parsed.submitted_by,
        )
        old = self._by_id.get(record.id)
        if old is not None and old.patient != record.patient:
            ids = self._by_patient.get(old.patient)
            if ids is not None:
                ids.discard(old.id)
                if not ids:
                    del self._by_patient[old.patient]
            if self.identity is not None:
                self._by_pseudonym.get(self.identity.pseudonym(*old.patient), set()).discard(old.id)
        self._by_id[record.id] = record
        self._by_patient.setdefault(record.patient, set()).add(record.id)
        if self.identity is not None:
            self._index_pseudonym(self.identity, record)
        return record

    def put_many(
        self, resources: Iterable[dict[str, Any]], *, now: datetime, trusted: bool = False
    ) -> int:
        """Register many consents (e.g. the store's at start-up); return how many.

        With ``trusted=True`` (consents this bridge validated when they arrived) loading
        100,000 consents takes a few seconds instead of most of a minute. The first
        invalid consent raises, naming its path; the ones before it stay registered.
        """
        count = 0
        # Parsing allocates many small objects that live as long as the registry; the
        # cyclic collector would rescan the growing registry again and again, so it
        # waits until the load is done (nothing here creates reference cycles).
        enabled = gc.isenabled()
        gc.disable()
        try:
            for resource in resources:
                self.put(resource, now=now, trusted=trusted)
                count += 1
        finally:
            if enabled:
                gc.enable()
        return count

    def get(self, consent_id: str) -> ConsentRecord | None:
        """The consent registered under this id, or None."""
        return self._by_id.get(consent_id)

    def list(self) -> list[ConsentRecord]:
        """All registered consents (any status), in registration order."""
        return list(self._by_id.values())

    def patient_keys(self, consent_id: str) -> frozenset[str]:
        """``system|value`` keys of the patient a consent concerns (empty if unknown):
        the messages to re-examine when that consent is amended or revoked."""
        record = self._by_id.get(consent_id)
        return frozenset({record.patient_key}) if record is not None else frozenset()

    def for_patient(
        self, patient_identifiers: Sequence[tuple[str, str]]
    ) -> builtins.list[ConsentRecord]:
        """Consents whose patient matches any of these identifiers (index lookup), or,
        with an identity index, any identifier linked to them. ConsentDenied when those
        hold two resident ID card numbers (two people)."""
        seen: dict[str, ConsentRecord] = {}
        for ident in patient_identifiers:
            for cid in sorted(self._by_patient.get((ident[0], ident[1]), ())):
                seen.setdefault(cid, self._by_id[cid])
        if self.identity is not None and self._by_pseudonym:
            pairs = [(i[0], i[1]) for i in patient_identifiers]
            pseudonyms = self.identity.of_identifiers(pairs)
            if self.identity.two_id_cards(pseudonyms, id_card_pseudonyms(pairs, pseudonyms)):
                # Another person's consent must never cover this data: identifiers that
                # name holders of two resident ID card numbers are nobody's.
                raise ConsentDenied(
                    "the patient's identifiers name two people (two resident ID card"
                    " numbers): correct them at the source", location="Patient.identifier")
            # The linked pseudonyms a consent is registered under (see put).
            for p in sorted(self.identity.marked(pseudonyms)):
                for cid in sorted(self._by_pseudonym.get(p, ())):
                    seen.setdefault(cid, self._by_id[cid])
        return list(seen.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def evaluate(
        self, patient_identifiers: Sequence[tuple[str, str]], req: Request, item: Item
    ) -> Verdict:
        """The verdict for one item of this patient's data (see :func:`decide`)."""
        return decide(self.for_patient(patient_identifiers), req, item)

    def require_consent(
        self,
        *,
        patient_identifiers: Sequence[tuple[str, str]],
        recipient: str,
        purpose: str,
        resource_types: set[str] | frozenset[str],
        data_period: tuple[date, date] | None,
        now: datetime,
        action: str = "disclose",
        emergency: EmergencyOverride | None = None,
        records: Sequence[ConsentRecord] | None = None,
        question: ConsentQuestion | None = None,
        hold_uncovered: bool = False,
    ) -> ConsentDecision:
        """Return the decision that permits disclosing these resource types, or raise.

        Raises :class:`~bridge.errors.ConsentDenied` when a type is not permitted: no
        consent registered, none active, outside the period, recipient not named,
        purpose or action not allowed, a resource type not covered, or a matching deny
        provision (in any of the patient's consents). Each type is asked with its data
        category (``class`` may name either).

        ``emergency`` permits without consent — only for purpose ETREAT with an actor
        and a reason (else ConsentDenied); the decision carries the override.

        ``records``: the patient's consents as :meth:`for_patient` gives them, when the
        caller already asked for them at this moment (they are looked up otherwise).
        ``question``: a :class:`ConsentQuestion` over those records and this request,
        when the caller goes on to ask about the disclosure's items with it (the answers
        it works out for the types serve the items too).
        ``hold_uncovered``: once the Patient is permitted, a type that no permitting
        provision's ``class`` names does not refuse the disclosure (the caller holds its
        resources back); the decision's ``resource_types`` are then the others.
        """
        if records is None:
            records = self.for_patient(patient_identifiers)
        req = request(recipient, purpose, now, data_period, action)
        types = frozenset(resource_types)
        if emergency is not None:
            check_override(emergency, purpose)
            # An override stands in for a missing permit, never against a refusal the
            # patient recorded: deny provisions hold (GB/T 39725 §7 b 2).
            scheme = default_classification()
            for rtype in sorted(types):
                category = scheme.of(rtype).category
                item = _type_item(rtype, category)
                verdict = override_deny(records, req, item)
                if verdict is not None:
                    raise ConsentDenied(verdict.message, location=verdict.provision_path,
                                        consent_id=verdict.consent_id)
            denied_labels: set[Label] = set()
            for record in records:
                if record.status == "active":
                    for rtype in types:
                        denied_labels |= _label_denies(record.provision, req, _bare_item(rtype))
            return ConsentDecision(
                consent_id="",
                version=None,
                last_updated=None,
                provision_path="",
                recipient=recipient,
                purpose=purpose,
                resource_types=types,
                allowed_labels=frozenset({(CONFIDENTIALITY_SYSTEM, "V")}),
                denied_labels=frozenset(denied_labels),
                decided_at=req.now,
                override=emergency,
            )
        if question is None or question.records is not records or question.req != req:
            question = ConsentQuestion(records, req)
        scheme = default_classification()
        verdicts: list[tuple[str, Verdict]] = []
        for rtype in sorted(types):
            category = scheme.of(rtype).category
            verdicts.append((rtype, question.verdict(_type_item(rtype, category))))
        if hold_uncovered and any(t == "Patient" and v.permitted for t, v in verdicts):
            # A consent permits the Patient for this recipient, purpose, time and data
            # period: those conditions hold for every type alike, so a type none permits
            # is one no permitting provision's class names. It is held back, not refused.
            verdicts = [(t, v) for t, v in verdicts if v.outcome != "none"]
            types = frozenset(t for t, _ in verdicts)
        for wanted in ("deny", "none", "uncovered"):
            for _, v in verdicts:
                if v.outcome == wanted:
                    raise ConsentDenied(v.message, location=v.provision_path, consent_id=v.consent_id)
        by_id = {r.id: r for r in records}
        chosen = max(
            (by_id[v.consent_id] for _, v in verdicts if v.consent_id),
            key=lambda r: (r.last_updated or "", r.id),
            default=None,
        )
        if chosen is None:
            raise ConsentDenied("no consent is registered for this patient", location="Consent")
        root = chosen.provision.path
        deciding = next(
            (v.provision_path for _, v in verdicts
             if v.consent_id == chosen.id and v.provision_path != root),
            root,
        )
        denied: set[Label] = set()
        for record in records:
            # Deny rules are nested provisions: a consent without any has none to apply.
            if record.status == "active" and record.provision.children:
                for rtype in types:
                    denied |= _label_denies(record.provision, req, _bare_item(rtype))
        allowed = frozenset().union(*(v.cover for _, v in verdicts))
        return ConsentDecision(
            consent_id=chosen.id,
            version=chosen.version,
            last_updated=chosen.last_updated,
            provision_path=deciding,
            recipient=recipient,
            purpose=purpose,
            resource_types=types,
            allowed_labels=frozenset(allowed - denied),
            denied_labels=frozenset(denied),
            decided_at=req.now,
            consent_ids=tuple(sorted({str(v.consent_id) for _, v in verdicts})),
            by_type=tuple((t, str(v.consent_id), v.provision_path) for t, v in verdicts),
        )


# --- construction -------------------------------------------------------------------


def build_consent(
    *,
    consent_id: str,
    patient_system: str,
    patient_value: str,
    recipient: str,
    purposes: Sequence[str],
    start: date | datetime | str,
    end: date | datetime | str,
    resource_types: Iterable[str] | None = None,
    sensitive_classes: Iterable[str] = (),
    hospital_partner_id: str,
    status: str = "active",
    restrictions: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Build a valid R4 Consent permitting disclosure to ``recipient`` for ``purposes``.

    ``resource_types`` limits the permit to those types (provision.class);
    ``sensitive_classes`` (codes of ``urn:ws-fhir-bridge:sensitivity``) are the
    special-disease classes the patient explicitly agrees to disclose;
    ``restrictions`` are nested deny provisions (see :func:`deny_provision`).
    """

    def _iso(value: date | datetime | str) -> str:
        return value if isinstance(value, str) else value.isoformat()

    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"start": _iso(start), "end": _iso(end)},
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": RECIPIENT_ROLE}]},
                "reference": {"identifier": {"system": PARTNER_SYSTEM, "value": recipient}},
            }
        ],
        "purpose": [{"system": PURPOSE_SYSTEM, "code": p} for p in purposes],
    }
    if resource_types is not None:
        provision["class"] = [
            {"system": RESOURCE_TYPES_SYSTEM, "code": t} for t in sorted(resource_types)
        ]
    labels = [
        {"system": "urn:ws-fhir-bridge:sensitivity", "code": c} for c in sensitive_classes
    ]
    if labels:
        provision["securityLabel"] = labels
    if restrictions:
        provision["provision"] = [dict(r) for r in restrictions]
    return {
        "resourceType": "Consent",
        "id": consent_id,
        "status": status,
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": ACT_CODE_SYSTEM, "code": "IDSCL"}]}],
        "patient": {"identifier": {"system": patient_system, "value": patient_value}},
        "organization": [
            {"identifier": {"system": PARTNER_SYSTEM, "value": hospital_partner_id}}
        ],
        "policyRule": {
            "coding": [{"system": ACT_CODE_SYSTEM, "code": "OPTIN"}],
            "text": "GB/T 39725-2020 §7 a",
        },
        "provision": provision,
    }


def deny_provision(
    *,
    recipients: Iterable[str] = (),
    purposes: Iterable[str] = (),
    resource_types: Iterable[str] = (),
    categories: Iterable[str] = (),
    labels: Iterable[Label] = (),
    period: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A deny provision: a patient-requested restriction (§7 h) to nest in a consent.

    Every argument narrows what it denies: ``recipients`` (partner ids), ``purposes``
    (PurposeOfUse codes), ``resource_types`` and §6.1 ``categories`` (provision.class),
    ``labels`` (security labels such as a special-disease class; only data carrying one
    is denied) and ``period`` (ISO start and end of when the restriction holds).
    """
    out: dict[str, Any] = {"type": "deny"}
    actors = [
        {
            "role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": RECIPIENT_ROLE}]},
            "reference": {"identifier": {"system": PARTNER_SYSTEM, "value": r}},
        }
        for r in recipients
    ]
    if actors:
        out["actor"] = actors
    purpose = [{"system": PURPOSE_SYSTEM, "code": p} for p in purposes]
    if purpose:
        out["purpose"] = purpose
    classes = [{"system": RESOURCE_TYPES_SYSTEM, "code": t} for t in resource_types]
    classes += [{"system": CATEGORY_SYSTEM, "code": c} for c in categories]
    if classes:
        out["class"] = classes
    security = [{"system": s, "code": c} for s, c in labels]
    if security:
        out["securityLabel"] = security
    if period is not None:
        out["period"] = {"start": period[0], "end": period[1]}
    return out
