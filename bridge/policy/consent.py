"""Consent registry: FHIR R4 Consent resources, and the one question they answer.

``ConsentRegistry.require_consent`` asks: may this controller disclose these resource
types of this patient's data to that recipient, for that purpose, now? It returns a
:class:`ConsentDecision` or raises :class:`~bridge.errors.ConsentDenied`. No consent
means no (GB/T 39725-2020 §7 a: use and disclosure must not exceed the subject's
authorisation, which names the recipient, the purpose and the duration).

Evaluation follows the R4 Consent provision model:

* The root ``Consent.provision`` is the base rule. A root ``type`` of ``permit`` (or no
  type) permits what its conditions cover; ``deny`` denies everything by default and
  nested permits carve out exceptions.
* Nested ``provision.provision`` entries are exceptions to their parent. A nested rule
  applies when all of its conditions match the request (an absent condition matches
  anything); the deepest applying rule decides for a resource type, and among siblings
  that apply, deny wins.
* Conditions: ``actor`` (the recipient, role IRCP), ``purpose``, ``period`` (when the
  rule is in force), ``dataPeriod`` (which period of care the data may come from),
  ``class`` (resource types) and ``securityLabel`` (sensitivity labels the rule covers).
  A permit rule's labels become the decision's ``allowed_labels``; a deny rule's labels
  become ``denied_labels``, so the caller holds back resources carrying them instead of
  refusing the whole disclosure.

Lookups go through an index from patient identifier (system|value) to consent ids, so
the cost of a decision depends on how many consents that patient has, not on how many
are registered.

Errors name FHIR paths (``Consent.provision.period``) and never a value.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from bridge.errors import ConsentDenied, MappingError
from bridge.records.fhir import validate_resource

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
CONSENT_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentcategorycodes"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"

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

RECIPIENT_ROLE = "IRCP"

# China Standard Time: a consent date without a time is a calendar day in China.
_CST = timezone(timedelta(hours=8))
_DATETIME_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(T.+)?)?)?$")


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Provision:
    """One parsed provision (the root or a nested one) with its FHIR path."""

    path: str
    type: str  # "permit" or "deny"
    period: tuple[datetime | None, datetime | None] | None
    data_period: tuple[datetime | None, datetime | None] | None
    recipients: frozenset[str]
    purposes: frozenset[str]
    classes: frozenset[str]
    security_labels: frozenset[tuple[str, str]]
    children: tuple[Provision, ...] = ()


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


@dataclass(frozen=True)
class ConsentDecision:
    """Why a disclosure is permitted: which consent, which version, which rule decided.

    ``allowed_labels`` are the security labels (system, code) the permitting rules
    explicitly cover; ``denied_labels`` those a matching deny rule excludes. Resources
    carrying a label outside ``allowed_labels`` that needs explicit cover (the
    special-disease classes) are held back by the caller.
    """

    consent_id: str
    version: str | None
    last_updated: str | None
    provision_path: str
    recipient: str
    purpose: str
    resource_types: frozenset[str]
    allowed_labels: frozenset[tuple[str, str]]
    denied_labels: frozenset[tuple[str, str]]
    decided_at: datetime


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
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise _bad("a dateTime with a time needs a zone", path)
            return parsed.astimezone(timezone.utc)
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
    if end:
        return datetime.combine(last, time.max, _CST).astimezone(timezone.utc)
    return datetime.combine(start, time.min, _CST).astimezone(timezone.utc)


def _parse_period(
    raw: Any, path: str
) -> tuple[datetime | None, datetime | None] | None:
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


def _parse_provision(
    raw: dict[str, Any], path: str, *, root: bool, scoped: bool = False
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

    recipients: set[str] = set()
    for i, actor in enumerate(raw.get("actor") or []):
        apath = f"{path}.actor[{i}]"
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
    for i, coding in enumerate(raw.get("purpose") or []):
        ppath = f"{path}.purpose[{i}]"
        if coding.get("system") != PURPOSE_SYSTEM or coding.get("code") not in SUPPORTED_PURPOSES:
            raise _bad("purpose is not a supported v3 PurposeOfUse code", ppath)
        purposes.add(str(coding["code"]))
    if ptype == "permit" and not scoped and not purposes:
        # §7 a: an authorisation states the purpose; a permit without one permits nothing.
        raise _bad("a permit provision needs a purpose", f"{path}.purpose")

    classes: set[str] = set()
    for i, coding in enumerate(raw.get("class") or []):
        if coding.get("system") != RESOURCE_TYPES_SYSTEM or not coding.get("code"):
            raise _bad("class must be a FHIR resource type", f"{path}.class[{i}]")
        classes.add(str(coding["code"]))

    labels: set[tuple[str, str]] = set()
    for i, coding in enumerate(raw.get("securityLabel") or []):
        if not coding.get("system") or not coding.get("code"):
            raise _bad("security label needs system and code", f"{path}.securityLabel[{i}]")
        labels.add((str(coding["system"]), str(coding["code"])))

    children = tuple(
        _parse_provision(
            child, f"{path}.provision[{i}]", root=False, scoped=scoped or ptype == "permit"
        )
        for i, child in enumerate(raw.get("provision") or [])
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
    )


def parse_consent(resource: dict[str, Any]) -> ConsentRecord:
    """Validate a FHIR R4 Consent and parse its rules.

    Raises :class:`~bridge.errors.MappingError` (422) naming the FHIR path of the first
    problem: not valid FHIR, scope other than patient-privacy, no category, a patient
    that is not a logical reference by identifier, a period ending before it starts,
    an unsupported purpose, or a permit without a recipient (IRCP) actor.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise _bad("not a Consent resource", "Consent.resourceType")
    validate_resource(resource)
    if not resource.get("id"):
        raise _bad("a registered consent needs an id", "Consent.id")
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
    return ConsentRecord(
        id=str(resource["id"]),
        status=str(resource["status"]),
        version=meta.get("versionId"),
        last_updated=meta.get("lastUpdated"),
        patient=(str(ident["system"]), str(ident["value"])),
        provision=provision,
        resource=copy.deepcopy(resource),
    )


# --- evaluation ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    recipient: str
    purpose: str
    data_period: tuple[datetime, datetime] | None
    now: datetime


def _within(now: datetime, period: tuple[datetime | None, datetime | None] | None) -> bool:
    if period is None:
        return True
    start, end = period
    return (start is None or start <= now) and (end is None or now <= end)


def _data_period_ok(prov: Provision, req: _Request) -> bool:
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


def _applies(prov: Provision, req: _Request, rtype: str) -> bool:
    """Do the request-wide and class conditions of one rule match (labels aside)?"""
    return (
        _within(req.now, prov.period)
        and (not prov.recipients or req.recipient in prov.recipients)
        and (not prov.purposes or req.purpose in prov.purposes)
        and (not prov.classes or rtype in prov.classes)
        and _data_period_ok(prov, req)
    )


@dataclass
class _Outcome:
    permitted: bool
    path: str
    allowed: set[tuple[str, str]]
    denied: set[tuple[str, str]]


def _decide(prov: Provision, req: _Request, rtype: str, inherited: _Outcome) -> _Outcome:
    """Walk a rule's children: the deepest applying rule decides, deny wins among siblings."""
    outcome = inherited
    deny_outcome: _Outcome | None = None
    permit_outcome: _Outcome | None = None
    for child in prov.children:
        if not _applies(child, req, rtype):
            continue
        if child.type == "deny" and child.security_labels:
            # A deny limited to labels holds back the labelled resources only.
            outcome.denied |= child.security_labels
            continue
        base = _Outcome(
            permitted=child.type == "permit",
            path=child.path,
            allowed=set(outcome.allowed) | (set(child.security_labels) if child.type == "permit" else set()),
            denied=set(outcome.denied),
        )
        result = _decide(child, req, rtype, base)
        if not result.permitted and deny_outcome is None:
            deny_outcome = result
        elif result.permitted and permit_outcome is None:
            permit_outcome = result
        if result.permitted:
            outcome.allowed |= result.allowed
        outcome.denied |= result.denied
    if deny_outcome is not None:
        return deny_outcome
    if permit_outcome is not None:
        permit_outcome.allowed |= outcome.allowed
        permit_outcome.denied |= outcome.denied
        return permit_outcome
    return outcome


class _Denied(Exception):
    def __init__(self, message: str, path: str, explicit: bool) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.explicit = explicit


def _evaluate(
    record: ConsentRecord, req: _Request, resource_types: frozenset[str]
) -> ConsentDecision:
    root = record.provision
    if record.status != "active":
        raise _Denied("consent is not active", "Consent.status", explicit=False)
    if not _within(req.now, root.period):
        raise _Denied("consent is outside its period", f"{root.path}.period", explicit=False)
    if req.recipient not in root.recipients and root.type == "permit":
        raise _Denied("consent does not name the recipient", f"{root.path}.actor", False)
    if root.purposes and req.purpose not in root.purposes:
        raise _Denied("purpose is not permitted by the consent", f"{root.path}.purpose", False)
    if root.type == "permit" and not _data_period_ok(root, req):
        raise _Denied("data period is outside the consent", f"{root.path}.dataPeriod", False)

    allowed: set[tuple[str, str]] = set()
    denied: set[tuple[str, str]] = set()
    deciding = root.path
    for rtype in sorted(resource_types):
        root_applies = _applies(root, req, rtype)
        base = _Outcome(
            permitted=root.type == "permit" and root_applies,
            path=root.path,
            allowed=set(root.security_labels) if root.type == "permit" and root_applies else set(),
            denied=set(),
        )
        # Exceptions nest inside the base rule: for a permit root they only apply
        # within its scope; a deny root denies by default and its children may permit.
        outcome = _decide(root, req, rtype, base) if (root_applies or root.type == "deny") else base
        if not outcome.permitted:
            if outcome.path != root.path:
                raise _Denied("a deny provision matches", outcome.path, explicit=True)
            if root.type == "permit" and not _applies(root, req, rtype):
                raise _Denied("resource type is not covered by the consent", f"{root.path}.class", False)
            raise _Denied("no provision permits this disclosure", root.path, explicit=False)
        allowed |= outcome.allowed
        denied |= outcome.denied
        if outcome.path != root.path and deciding == root.path:
            deciding = outcome.path
    return ConsentDecision(
        consent_id=record.id,
        version=record.version,
        last_updated=record.last_updated,
        provision_path=deciding,
        recipient=req.recipient,
        purpose=req.purpose,
        resource_types=resource_types,
        allowed_labels=frozenset(allowed - denied),
        denied_labels=frozenset(denied),
        decided_at=req.now,
    )


# --- registry -----------------------------------------------------------------------


class ConsentRegistry:
    """Consents by id, indexed by patient identifier for constant-cost lookups.

    ``put`` registers, amends (same id) or revokes (status ``inactive``) a consent; the
    change takes effect for the next ``require_consent`` call, so a revocation stops
    messages that are still waiting for dispatch.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, ConsentRecord] = {}
        self._by_patient: dict[tuple[str, str], set[str]] = {}

    def put(self, resource: dict[str, Any], *, now: datetime) -> ConsentRecord:
        """Register or replace the consent with this resource's id; return the parsed record."""
        parsed = parse_consent(resource)
        record = ConsentRecord(
            id=parsed.id,
            status=parsed.status,
            version=parsed.version,
            last_updated=parsed.last_updated,
            patient=parsed.patient,
            provision=parsed.provision,
            resource=parsed.resource,
            registered_at=now,
        )
        old = self._by_id.get(record.id)
        if old is not None and old.patient != record.patient:
            ids = self._by_patient.get(old.patient)
            if ids is not None:
                ids.discard(old.id)
                if not ids:
                    del self._by_patient[old.patient]
        self._by_id[record.id] = record
        self._by_patient.setdefault(record.patient, set()).add(record.id)
        return record

    def get(self, consent_id: str) -> ConsentRecord | None:
        """The consent registered under this id, or None."""
        return self._by_id.get(consent_id)

    def list(self) -> list[ConsentRecord]:
        """All registered consents (any status), in registration order."""
        return list(self._by_id.values())

    def for_patient(self, patient_identifiers: Sequence[tuple[str, str]]) -> list[ConsentRecord]:
        """Consents whose patient matches any of these identifiers (index lookup)."""
        seen: dict[str, ConsentRecord] = {}
        for ident in patient_identifiers:
            for cid in sorted(self._by_patient.get((ident[0], ident[1]), ())):
                seen.setdefault(cid, self._by_id[cid])
        return list(seen.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def require_consent(
        self,
        *,
        patient_identifiers: Sequence[tuple[str, str]],
        recipient: str,
        purpose: str,
        resource_types: set[str] | frozenset[str],
        data_period: tuple[date, date] | None,
        now: datetime,
    ) -> ConsentDecision:
        """Return the decision of a consent that permits this disclosure, or raise.

        Raises :class:`~bridge.errors.ConsentDenied` when no consent of this patient
        permits it: none registered, none active, outside the period, recipient not
        named, purpose not allowed, a resource type not covered, or a matching deny
        provision. A matching deny in any active consent wins over permits in others.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        req = _Request(
            recipient=recipient,
            purpose=purpose,
            data_period=_data_instants(data_period),
            now=now.astimezone(timezone.utc),
        )
        types = frozenset(resource_types)
        candidates = self.for_patient(patient_identifiers)
        if not candidates:
            raise ConsentDenied("no consent is registered for this patient", location="Consent")
        permits: list[ConsentDecision] = []
        refusals: list[tuple[ConsentRecord, _Denied]] = []
        for record in candidates:
            try:
                permits.append(_evaluate(record, req, types))
            except _Denied as denial:
                refusals.append((record, denial))
        explicit = [(r, d) for r, d in refusals if d.explicit]
        if explicit:
            record, denial = explicit[0]
            raise ConsentDenied(denial.message, location=denial.path, consent_id=record.id)
        if permits:
            # Prefer the most recently updated permitting consent as the one recorded.
            return max(permits, key=lambda d: (d.last_updated or "", d.consent_id))
        record, denial = refusals[0]
        raise ConsentDenied(denial.message, location=denial.path, consent_id=record.id)


def _data_instants(
    data_period: tuple[date, date] | None,
) -> tuple[datetime, datetime] | None:
    if data_period is None:
        return None
    start, end = data_period
    return (
        datetime.combine(start, time.min, _CST).astimezone(timezone.utc),
        datetime.combine(end, time.max, _CST).astimezone(timezone.utc),
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
) -> dict[str, Any]:
    """Build a valid R4 Consent permitting disclosure to ``recipient`` for ``purposes``.

    ``resource_types`` limits the permit to those types (provision.class);
    ``sensitive_classes`` (codes of ``urn:ws-fhir-bridge:sensitivity``) are the
    special-disease classes the patient explicitly agrees to disclose.
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
