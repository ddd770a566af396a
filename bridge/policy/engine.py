"""The policy room's entry points: what of this collection may go to that recipient, and why.

``apply_policy`` runs minimize → classify → authorize → hold back:

1. minimize: keep only what the link profile allows (§7 j, table 9 for insurers) and
   apply its de-identification transforms (§10.2, Appendix G);
2. classify: label each resource with the grade, §6.1 categories, confidentiality and
   special-disease classes of what it still contains (``meta.security``), so the labels
   describe exactly what is sent;
3. authorize: ``require_consent`` for the patient, recipient, purpose and every
   resource type still to be sent — no permitting consent, no disclosure;
4. hold back: every resource, and every entry of a repeating element judged on its own
   (``Claim.diagnosis[2]``), is asked again with its labels. What a deny provision
   matches (a patient's restriction, §7 h) or what is grade 5 without a consent naming
   its class (§6.2 e) is removed with every reference to it; so is grade-5 data on a
   link whose grades exclude 5. Holding back the Patient refuses the whole disclosure.

The result carries a :class:`Decision` for the audit log (ids, provision paths,
removed, held-back and transformed paths — never values). :func:`explain` answers the
same question element by element, and :func:`recheck` / :func:`recheck_collection`
ask it again before dispatch, because a consent may be revoked while a message waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from functools import lru_cache
from typing import Any, Literal

import orjson

from bridge.errors import ConsentDenied
from bridge.policy.classify import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    GRADE_SYSTEM,
    SENSITIVITY_SYSTEM,
    ItemLabel,
    ResourceLabel,
    SensitiveCodes,
    confidentiality,
    copy_json,
    default_sensitive_codes,
    label_bundle,
)
from bridge.policy.consent import (
    ConsentDecision,
    ConsentQuestion,
    ConsentRegistry,
    EmergencyOverride,
    Item,
    Label,
    Verdict,
    build_consent,
    decide,
    override_deny,
    request,
)
from bridge.policy.profile import (
    LinkProfile,
    RefCache,
    code_values,
    drop_unreferenced,
    omit_in_place,
)
from bridge.policy.transforms import DeidContext, person_key, pseudonymise_ids

__all__ = [
    "Decision",
    "ElementOutcome",
    "Explanation",
    "HeldBack",
    "PolicyResult",
    "apply_policy",
    "build_consent",
    "data_period",
    "explain",
    "patient_identifiers",
    "recheck",
    "recheck_collection",
]


#: Elements of an Encounter that name the department or ward of the stay.
DEPARTMENT_ELEMENTS = ("location", "serviceType")


@dataclass(frozen=True)
class HeldBack:
    """One thing consent (or the link's grades) kept back, and what decided it.

    ``reason``: ``deny`` (a deny provision matched), ``uncovered`` (grade 5 without a
    consent naming the class), ``grade`` (the link does not carry grade 5), ``special``
    (the department of a stay whose special-disease data this link does not carry).
    """

    path: str
    reason: str
    consent_id: str | None
    provision_path: str | None
    index: int | None = None  # the entry of a repeating element (Claim.diagnosis[1])

    @property
    def element(self) -> str:
        """The path with the entry's index, as the audit records it."""
        return self.path if self.index is None else f"{self.path}[{self.index}]"


@dataclass(frozen=True)
class Decision:
    """The audit record of one policy decision: identifiers and paths only, no values."""

    outcome: Literal["permit", "override"]
    recipient: str
    purpose: str
    action: str
    profile: str
    decided_at: datetime
    consent_ids: tuple[str, ...]
    consent_versions: tuple[tuple[str, str | None], ...]
    provisions: tuple[tuple[str, str], ...]  # (consent id, provision path) that permitted
    categories: tuple[str, ...]  # §6.1 categories sent
    removed: tuple[str, ...]
    held_back: tuple[HeldBack, ...]
    transformed: tuple[str, ...]
    override: EmergencyOverride | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the audit log."""
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "recipient": self.recipient,
            "purpose": self.purpose,
            "action": self.action,
            "profile": self.profile,
            "decided_at": self.decided_at.isoformat(),
            "consents": [{"id": cid, "version": v} for cid, v in self.consent_versions],
            "provisions": [{"consent": c, "path": p} for c, p in self.provisions],
            "categories": list(self.categories),
            "removed": list(self.removed),
            "held_back": [
                {"path": h.element, "reason": h.reason, "consent": h.consent_id,
                 "provision": h.provision_path}
                for h in self.held_back
            ],
            "transformed": list(self.transformed),
        }
        if self.override is not None:
            out["override"] = {"actor": self.override.actor, "reason": self.override.reason}
        return out


@dataclass(frozen=True)
class PolicyResult:
    """What may be sent, why, and what was kept back.

    ``removed`` lists paths the link profile removed (and what went with them);
    ``held_back`` lists resources and elements consent did not permit. Both hold FHIR
    paths only, never values. ``patient_identifiers``, ``resource_types`` and
    ``data_period`` are the consent question, kept so the dispatcher can ask it again;
    ``items`` are the labelled pieces that were asked about one by one.
    """

    bundle: dict[str, Any]
    decision: ConsentDecision
    removed: list[str]
    held_back: list[str]
    patient_identifiers: tuple[tuple[str, str], ...]
    resource_types: frozenset[str]
    data_period: tuple[date, date] | None
    transformed: list[str] = field(default_factory=list)
    record: Decision | None = None
    items: tuple[Item, ...] = ()
    action: str = "disclose"


def patient_identifiers(collection: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(system, value) of every identifier of the collection's one Patient."""
    return _identifiers_of([
        e["resource"]
        for e in collection.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Patient"
    ])


def _identifiers_of(patients: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """:func:`patient_identifiers` of a collection whose Patients are ``patients``."""
    if len(patients) != 1:
        raise ConsentDenied(
            "a disclosure must concern exactly one patient", location="Bundle.entry.resource"
        )
    found = tuple(
        (str(i["system"]), str(i["value"]))
        for i in patients[0].get("identifier") or []
        if isinstance(i, dict) and i.get("system") and i.get("value")
    )
    if not found:
        raise ConsentDenied(
            "the patient has no identifier to match a consent", location="Patient.identifier"
        )
    return found


def _day(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    return _date_of(value[:10])


# The same days recur (a stay's start and end on its Encounter and its Claim).
@lru_cache(maxsize=4096)
def _date_of(text: str) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _add_days(resource: dict[str, Any], days: list[date]) -> None:
    """The days of an Encounter's or a Claim's period (Encounter.period,
    Claim.billablePeriod), added to ``days``."""
    for element in ("period", "billablePeriod"):
        period = resource.get(element)
        if isinstance(period, dict):
            days.extend(d for d in (_day(period.get("start")), _day(period.get("end"))) if d)


def data_period(collection: dict[str, Any]) -> tuple[date, date] | None:
    """The span of care the collection describes (Encounter.period, Claim.billablePeriod)."""
    days: list[date] = []
    for entry in collection.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") in ("Encounter", "Claim"):
            _add_days(resource, days)
    return (min(days), max(days)) if days else None


def _question_facts(
    collection: dict[str, Any],
) -> tuple[tuple[tuple[str, str], ...], tuple[date, date] | None]:
    """``(patient_identifiers(collection), data_period(collection))``, raising as the
    first does, in one pass over the entries (every disclosure's consent question asks
    both)."""
    patients: list[dict[str, Any]] = []
    days: list[date] = []
    for entry in collection.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            patients.append(resource)
        elif rtype == "Encounter" or rtype == "Claim":
            _add_days(resource, days)
    return _identifiers_of(patients), ((min(days), max(days)) if days else None)


# Few combinations occur (a category, a class or two, a grade), and every claim asks.
@lru_cache(maxsize=4096)
def _labels(categories: frozenset[str], sensitive: frozenset[str], grade: int) -> frozenset[Label]:
    out: set[Label] = {(CATEGORY_SYSTEM, c) for c in categories}
    out |= {(SENSITIVITY_SYSTEM, c) for c in sensitive}
    out.add((CONFIDENTIALITY_SYSTEM, confidentiality(grade)))
    out.add((GRADE_SYSTEM, str(grade)))
    return frozenset(out)


@lru_cache(maxsize=256)
def _categories(category: str) -> frozenset[str]:
    return frozenset({category}) - {""}


# Items are values: the few combinations that occur are made once and shared.
@lru_cache(maxsize=4096)
def _item(
    resource_type: str, categories: frozenset[str], sensitive: frozenset[str], grade: int
) -> Item:
    return Item(resource_type, categories, _labels(categories, sensitive, grade))


def _own_item(label: ResourceLabel) -> Item:
    """The item of a labelled resource as a whole."""
    return _item(label.resource_type, label.own_categories, label.own_sensitive, label.own_grade)


def _entry_item(resource_type: str, it: ItemLabel) -> Item:
    """The item of one judged entry of a resource (an element's entry)."""
    return _item(resource_type, _categories(it.category), it.sensitive_classes, it.grade)


def _items_of(label: ResourceLabel) -> tuple[Item, list[tuple[str, int, Item]]]:
    """The resource's own item and one item per judged entry (element, index, item)."""
    rtype = label.resource_type
    return _own_item(label), [(it.element, it.index, _entry_item(rtype, it)) for it in label.items]


def _path(resource_type: str, element: str | None) -> str:
    return resource_type if element is None else f"{resource_type}.{element}"


@dataclass
class _Trace:
    """Per input entry (by resource id): what happened to it, for :func:`explain`."""

    entry_fate: dict[str, HeldBack] = field(default_factory=dict)
    item_fate: dict[tuple[str, str, int], HeldBack] = field(default_factory=dict)
    element_fate: dict[tuple[str, str], HeldBack] = field(default_factory=dict)
    sent_ids: set[str] = field(default_factory=set)
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    held_paths: list[str] = field(default_factory=list)


def _run(
    collection: dict[str, Any],
    *,
    registry: ConsentRegistry,
    profile: LinkProfile,
    recipient: str,
    purpose: str,
    now: datetime,
    codes: SensitiveCodes | None,
    key: bytes | None,
    emergency: EmergencyOverride | None,
    action: str,
    trace: _Trace | None,
    owned: bool = False,
    complete: bool = False,
) -> PolicyResult:
    codes = codes or default_sensitive_codes()
    identifiers, period = _question_facts(collection)
    # Ids are pseudonymised while minimizing, except for an explanation, which reads the
    # trace by the input's ids.
    departments = _may_send_department(profile)
    # A collection the caller gives up is worked on in place (see apply_policy); reading
    # codes keeps the copy, so the input is as it was when read again below.
    minimized = profile.minimize(collection, key=key, pseudonymise=trace is None,
                                 read_codes=departments, owned=owned, complete=complete)
    # Special-disease classes of the whole input, needed only when a department could
    # leave with the stay (see below); on a link whose profile does not allow one,
    # minimizing left none. Minimizing read the input's codes: most stays name none
    # that could be special, and then there is nothing to walk.
    special_in: frozenset[str] = frozenset()
    if departments and _has_department(minimized.bundle):
        texts = minimized.code_texts
        if texts is None or codes.may_name_a_class_in(texts):
            special_in = _special_classes(
                [e.get("resource") for e in collection.get("entry") or ()
                 if isinstance(e, dict)], codes)
    bundle = minimized.bundle
    removed = list(minimized.removed)
    labels = label_bundle(bundle, codes=codes, types=profile.classes)
    types = frozenset(label.resource_type for label in labels)
    records = registry.for_patient(identifiers)
    # One question for the types and the labelled items: an answer worked out for one
    # serves every other the rules cannot tell apart from it.
    req = request(recipient, purpose, now, period, action)
    question = ConsentQuestion(records, req)
    decision = registry.require_consent(
        patient_identifiers=list(identifiers),
        recipient=recipient,
        purpose=purpose,
        resource_types=set(types),
        data_period=period,
        now=now,
        action=action,
        emergency=emergency,
        records=records,
        question=question,
        hold_uncovered=profile.uncovered_types == "hold",
    )

    memo: dict[Item, Verdict] = {}

    def overridden(item: Item) -> Verdict:
        found = memo.get(item)
        if found is None:
            # The override permits what no consent does, except what one denies.
            found = memo[item] = override_deny(records, req, item) or Verdict(
                "permit", None, "", "emergency override", decision.allowed_labels)
        return found

    verdict = question.verdict if decision.override is None else overridden

    held: list[HeldBack] = []
    drop_entries: set[int] = set()
    drop_items: dict[int, list[tuple[str, int]]] = {}
    permits: dict[tuple[str, str], None] = {}
    entries = bundle["entry"]

    special: list[HeldBack] = []

    permitted: list[Item] = []  # the items asked about and permitted, in order

    given: dict[Item, Verdict] = {}  # the verdicts of this disclosure's items

    def judge(item: Item, rtype: str, element: str | None,
              sensitive: frozenset[str]) -> HeldBack | None:
        # The path (Claim.diagnosis) is written only for what is held back.
        if sensitive and not profile.carries_sensitive:
            fate = HeldBack(_path(rtype, element), "grade", None, None)
            special.append(fate)
            return fate
        # Most items recur in a disclosure (a stay's Conditions, its diagnoses): each
        # is asked once.
        v = given.get(item)
        if v is None:
            v = given[item] = verdict(item)
        if v.permitted:
            permitted.append(item)
            if v.consent_id:
                permits[(v.consent_id, v.provision_path)] = None
            return None
        fate = HeldBack(_path(rtype, element), v.outcome, v.consent_id, v.provision_path)
        if sensitive:
            special.append(fate)
        return fate

    for label in labels:
        # The items of _items_of, made one by one: most resources are sent whole, and
        # what is held back whole has no entries to ask about.
        rtype = label.resource_type
        rid = str(entries[label.index]["resource"].get("id")) if trace is not None else ""
        fate = judge(_own_item(label), rtype, None, label.own_sensitive)
        if fate is not None:
            if rtype == "Patient":
                raise ConsentDenied(
                    "the patient's own record is held back", location=fate.provision_path or "Patient",
                    consent_id=fate.consent_id,
                )
            held.append(fate)
            drop_entries.add(label.index)
            if trace is not None:
                trace.entry_fate[rid] = fate
            continue
        for it in label.items:
            # An item's special-disease classes are its sensitivity labels (item.sensitive).
            fate = judge(_entry_item(rtype, it), rtype, it.element, it.sensitive_classes)
            if fate is not None:
                fate = replace(fate, index=it.index)
                held.append(fate)
                drop_items.setdefault(label.index, []).append((it.element, it.index))
                if trace is not None:
                    trace.item_fate[(rid, it.element, it.index)] = fate

    # What the link cannot send without, as it stands before anything is held back (the
    # judging above changes nothing). When nothing is, nothing can have gone missing.
    changes = bool(drop_entries or drop_items or special_in)
    entries_before = _present(bundle, profile.refuse_without) if changes else {}
    principal_before = (_principal_claims(bundle) if changes
                        and "Claim.diagnosis" in profile.refuse_without else set())
    if special_in and not special_in <= _special_classes(
            [None if i in drop_entries else e["resource"] for i, e in enumerate(entries)],
            codes, skip=drop_items):
        # The ward or department of a stay whose special-disease data does not travel
        # (held back by consent, or not carried by this link) tells the disease (感染科,
        # 精神科): it is special-disease data at the summary level (§11.1.2.3 b 1) and is
        # held back with it, by the same provision.
        first = special[0] if special else HeldBack("", "special", None, None)
        for i, entry in enumerate(entries):
            resource = entry["resource"]
            if i in drop_entries or resource.get("resourceType") != "Encounter":
                continue
            for element in DEPARTMENT_ELEMENTS:
                if element in resource:
                    del resource[element]
                    fate = HeldBack(f"Encounter.{element}", first.reason, first.consent_id,
                                    first.provision_path)
                    held.append(fate)
                    drop_items.setdefault(i, [])
                    if trace is not None:
                        trace.element_fate[(str(resource.get("id")), element)] = fate

    held_paths: list[str] = []
    for index, dropped in drop_items.items():
        resource = entries[index]["resource"]
        for element in {e for e, _ in dropped}:
            gone = {i for e, i in dropped if e == element}
            kept = [v for i, v in enumerate(resource.get(element) or []) if i not in gone]
            if kept:
                resource[element] = kept
            else:
                del resource[element]
    grade_paths = [h.path for h in held if h.reason == "grade"]
    if drop_entries or drop_items:
        refs: RefCache = {}
        cascade = omit_in_place(bundle, drop_entries, refs)
        # A resource only what was held back referred to (the surgeon of a held-back
        # operation) goes with it.
        cascade.extend(drop_unreferenced(bundle, profile.focus, refs))
        held_paths = [h.path for h in held if h.reason != "grade"]
        # What went with a held-back resource (its references) was held back too.
        extra = [p for p in cascade if p not in grade_paths]
        held_paths.extend(extra)
        labels = label_bundle(bundle, codes=codes, types=profile.classes)
        close_sequence_gaps(bundle)
    removed.extend(grade_paths)
    removed = list(dict.fromkeys(removed))

    _refuse_without(profile, entries_before, bundle, held)
    _refuse_without_principal(principal_before, bundle, held)
    if trace is not None:
        trace.sent_ids = {str(e["resource"].get("id")) for e in bundle["entry"]}
        trace.sent = {str(e["resource"].get("id")): copy_json(e["resource"])
                      for e in bundle["entry"]}
        trace.removed = list(removed)
        trace.held_paths = list(dict.fromkeys(held_paths))
    if profile.ids == "pseudonym" and trace is not None:
        assert key is not None
        pseudonymise_ids(bundle, DeidContext(key, _first_key(identifiers)))

    # Nothing held back: the entries are those labelled above, whose types are ``types``.
    final_types = (types if not (drop_entries or drop_items) else
                   frozenset(str(e["resource"].get("resourceType")) for e in bundle["entry"]))
    # The category codes the labels wrote into meta.security (the labels are those of
    # the bundle as it leaves: it is labelled again after anything is held back).
    categories = sorted(frozenset().union(*(label.categories for label in labels)))
    for t, cid, path in decision.by_type:
        permits.setdefault((cid, path), None)
    by_id = {r.id: r for r in records}
    consent_ids = tuple(sorted({cid for cid, _ in permits if cid}))
    record = Decision(
        outcome="override" if decision.override is not None else "permit",
        recipient=recipient,
        purpose=purpose,
        action=action,
        profile=profile.qualified_name,
        decided_at=decision.decided_at,
        consent_ids=consent_ids,
        consent_versions=tuple(
            (cid, by_id[cid].version if cid in by_id else None) for cid in consent_ids
        ),
        provisions=tuple(sorted((c, p) for c, p in permits if c)),
        categories=tuple(categories),
        removed=tuple(removed),
        held_back=tuple(held),
        transformed=tuple(minimized.transformed),
        override=decision.override,
    )
    return PolicyResult(
        bundle=bundle,
        decision=decision,
        removed=removed,
        held_back=list(dict.fromkeys(held_paths)),
        patient_identifiers=identifiers,
        resource_types=final_types,
        data_period=period,
        transformed=list(minimized.transformed),
        record=record,
        items=tuple(dict.fromkeys(permitted)),
        action=action,
    )


def _may_send_department(profile: LinkProfile) -> bool:
    """Can an Encounter leave this link with its ward or department?"""
    rules = profile.rules("Encounter", True)
    return rules is not None and any(d in rules for d in DEPARTMENT_ELEMENTS)


def _has_department(bundle: dict[str, Any]) -> bool:
    return any(
        e["resource"].get("resourceType") == "Encounter"
        and any(e["resource"].get(d) for d in DEPARTMENT_ELEMENTS)
        for e in bundle.get("entry") or ()
    )


def _present(bundle: dict[str, Any], paths: Sequence[str]) -> dict[str, set[str]]:
    """For each ``Type.element`` path, the ids of the resources that have the element."""
    out: dict[str, set[str]] = {}
    for full in paths:
        rtype, _, element = full.partition(".")
        out[full] = {
            str(e["resource"].get("id")) for e in bundle.get("entry") or ()
            if e["resource"].get("resourceType") == rtype and e["resource"].get(element)
        }
    return out


def _refuse_without(
    profile: LinkProfile, before: dict[str, set[str]], bundle: dict[str, Any],
    held: list[HeldBack],
) -> None:
    """Refuse the disclosure when consent held back every entry of an element the
    profile cannot send without (every diagnosis of a claim): what remains would be
    unusable to the recipient, and its emptiness would tell that something was
    withheld (conformance/PROTOCOL.md, "Withheld diagnoses")."""
    if not before:
        return  # nothing was held back (see _run): nothing can have gone missing
    after = _present(bundle, profile.refuse_without)
    for full, ids in before.items():
        emptied = ids - after[full]
        if not emptied:
            continue
        rtype = full.partition(".")[0]
        sent = {str(e["resource"].get("id")) for e in bundle["entry"]
                if e["resource"].get("resourceType") == rtype}
        if not emptied & sent:
            continue  # the resource itself did not go: nothing half-empty is sent
        fate = next((h for h in held if h.path == full), None) or next(
            (h for h in held if h.reason != "grade"), None)
        raise ConsentDenied(
            f"consent holds back every entry of {full}; the link does not send it without",
            location=(fate.provision_path if fate and fate.provision_path else full),
            consent_id=fate.consent_id if fate else None,
        )


_PRINCIPAL = "principal"


def _is_principal(diagnosis: Any) -> bool:
    return isinstance(diagnosis, dict) and any(
        isinstance(coding, dict) and coding.get("code") == _PRINCIPAL
        for kind in diagnosis.get("type") or () if isinstance(kind, dict)
        for coding in kind.get("coding") or ()
    )


def _principal_claims(bundle: dict[str, Any]) -> set[str]:
    """Ids of the Claims that state a principal diagnosis."""
    return {
        str(e["resource"].get("id")) for e in bundle.get("entry") or ()
        if e["resource"].get("resourceType") == "Claim"
        and any(_is_principal(d) for d in e["resource"].get("diagnosis") or ())
    }


def _refuse_without_principal(
    before: set[str], bundle: dict[str, Any], held: list[HeldBack],
) -> None:
    """Refuse a claim whose principal diagnosis consent held back while others remain.

    An insurer settles a stay on its principal diagnosis (主要诊断); a claim that
    arrives without one, or with a secondary diagnosis promoted in its place, either
    cannot be settled or states what is not so, and its absence tells that the
    principal diagnosis was withheld (conformance/PROTOCOL.md P-MSG-10).
    """
    if not before:
        return
    lost = before - _principal_claims(bundle)
    sent = {str(e["resource"].get("id")) for e in bundle["entry"]
            if e["resource"].get("resourceType") == "Claim"}
    if not lost & sent:
        return
    fate = next((h for h in held if h.path == "Claim.diagnosis"), None) or next(
        (h for h in held if h.reason != "grade"), None)
    raise ConsentDenied(
        "consent holds back the principal diagnosis of the claim; the link does not send"
        " a claim without it",
        location=(fate.provision_path if fate and fate.provision_path else "Claim.diagnosis"),
        consent_id=fate.consent_id if fate else None,
    )


def close_sequence_gaps(bundle: dict[str, Any]) -> None:
    """Number each Claim's remaining diagnoses and procedures 1..n again.

    After consent held some of them back, the numbers left (1, 3, 4) would show that
    something between them was withheld. The order is kept, and an item's
    ``diagnosisSequence`` / ``procedureSequence`` follow their entries (a number whose
    entry went is dropped from the item).
    """
    for entry in bundle.get("entry") or ():
        claim = entry["resource"]
        if claim.get("resourceType") != "Claim":
            continue
        for element, pointer in (("diagnosis", "diagnosisSequence"),
                                 ("procedure", "procedureSequence")):
            members = claim.get(element)
            if not members:
                continue
            renumber: dict[Any, int] = {}
            for n, member in enumerate(members, start=1):
                if isinstance(member, dict):
                    renumber[member.get("sequence")] = n
                    member["sequence"] = n
            for item in claim.get("item") or ():
                if isinstance(item, dict) and pointer in item:
                    kept = [renumber[v] for v in item[pointer] if v in renumber]
                    if kept:
                        item[pointer] = kept
                    else:
                        del item[pointer]


def _special_classes(
    resources: Sequence[Any],
    codes: SensitiveCodes,
    skip: dict[int, list[tuple[str, int]]] | None = None,
) -> frozenset[str]:
    """Special-disease classes named by any coding anywhere in ``resources`` (with
    ``skip``: leaving out the entries about to be held back, by resource index)."""
    found: set[str] = set()
    classes_of = codes.classes_of
    if not skip:
        # Most stays name no special disease: one pass over each resource's JSON finds
        # every code value, and a resource with none that could be special has nothing
        # to walk (most of a stay that does name one: its Patient, Coverage, ...).
        try:
            texts = [orjson.dumps(resource) for resource in resources]
        except (TypeError, orjson.JSONEncodeError):
            texts = None
        if texts is not None:
            resources = [
                resource for resource, text in zip(resources, texts, strict=True)
                if codes.may_name_a_class_in(code_values(text))
            ]
            if not resources:
                return frozenset()

    def walk(node: Any) -> None:
        if type(node) is dict:
            system, code = node.get("system"), node.get("code")
            if type(system) is str and type(code) is str:
                hit = classes_of(system, code)
                if hit:
                    found.update(hit)
            for value in node.values():
                if type(value) is dict or type(value) is list:
                    walk(value)
        else:
            for value in node:
                if type(value) is dict or type(value) is list:
                    walk(value)

    for index, resource in enumerate(resources):
        if not isinstance(resource, dict):
            continue
        gone = (skip or {}).get(index)
        if not gone:
            walk(resource)
            continue
        for key, value in resource.items():
            if isinstance(value, list):
                walk([v for n, v in enumerate(value) if (key, n) not in gone])
            elif isinstance(value, dict):
                walk(value)
    return frozenset(found)


def _first_key(identifiers: Sequence[tuple[str, str]]) -> str:
    return person_key(identifiers)


def apply_policy(
    collection: dict[str, Any],
    *,
    registry: ConsentRegistry,
    profile: LinkProfile,
    recipient: str,
    purpose: str,
    now: datetime,
    codes: SensitiveCodes | None = None,
    key: bytes | None = None,
    emergency: EmergencyOverride | None = None,
    action: str = "disclose",
    owned: bool = False,
    complete: bool = False,
) -> PolicyResult:
    """Return the bundle that may be disclosed, or raise ConsentDenied.

    ``key`` is the controller's de-identification key, needed by profiles with keyed
    transforms (ConfigError without it). ``emergency`` is an explicit, audited
    override for purpose ETREAT (see :class:`~bridge.policy.consent.EmergencyOverride`);
    it never applies by default. See the module docstring.

    The input is not changed, unless ``owned``: the caller gives the collection up (it
    reads nothing of it afterwards), and no object in it appears twice or belongs to
    anything else (:func:`~bridge.mapping.map_record` makes each collection so). The
    policy then works on it in place instead of on a copy of what it sends, and the
    result shares its values. What is disclosed is the same either way.

    ``complete``: the caller vouches that every resource of the collection passed FHIR
    validation (:func:`~bridge.records.fhir.validate_resource`, as
    :func:`~bridge.mapping.map_record` validates what it makes), so each holds its
    required elements, none empty; a resource the profile leaves as it was then needs no
    walk to find it complete (see :meth:`LinkProfile.minimize`). What is disclosed is the
    same either way.
    """
    return _run(
        collection, registry=registry, profile=profile, recipient=recipient, purpose=purpose,
        now=now, codes=codes, key=key, emergency=emergency, action=action, trace=None,
        owned=owned, complete=complete,
    )


def recheck(
    result: PolicyResult, *, registry: ConsentRegistry, now: datetime
) -> ConsentDecision:
    """Ask the consent question of ``result`` again (at dispatch); raise ConsentDenied if
    the consent was revoked, expired or narrowed since — for any resource type or any
    labelled piece of what is being sent. A message under an emergency override needs
    no permit (the override was the decision) but is stopped by a deny provision."""
    decision = registry.require_consent(
        patient_identifiers=list(result.patient_identifiers),
        recipient=result.decision.recipient,
        purpose=result.decision.purpose,
        resource_types=set(result.resource_types),
        data_period=result.data_period,
        now=now,
        action=result.action,
        emergency=result.decision.override,
    )
    req = request(result.decision.recipient, result.decision.purpose, decision.decided_at,
                  result.data_period, result.action)
    records = registry.for_patient(result.patient_identifiers)
    for item in result.items:
        # Under an override only a deny recorded since stops the message.
        denied = override_deny(records, req, item) if decision.override is not None else None
        v = denied or decide(records, req, item)
        if denied is not None or (decision.override is None and not v.permitted):
            raise ConsentDenied(
                "consent no longer covers data in this message",
                location=v.provision_path, consent_id=v.consent_id,
            )
    return decision


def recheck_collection(
    collection: dict[str, Any],
    *,
    registry: ConsentRegistry,
    profile: LinkProfile,
    recipient: str,
    purpose: str,
    now: datetime,
    patient: Sequence[tuple[str, str]] | None = None,
    codes: SensitiveCodes | None = None,
    action: str = "disclose",
) -> ConsentDecision:
    """Ask the consent question again from a payload (e.g. a stored, signed message).

    Classifies the payload as ``profile`` sends it and asks for every resource type and
    every labelled resource and entry; raises ConsentDenied when any is no longer
    permitted. ``patient`` gives the patient's identifiers when the payload does not
    carry them (links that pseudonymise identifiers).
    """
    codes = codes or default_sensitive_codes()
    identifiers = tuple(patient) if patient is not None else patient_identifiers(collection)
    period = data_period(collection)
    work = copy_json(collection)
    labels = label_bundle(work, codes=codes, types=profile.classes)
    decision = registry.require_consent(
        patient_identifiers=list(identifiers),
        recipient=recipient,
        purpose=purpose,
        resource_types={label.resource_type for label in labels},
        data_period=period,
        now=now,
        action=action,
    )
    req = request(recipient, purpose, decision.decided_at, period, action)
    records = registry.for_patient(identifiers)
    for label in labels:
        own, entry_items = _items_of(label)
        for item in [own, *(i for _, _, i in entry_items)]:
            if item.sensitive and not profile.carries_sensitive:
                raise ConsentDenied("the link does not carry grade 5", location=label.resource_type)
            v = decide(records, req, item)
            if not v.permitted:
                raise ConsentDenied(
                    "consent no longer covers data in this message",
                    location=v.provision_path, consent_id=v.consent_id,
                )
    return decision


# --- explanation ----------------------------------------------------------------------

ElementFate = Literal["sent", "removed-by-profile", "held-back-by-consent", "transformed"]


@dataclass(frozen=True)
class ElementOutcome:
    """What happened to one element path of the input (``Patient[0].address.line``)."""

    path: str
    outcome: ElementFate
    consent_id: str | None = None
    provision_path: str | None = None
    detail: str | None = None
    resource_id: str | None = None  # the input resource's id


@dataclass(frozen=True)
class Explanation:
    """The answer of :func:`explain`: the decision (or the refusal) and, per element
    path of the input, whether it is sent, removed by the profile, held back by consent
    or transformed — with the consent and provision that decided."""

    permitted: bool
    decision: Decision | None
    refusal: ConsentDenied | None
    elements: tuple[ElementOutcome, ...]

    def lines(self) -> list[str]:
        """Plain-text rows for a terminal (paths and ids only)."""
        out: list[str] = []
        if self.refusal is not None:
            out.append(
                f"REFUSED: {self.refusal.message} (at {self.refusal.location}; consent "
                f"{self.refusal.detail.get('consent_id') or '-'})"
            )
        elif self.decision is not None and self.decision.override is not None:
            out.append(f"EMERGENCY OVERRIDE by {self.decision.override.actor}")
        for e in self.elements:
            why = " ".join(
                x for x in (
                    f"consent={e.consent_id}" if e.consent_id else "",
                    f"provision={e.provision_path}" if e.provision_path else "",
                    e.detail or "",
                ) if x
            )
            out.append(f"{e.path:<48} {e.outcome:<22} {why}".rstrip())
        return out


def _granular_paths(resource: dict[str, Any], profile: LinkProfile, rtype: str) -> list[str]:
    """Element paths of ``resource`` at the granularity of the profile's allow tree."""
    tree = profile.allowed.get(rtype) or {}
    out: list[str] = []

    def walk(obj: dict[str, Any], node: dict[str, Any] | None, prefix: str) -> None:
        for key, value in obj.items():
            if not prefix and key in ("resourceType", "id", "meta"):
                continue
            base = key.removeprefix("_")
            sub = node.get(base) if node is not None else None
            path = f"{prefix}{base}"
            if sub and isinstance(value, (dict, list)):
                values = value if isinstance(value, list) else [value]
                for v in values:
                    if isinstance(v, dict):
                        walk(v, sub, f"{path}.")
            elif path not in out:
                out.append(path)

    walk(resource, tree, "")
    return list(dict.fromkeys(out))


def _allowed(profile: LinkProfile, rtype: str, path: str) -> bool:
    node: Any = profile.allowed.get(rtype)
    for seg in path.split("."):
        if node is None:
            return True
        if seg not in node:
            return False
        node = node[seg]
    return True


def _has(resource: dict[str, Any], path: str) -> bool:
    """Does ``resource`` hold a value at this dotted element path?"""
    nodes: list[Any] = [resource]
    for seg in path.split("."):
        nxt: list[Any] = []
        for node in nodes:
            for key in (seg, f"_{seg}"):
                value = node.get(key) if isinstance(node, dict) else None
                if isinstance(value, list):
                    nxt.extend(v for v in value if v not in (None, {}, []))
                elif value not in (None, {}, [], ""):
                    nxt.append(value)
        nodes = nxt
    return bool(nodes)


def explain(
    collection: dict[str, Any],
    *,
    registry: ConsentRegistry,
    profile: LinkProfile,
    recipient: str,
    purpose: str,
    now: datetime,
    key: bytes | None = None,
    emergency: EmergencyOverride | None = None,
    codes: SensitiveCodes | None = None,
) -> Explanation:
    """Explain, element path by element path, what :func:`apply_policy` does.

    The explanation is read off the bundle :func:`apply_policy`'s own run produced
    (before ids are pseudonymised): an element is ``sent`` or ``transformed`` exactly
    when it is in what would be sent, so the two cannot disagree. Never raises
    ConsentDenied: a refusal is part of the explanation.
    """
    trace = _Trace()
    refusal: ConsentDenied | None = None
    result: PolicyResult | None = None
    try:
        result = _run(
            collection, registry=registry, profile=profile, recipient=recipient,
            purpose=purpose, now=now, codes=codes, key=key, emergency=emergency,
            action="disclose", trace=trace,
        )
    except ConsentDenied as exc:
        refusal = exc
    rows: list[ElementOutcome] = []
    counters: dict[str, int] = {}
    for entry in collection.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = str(resource.get("resourceType"))
        n = counters.get(rtype, 0)
        counters[rtype] = n + 1
        head = f"{rtype}[{n}]"
        rid = str(resource.get("id"))
        if refusal is not None:
            rows.append(ElementOutcome(
                head, "held-back-by-consent", refusal.detail.get("consent_id"),
                refusal.location, "disclosure refused", resource_id=rid,
            ))
            continue
        if not profile.allows_type(rtype):
            rows.append(ElementOutcome(head, "removed-by-profile", detail="type not in profile",
                                       resource_id=rid))
            continue
        fate = trace.entry_fate.get(rid)
        if fate is not None:
            rows.append(ElementOutcome(head, _outcome(fate), fate.consent_id,
                                       fate.provision_path, fate.reason, resource_id=rid))
            continue
        sent = trace.sent.get(rid)
        if sent is None:
            held = rtype in trace.held_paths
            rows.append(ElementOutcome(
                head, "held-back-by-consent" if held else "removed-by-profile",
                detail="refers only to what was held back, or nothing sent refers to it"
                if held else "incomplete after minimizing, or nothing sent refers to it",
                resource_id=rid,
            ))
            continue
        for path in _granular_paths(resource, profile, rtype):
            full = f"{rtype}.{path}"
            at = f"{head}.{path}"
            items = sorted(
                (i, f) for (r, e, i), f in trace.item_fate.items() if r == rid and e == path
            )
            for i, f in items:
                rows.append(ElementOutcome(f"{at}[{i}]", _outcome(f), f.consent_id,
                                           f.provision_path, f.reason, resource_id=rid))
            for removed in trace.removed:
                if removed.startswith(f"{full}["):
                    rows.append(ElementOutcome(
                        f"{at}{removed[len(full):]}", "removed-by-profile",
                        detail="entry outside the profile's selection", resource_id=rid))
            if _has(sent, path):
                outcome: ElementFate = "transformed" if full in profile.transforms else "sent"
                rows.append(ElementOutcome(at, outcome, detail=profile.transforms.get(full),
                                           resource_id=rid))
                continue
            element_fate = trace.element_fate.get((rid, path))
            if element_fate is not None:
                rows.append(ElementOutcome(at, _outcome(element_fate), element_fate.consent_id,
                                           element_fate.provision_path, element_fate.reason,
                                           resource_id=rid))
            elif items:
                continue  # every entry was held back: listed above, nothing is sent
            elif not _allowed(profile, rtype, path):
                rows.append(ElementOutcome(at, "removed-by-profile", resource_id=rid))
            elif full in trace.held_paths:
                rows.append(ElementOutcome(
                    at, "held-back-by-consent",
                    detail="referred to what was held back", resource_id=rid))
            else:
                rows.append(ElementOutcome(
                    at, "removed-by-profile",
                    detail="referred to what the profile removed, or empty after minimizing",
                    resource_id=rid))
    return Explanation(
        permitted=refusal is None,
        decision=result.record if result is not None else None,
        refusal=refusal,
        elements=tuple(rows),
    )


def _outcome(fate: HeldBack) -> ElementFate:
    return "removed-by-profile" if fate.reason in ("grade", "special") else "held-back-by-consent"
