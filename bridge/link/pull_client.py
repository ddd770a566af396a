"""Record pull, the asking side: a platform's bridge pulls one patient's records.

``bridge pull --link L --patient SYSTEM|VALUE`` runs :func:`pull_patient` on a link
with ``direction = "pull-from"``: it finds the patient with ``Patient?identifier=``,
then fetches ``Patient/{id}/$everything`` page by page, following ``next`` links only
to the partner's own base URL. Every page must carry the partner's signature,
addressed to this controller, over the page as received (PROTOCOL §5 and §11); a page
that fails stops the pull, is audited and nothing of it is kept. Each verified page is
kept as evidence with an audit entry whose subject is the page's identity — the
same identity the hospital's audit records — and its resources are written to
``--out`` when given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson

from bridge.compliance.agreements import check_agreement
from bridge.config import LinkConfig
from bridge.errors import (
    BridgeError,
    ConfigError,
    ParseError,
    PartnerRejected,
    ProfileError,
    SignatureError,
    has_digit_run,
)
from bridge.files import private_folder, write_private
from bridge.ledger import records as rec
from bridge.link.dispatcher import UNLISTED_CODE, classify_exception, protocol_codes
from bridge.link.partner_http import PAGE_LIMIT, partner_session, read_answer
from bridge.link.pull import ACTOR_HEADER, PURPOSE_HEADER, REASON_HEADER
from bridge.messages import read_json
from bridge.policy.consent import EMERGENCY_PURPOSE, EmergencyOverride
from bridge.trust.jws import verify_bundle

if TYPE_CHECKING:
    from bridge.link.node import Controller

_SAFE = re.compile(r"[^A-Za-z0-9.\-]")


@dataclass
class PullReport:
    """What one pull brought: pages verified and kept, resources, where they were written."""

    link: str
    partner: str
    patient_ids: list[str] = field(default_factory=list)
    pages: int = 0
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    page_ids: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    override: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in self.resources:
            rtype = key.split("/")[0]
            out[rtype] = out.get(rtype, 0) + 1
        return dict(sorted(out.items()))


def pull_from_link(controller: Controller, link_id: str) -> LinkConfig:
    link = controller.config.link(link_id)
    if link.direction != "pull-from":
        raise ConfigError("link is not a pull-from link", location=f"links.{link_id}.direction")
    return link


async def pull_patient(
    controller: Controller,
    link_id: str,
    identifier: tuple[str, str],
    *,
    since: str | None = None,
    out: Path | None = None,
    count: int | None = None,
    purpose: str | None = None,
    emergency: EmergencyOverride | None = None,
    max_pages: int = 10_000,
) -> PullReport:
    """Pull one patient's released records from the link's partner (see the module)."""
    c = controller
    link = pull_from_link(c, link_id)
    # Nothing is pulled outside this side's data-use agreement.
    check_agreement(c.config, link, c.clock())
    partner = c.config.partner(link.partner)
    base = str(partner.base_url).rstrip("/")
    stated = EMERGENCY_PURPOSE if emergency is not None else (purpose or link.pull_purposes()[0])
    headers = {"Accept": "application/fhir+json", PURPOSE_HEADER: stated}
    if emergency is not None:
        headers[ACTOR_HEADER] = quote(emergency.actor)
        headers[REASON_HEADER] = quote(emergency.reason)
    report = PullReport(link=link.id, partner=partner.id, override=emergency is not None)
    pseudonym = c.pseudonym([identifier])
    async with partner_session(c.config, partner.id, timeout=link.request_timeout_seconds,
                               headers=headers) as session:

        async def page(url: str, params: list[tuple[str, str]] | None) -> dict[str, Any]:
            if not url.startswith(base + "/"):
                raise SignatureError("a page link leads away from the partner's base URL",
                                     location="Bundle.link.next")
            try:
                async with session.get(url, params=params, allow_redirects=False) as resp:
                    body = await read_answer(resp, PAGE_LIMIT)  # a 3xx or an oversize: refused
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise classify_exception(exc) from None
            if status != 200:
                raise PartnerRejected(_refusal_text(status, body), location=f"HTTP {status}")
            bundle = await _verify_and_keep(c, link, partner.id, body, pseudonym,
                                            override=emergency is not None)
            report.pages += 1
            report.page_ids.append(str(bundle["identifier"]["value"]))
            if out is not None:
                _write_page(out, report.pages, body)
            return bundle

        count_param = [("_count", str(count))] if count else []
        found = await page(f"{base}/Patient",
                           [("identifier", f"{identifier[0]}|{identifier[1]}"), *count_param])
        ids = [str(e["resource"]["id"]) for e in found.get("entry") or ()
               if e.get("resource", {}).get("resourceType") == "Patient"]
        report.patient_ids = ids
        for pid in ids:
            params = [*count_param]
            if since:
                params.append(("_since", since))
            url: str | None = f"{base}/Patient/{pid}/$everything"
            first = True
            while url is not None and report.pages < max_pages:
                bundle = await page(url, params if first else None)
                first = False
                for entry in bundle.get("entry") or ():
                    resource = entry.get("resource") or {}
                    report.resources[f"{resource.get('resourceType')}/{resource.get('id')}"] = resource
                url = next((lk["url"] for lk in bundle.get("link") or ()
                            if lk.get("relation") == "next"), None)
    if out is not None:
        report.written = _write_resources(out, report.resources)
    return report


def _refusal_text(status: int, body: bytes) -> str:
    """What a partner's refusal says, for this side's operator: its code when it is one
    of the protocol's, and its location when it reads as one (PROTOCOL P-ERR-4). The rest
    is the partner's text, which could be anything."""
    try:
        outcome = orjson.loads(body)
        issue = outcome["issue"][0]
        code = issue["details"]["coding"][0]["code"]
        where = (issue.get("expression") or ["-"])[0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"the partner answered HTTP {status}"
    code = code if isinstance(code, str) and code in protocol_codes() else UNLISTED_CODE
    where = where if isinstance(where, str) and _LOCATION.fullmatch(where) and not (
        has_digit_run(where)) else "-"
    return f"the partner refused ({code} at {where})"


# A location as the protocol's refusals write them: a FHIR path (Bundle.entry[1].resource),
# a JSON path ($.a), a body offset (body[12]), a parameter or header name.
_LOCATION = re.compile(r"[A-Za-z_$][A-Za-z0-9_$#.:\[\]\-]{0,199}")


async def _verify_and_keep(
    c: Controller, link: LinkConfig, partner: str, body: bytes, pseudonym: str | None,
    *, override: bool = False,
) -> dict[str, Any]:
    now = c.clock()
    try:
        # As I-JSON (no member named twice): the page is kept as it came, and its bytes
        # must read as the page verified, whichever parser reads them later.
        bundle = read_json(body)
    except ParseError as error:
        await _audit_refusal(c, link, partner, error, pseudonym)
        raise
    try:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get(
            "type"
        ) != "searchset":
            raise ParseError("a pull answer is a searchset Bundle", location="Bundle.type")
        claims = verify_bundle(bundle, c.keyring, expected_issuer=partner, expected_audience=c.id,
                               now=now)
        # What the partner released must fit what this side agreed to receive.
        outside = c.profiles[link.id].check({
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": e.get("resource")} for e in bundle.get("entry") or ()],
        })
        if outside:
            raise ProfileError("the page carries elements outside the link profile",
                               location=outside[0])
    except BridgeError as exc:
        await _audit_refusal(c, link, partner, exc, pseudonym)
        raise
    types = sorted({str(e.get("resource", {}).get("resourceType"))
                    for e in bundle.get("entry") or ()})
    await c.db.call(
        rec.record_received, c.store, link=link.id, partner=partner, page_id=claims.message_id,
        digest=claims.payload_digest, body=body, now=now,
        audit=c.audit(
            "record.pull.receive", subject=claims.message_id, partner=partner, patient=pseudonym,
            categories=types, digest_value=claims.payload_digest, now=now,
            detail=f"{link.id} entries={len(bundle.get('entry') or ())}"
            + (" override" if override else ""),
        ),
    )
    return bundle


async def _audit_refusal(
    c: Controller, link: LinkConfig, partner: str, exc: BridgeError, pseudonym: str | None
) -> None:
    await c.db.append_audit(c.audit(
        "record.pull.receive", subject=f"link:{link.id}", outcome="denied", partner=partner,
        patient=pseudonym, detail=f"{exc.code}@{exc.location or '-'}",
    ))


def _write_page(out: Path, number: int, body: bytes) -> None:
    pages = private_folder(out / "pages")
    write_private(pages / f"page-{number:05d}.json", body)


def _write_resources(out: Path, resources: dict[str, dict[str, Any]]) -> list[str]:
    private_folder(out)
    written: list[str] = []
    for key, resource in sorted(resources.items()):
        rtype, _, rid = key.partition("/")
        name = f"{_SAFE.sub('_', rtype)}-{_SAFE.sub('_', rid)}.json"
        write_private(out / name, orjson.dumps(resource, option=orjson.OPT_INDENT_2))
        written.append(name)
    return written
