"""Rules a consent must meet on a link, beyond what it says (GB/T 39725 §7 c, Appendix F).

**Expiry** (Appendix F: an authorisation states its expiry). A consent whose root
period has no end is, depending on the link (``links.consent_without_end``):

- ``refuse``: not counted on that link at all (and refused when it is registered, if
  a link to one of its recipients refuses such consents);
- ``cap``: counted as ending ``consent_cap_days`` after its period's start, or after
  its ``dateTime`` when the period states no start; a consent with neither is not
  counted.

**Marketing** (§7 c, Appendix F: the authorisation for marketing stands on its own,
never bundled with other purposes or made a condition of a service). A consent that
names marketing (``HMARKT``) together with any other purpose is refused when it is
registered and never counted.

:class:`LinkConsentView` applies both to the registry as one link sees it; the policy
engine asks it exactly as it asks the registry.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from bridge.errors import MappingError
from bridge.policy.consent import (
    ConsentRecord,
    ConsentRegistry,
    Provision,
    _parse_instant,
)

MARKETING = "HMARKT"


def purposes_of(provision: Provision) -> set[str]:
    """Every purpose named anywhere in a provision tree."""
    found = set(provision.purposes)
    for child in provision.children:
        found |= purposes_of(child)
    return found


def bundled_marketing(record: ConsentRecord) -> bool:
    """True when the consent names marketing together with another purpose."""
    purposes = purposes_of(record.provision)
    return MARKETING in purposes and len(purposes) > 1


def open_ended(record: ConsentRecord) -> bool:
    """True when the consent's root period has no end."""
    period = record.provision.period
    return period is None or period[1] is None


def check_registration(record: ConsentRecord, *, refusing_links: Iterable[str] = ()) -> None:
    """Refuse a consent that bundles marketing, or that has no end while a link to one
    of its recipients refuses such consents (``refusing_links``: those links' ids)."""
    if bundled_marketing(record):
        raise MappingError(
            "marketing (HMARKT) needs a consent of its own, not bundled with other purposes",
            location="Consent.provision.purpose",
        )
    refusing = sorted(refusing_links)
    if refusing and open_ended(record):
        raise MappingError(
            f"the consent's period needs an end (link {refusing[0]} refuses consents"
            " without an expiry)",
            location="Consent.provision.period.end",
        )


def unbounded_permit(provision: Provision, allowed: frozenset[str] | set[str],
                     inherited: frozenset[str] | None = None) -> str | None:
    """The FHIR path of the first permit provision that can permit a purpose outside
    ``allowed`` (it names none and neither does any provision above it, or it names
    one outside), or None when every permit is bounded to ``allowed``.

    A nested provision applies only where every provision above it matches, so the
    purposes a provision can permit are those named on its path, intersected."""
    effective = inherited
    if provision.purposes:
        effective = (provision.purposes if effective is None
                     else effective & provision.purposes)
    if provision.type == "permit" and (effective is None or not effective <= allowed):
        return f"{provision.path}.purpose"
    for child in provision.children:
        found = unbounded_permit(child, allowed, effective)
        if found is not None:
            return found
    return None


def counts_as_partner_consent(record: ConsentRecord, *, partner: str | None,
                              purposes: Iterable[str]) -> bool:
    """Whether a consent a partner submitted counts on a link (GB/T 39725 §11.7.4.1 b 2).

    A partner's own word is not consent for disclosures to itself unless the link says
    that partner collects consents for those purposes (``partner_consent_purposes``):
    a partner-submitted consent counts only on a link to the partner that submitted
    it, and only when every permit in it is bounded to the link's purposes. Consents
    of this controller's own systems always count."""
    if record.submitted_by is None:
        return True
    if record.submitted_by != partner:
        return False
    return unbounded_permit(record.provision, frozenset(purposes)) is None


def recipients_of(provision: Provision) -> set[str]:
    found = set(provision.recipients)
    for child in provision.children:
        found |= recipients_of(child)
    return found


def _start(record: ConsentRecord) -> datetime | None:
    period = record.provision.period
    if period is not None and period[0] is not None:
        return period[0]
    given = record.resource.get("dateTime")
    if given is None:
        return None
    try:
        return _parse_instant(given, "Consent.dateTime", end=False)
    except MappingError:
        return None


def as_seen_by_link(
    record: ConsentRecord, *, without_end: Literal["refuse", "cap"], cap_days: int
) -> ConsentRecord | None:
    """The consent as a link counts it, or None when the link does not count it."""
    if bundled_marketing(record):
        return None
    if not open_ended(record):
        return record
    if without_end == "refuse":
        return None
    start = _start(record)
    if start is None:
        return None
    capped = dataclasses.replace(record.provision,
                                 period=(start, start + timedelta(days=cap_days)))
    return dataclasses.replace(record, provision=capped)


class LinkConsentView(ConsentRegistry):
    """The consent registry as one link sees it (see the module docstring).

    It shares the registry's contents: a consent put or revoked in the registry is seen
    here at once. Only the answers change; nothing is written through a view.
    """

    def __init__(self, base: ConsentRegistry, *, without_end: Literal["refuse", "cap"],
                 cap_days: int, partner: str | None = None,
                 partner_purposes: Iterable[str] = ()) -> None:
        # Share the base registry's indexes instead of copying them.
        self._base = base
        self._by_id = base._by_id
        self._by_patient = base._by_patient
        self._without_end: Literal["refuse", "cap"] = without_end
        self._cap_days = cap_days
        self._partner = partner
        self._partner_purposes = frozenset(partner_purposes)
        self._seen: dict[str, tuple[ConsentRecord, ConsentRecord | None]] = {}

    def _view(self, record: ConsentRecord) -> ConsentRecord | None:
        cached = self._seen.get(record.id)
        if cached is not None and cached[0] is record:
            return cached[1]
        viewed = (
            as_seen_by_link(record, without_end=self._without_end, cap_days=self._cap_days)
            if counts_as_partner_consent(record, partner=self._partner,
                                         purposes=self._partner_purposes)
            else None
        )
        self._seen[record.id] = (record, viewed)
        return viewed

    def put(self, resource: dict[str, Any], *, now: datetime,
            trusted: bool = False) -> ConsentRecord:
        raise TypeError("a link's view of the consent registry is read-only")

    def get(self, consent_id: str) -> ConsentRecord | None:
        record = self._base.get(consent_id)
        return self._view(record) if record is not None else None

    def list(self) -> builtins.list[ConsentRecord]:
        return [v for r in self._base.list() if (v := self._view(r)) is not None]

    def for_patient(
        self, patient_identifiers: Sequence[tuple[str, str]]
    ) -> builtins.list[ConsentRecord]:
        return [v for r in self._base.for_patient(patient_identifiers)
                if (v := self._view(r)) is not None]


__all__ = [
    "MARKETING",
    "LinkConsentView",
    "as_seen_by_link",
    "bundled_marketing",
    "check_registration",
    "counts_as_partner_consent",
    "open_ended",
    "purposes_of",
    "recipients_of",
    "unbounded_permit",
]
