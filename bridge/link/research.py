"""A research release over a configured link: policy per record, k-anonymity over
persons across the batch, then signing and queueing what is released.

The link's profile de-identifies (``research-limited-data-set``: pseudonyms, year of
birth, county address, per-person date shift) with the key the configuration names
(``deid_key_file`` / ``deid_key_env``); :func:`bridge.policy.research.anonymise` then
generalises and suppresses until every released person shares the quasi-identifiers with
at least k - 1 others. :func:`release` with ``send=False`` is the dry run behind
``bridge research report``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bridge.errors import ConfigError, MappingError, PolicyError
from bridge.mapping import patient_identifiers
from bridge.policy.research import (
    ReleaseItem,
    ReleaseReport,
    age_at,
    anonymise,
    bundle_of,
)
from bridge.policy.transforms import PSEUDONYM_SYSTEM

if TYPE_CHECKING:
    from bridge.link.node import Controller


def _first(collection: dict[str, Any], rtype: str) -> dict[str, Any]:
    for entry in collection.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == rtype:
            return resource
    return {}


async def release(
    controller: Controller, records: Sequence[dict[str, Any]], link_id: str, *, send: bool
) -> ReleaseReport:
    """Release a batch of records on a research link (or, with ``send=False``, only say
    what would be released). Records are numbered from 0 in the report."""
    link = controller.outbound_link(link_id)
    profile = controller.profiles[link.id]
    if profile.k_anonymity is None:
        raise ConfigError("this link's profile has no k_anonymity rule: not a research release",
                          location=f"links.{link.id}.profile")
    await controller.sync_consents()
    if not send:
        # A report changes nothing, yet judges each record as the release would: the
        # records' identifiers are linked in a copy of the identity index, never stored.
        real = controller.identity
        controller.identity = controller.consents.identity = copy.deepcopy(real)
        try:
            return await _release(controller, records, link, profile, send=False)
        finally:
            controller.identity = controller.consents.identity = real
    return await _release(controller, records, link, profile, send=True)


async def _release(controller: Controller, records: Sequence[dict[str, Any]],
                   link: Any, profile: Any, *, send: bool) -> ReleaseReport:
    assert profile.k_anonymity is not None
    report = ReleaseReport(k=profile.k_anonymity.k, quasi=profile.k_anonymity.quasi)
    items: list[ReleaseItem] = []
    results: dict[int, Any] = {}
    for index, record in enumerate(records):
        try:
            if send:
                mapped = await controller.link_record(record)
            else:  # linked in the report's copy of the index only (see release)
                mapped, group = controller._mapped_and_unlinked(record)
                if group is not None:
                    controller._linked(group)
        except MappingError as exc:  # identifiers that would join two people
            report.refused.append((index, f"{exc.code} at {exc.location or '-'}"))
            continue
        if mapped is None:
            report.refused.append((index, "the record does not map"))
            continue
        ids = list(patient_identifiers(mapped))
        patient = _first(mapped, "Patient")
        encounter = _first(mapped, "Encounter")
        age = age_at(patient.get("birthDate"), (encounter.get("period") or {}).get("start"))
        try:
            result = controller.policy(record, link.id, mapped=mapped)
        except (PolicyError, MappingError) as exc:
            report.refused.append((index, f"{exc.code} at {exc.location or '-'}"))
            continue
        # The research pseudonyms name the same person: linked (as keyed pseudonyms) so
        # the consent is found again when the message is checked at dispatch.
        released_ids = [
            (str(i["system"]), str(i["value"]))
            for i in _first(result.bundle, "Patient").get("identifier") or ()
            if i.get("system") == PSEUDONYM_SYSTEM
        ]
        if send:
            try:
                await controller.link_patient(ids + released_ids)
            except MappingError as exc:
                report.refused.append((index, f"{exc.code} at {exc.location or '-'}"))
                continue
        person = controller.pseudonym(ids) or f"record:{index}"
        # The batch holds each bundle as text until it is sent (see ReleaseItem), and the
        # result without it.
        items.append(ReleaseItem.as_text(index, result.bundle, person, age))
        results[index] = replace(result, bundle={})
    released, report = anonymise(items, k=report.k, quasi=report.quasi, report=report)
    if send:
        for item in released:
            result = replace(results[item.index], bundle=bundle_of(item))
            signed, submitted = controller.prepare(records[item.index], link.id, result=result)
            done = await controller.enqueue_signed(link, signed, submitted)
            if done.created:
                report.queued.append(done.message_id)
            else:
                report.already_queued.append(item.index)
    await controller.db.append_audit(controller.audit(
        "research.release" if send else "research.report",
        subject=f"link:{link.id}",
        partner=link.partner,
        detail=(f"k={report.k} achieved={report.k_achieved} level={report.level}"
                f" records_in={report.records_in} released={report.records_released}"
                f" suppressed={len(report.suppressed)} refused={len(report.refused)}"
                + (f" queued={len(report.queued)} already_queued={len(report.already_queued)}"
                   if send else "")),
    ))
    return report
