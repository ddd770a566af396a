"""Record pull, the answering side: FHIR search, read and ``$everything`` for a partner
with a pull link (GB/T 39725 §11.1, PROTOCOL §11).

Every answer goes the way a pushed claim goes: the patient's resources (mapped by the
same mapping when they were kept) are put in one collection with their Patient and
whatever they refer to, and :func:`bridge.policy.engine.apply_policy` decides for the
link's partner, purpose, profile and level what of it may be released; only what it
released is answered. A withheld resource is absent, and references to it are gone.
A request about a patient that is unknown, or for whom no consent permits anything,
gets exactly the same answer (an empty searchset, or 403 when the link says so), so
an answer never tells whether a patient exists.

Paging reads one snapshot of the source (:mod:`bridge.link.pull_source`) per traversal:
the cursor in ``Bundle.link`` ``next`` carries the snapshot and the position, bound to
the query by a MAC, so pages neither repeat nor skip while records keep arriving. Pages
are filled with released resources only, and ``Bundle.total`` is given only when one
page holds the whole answer, so neither page sizes nor totals count what consent
withheld. Consent is asked again for every page: a revocation stops the next page.

Every page is a signed searchset (``Bundle.signature`` as in PROTOCOL §5, ``aud`` the
partner, ``msgid`` the page's ``Bundle.identifier``); a read is signed in
``X-Signature``. The page identity is the audit subject on both sides.

Abuse is bounded per partner: a token bucket (429 with ``Retry-After``; shared by every
process of a PostgreSQL store, :mod:`bridge.ledger.ratelimit`), a bulk-query
alarm when too many distinct patients are asked about in a window (audited, and kept
for review), and refusals (400/401/403 with an OperationOutcome naming the parameter
or header) for anything not understood. Refusals are audited without values.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

import orjson
from aiohttp import web

from bridge.compliance.agreements import check_link
from bridge.config import LinkConfig
from bridge.errors import BridgeError, ConsentDenied, NotFound, ParseError, PolicyError, TrustError
from bridge.errors import UnknownPartner as UnknownPartnerError
from bridge.ledger import records as rec
from bridge.ledger.audit import AuditRecord, Outcome, format_time
from bridge.ledger.ratelimit import take_token
from bridge.ledger.records import StoredResource
from bridge.link.pull_source import PullSource, StoreSource
from bridge.policy.consent import EMERGENCY_PURPOSE, EmergencyOverride
from bridge.policy.engine import PolicyResult, apply_policy
from bridge.policy.profile import LinkProfile
from bridge.records.search import (
    DATE_ELEMENTS,
    SEARCH_PARAMS,
    SERVED_TYPES,
    SearchQuery,
    UnsupportedParameter,
    check_format,
    check_id,
    decode_cursor,
    encode_cursor,
    param_label,
    parse_everything,
    parse_search,
)
from bridge.trust.jws import digest, sign_bundle, sign_detached_bytes, signed_payload

if TYPE_CHECKING:
    from bridge.link.node import Controller
    from bridge.link.server import ReceiverApp

log = logging.getLogger("bridge.pull")

FHIR_JSON = "application/fhir+json"
PURPOSE_HEADER = "X-Purpose-Of-Use"
ACTOR_HEADER = "X-Emergency-Actor"
REASON_HEADER = "X-Emergency-Reason"
CORRELATION_HEADER = "X-Correlation-Id"
SIGNATURE_HEADER = "X-Signature"
#: Search types a link may serve besides the Patient itself.
SEARCHABLE = tuple(t for t in SERVED_TYPES if t != "Patient")


class RateLimited(BridgeError):
    """A partner asked faster than its link allows (429 with Retry-After)."""

    code = "rate-limited"
    http_status = 429
    fault = "transient"
    issue_type = "throttled"


def pull_link_for(controller: Controller, partner_id: str) -> LinkConfig | None:
    """The link on which ``partner_id`` may pull from this controller, if any."""
    for link in controller.config.links:
        if link.direction == "pull" and link.partner == partner_id:
            return link
    return None


def served_types(profile: LinkProfile) -> list[str]:
    """Types a link answers searches for: the served types its profile carries."""
    return [t for t in SERVED_TYPES if profile.allows_type(t)]


def offered_params(profile: LinkProfile, rtype: str) -> list[str]:
    """Search parameters a link offers for ``rtype``: a date parameter only when the
    link's profile releases the element behind it (a filter on a withheld element would
    disclose it through the answer)."""
    params = list(SEARCH_PARAMS[rtype])
    spec = DATE_ELEMENTS.get(rtype)
    if spec is not None:
        allowed = {p.split(".")[0] for p in profile.allowed_paths(rtype)}
        if not any(element in allowed for element in spec[1]):
            params.remove(spec[0])
    return params


# --- abuse bounds ------------------------------------------------------------------------


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until it may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Window:
    seen: deque[tuple[float, str]] = field(default_factory=deque)
    alarmed_until: float = 0.0
    throttled: int = 0
    throttle_audited: float = 0.0


class PullGuard:
    """Per-partner rate limits and the bulk-query alarm (in this process)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._windows: dict[str, _Window] = {}

    def admit(self, link: LinkConfig) -> float:
        """0 when the partner may be answered now, else seconds to wait."""
        now = self._clock()
        bucket = self._buckets.get(link.partner)
        if bucket is None:
            bucket = _Bucket(link.pull.rate_per_second, float(link.pull.rate_burst),
                             float(link.pull.rate_burst), now)
            self._buckets[link.partner] = bucket
        return bucket.take(now)

    def throttled(self, partner: str) -> int | None:
        """Count a throttled request; the count to audit at most once a minute, else None."""
        now = self._clock()
        window = self._windows.setdefault(partner, _Window())
        window.throttled += 1
        if now - window.throttle_audited >= 60:
            count, window.throttled, window.throttle_audited = window.throttled, 0, now
            return count
        return None

    def note_patient(self, link: LinkConfig, key: str) -> int | None:
        """Record that the partner asked about one patient (by the key it asked with);
        when distinct patients in the window pass the link's threshold for the first
        time in that window, return how many (the alarm), else None."""
        now = self._clock()
        window = self._windows.setdefault(link.partner, _Window())
        span = link.pull.bulk_alarm_window_seconds
        while window.seen and now - window.seen[0][0] > span:
            window.seen.popleft()
        window.seen.append((now, hashlib.sha256(key.encode()).hexdigest()))
        distinct = len({k for _, k in window.seen})
        if distinct > link.pull.bulk_alarm_patients and now >= window.alarmed_until:
            window.alarmed_until = now + span
            return distinct
        return None


class AuditBatch:
    """Audit entries of concurrent answers committed together (group commit): each
    answer still waits for its own entry to be durable before it is sent."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self._pending: list[tuple[AuditRecord, asyncio.Future[Any]]] = []
        self._running = False

    async def append(self, record: AuditRecord) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((record, future))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    entries = await self.c.db.call(
                        rec.append_audits, self.c.store, [r for r, _ in group]
                    )
                except Exception as exc:  # noqa: BLE001 - every waiting answer hears why
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), entry in zip(group, entries, strict=True):
                    if not future.done():
                        future.set_result(entry)
        finally:
            self._running = False


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PullRequest:
    """Who asks, on which link, for which purpose, under which override."""

    link: LinkConfig
    partner: str
    purpose: str
    emergency: EmergencyOverride | None


@dataclass
class Answer:
    """What a pull released: the entries, the decision, the patient and the cursor."""

    matches: list[dict[str, Any]]
    includes: list[dict[str, Any]]
    next_cursor: str | None
    person: str | None
    identifiers: list[tuple[str, str]]
    decision: str
    first_page: bool


def _cursor_holder(partner: str, purpose: str) -> str:
    """Whom a cursor is issued to: a traversal goes on for that partner and purpose only
    (a traversal begun under consent cannot be read on as an emergency override)."""
    return f"{partner} {purpose}"


def _percent_decoded(request: web.Request, name: str) -> str:
    """A header carrying percent-encoded UTF-8 text (PROTOCOL P-PULL-3), decoded; 400
    naming the header when it is not that."""
    try:
        return unquote(request.headers.get(name, ""), errors="strict").strip()
    except UnicodeDecodeError:
        raise ParseError("header is not percent-encoded UTF-8", location=name) from None


def _refs(value: Any, out: set[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.count("/") == 1 and not ref.startswith(("urn:", "#")):
            rtype, rid = ref.split("/")
            out.add((rtype, rid))
        for v in value.values():
            if isinstance(v, (dict, list)):
                _refs(v, out)
    elif isinstance(value, list):
        for v in value:
            _refs(v, out)


class PullAPI:
    """The pull routes of one controller (registered by :class:`ReceiverApp`)."""

    def __init__(self, receiver: ReceiverApp, source: PullSource | None = None) -> None:
        self.r = receiver
        self.c: Controller = receiver.c
        self.store_source = StoreSource(self.c) if source is None else None
        self.source: PullSource = source if source is not None else self.store_source  # type: ignore[assignment]
        self.guard = PullGuard()
        self._cursor_key = hmac.new(self.c.pseudonym_key, b"pull-cursor", hashlib.sha256).digest()
        self.stats: dict[str, int] = {"pages": 0, "refused": 0, "throttled": 0}
        self.audits = AuditBatch(self.c)

    @property
    def serves(self) -> bool:
        return any(link.direction == "pull" for link in self.c.config.links)

    def register(self, app: web.Application, base: str) -> None:
        """Add the pull routes under ``base``; start indexing the HL7 inbox with the app."""
        # GET only: a HEAD would run the pull (sign, audit a release, file an override for
        # review) for a page the client never receives.
        app.router.add_get(f"{base}/Patient", self.search, allow_head=False)
        app.router.add_get(f"{base}/Patient/{{id}}", self.read, allow_head=False)
        app.router.add_get(f"{base}/Patient/{{id}}/$everything", self.everything,
                           allow_head=False)
        for rtype in SEARCHABLE:
            app.router.add_get(f"{base}/{rtype}", self.search, allow_head=False)
        if self.store_source is not None and self.serves:
            store_source = self.store_source

            async def start(_app: web.Application) -> None:
                store_source.start()

            async def stop(_app: web.Application) -> None:
                await store_source.stop()

            app.on_startup.append(start)
            app.on_cleanup.append(stop)

    # --- the three handlers ----------------------------------------------------------------

    async def search(self, request: web.Request) -> web.StreamResponse:
        rtype = request.path.rstrip("/").rsplit("/", 1)[-1]
        return await self._serve(request, rtype, "search")

    async def everything(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "Patient", "everything")

    async def read(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "Patient", "read")

    # --- request checks ----------------------------------------------------------------------

    async def _refuse(
        self, exc: BridgeError, *, partner: str | None, subject: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.stats["refused"] += 1
        outcome: Outcome = "denied" if isinstance(exc, (TrustError, PolicyError)) else "failure"
        await self.audits.append(
            self.c.audit("pull.reject", subject=subject, outcome=outcome, partner=partner,
                         detail=f"{exc.code}@{exc.location or '-'}")
        )
        return web.Response(status=exc.http_status, body=orjson.dumps(exc.to_operation_outcome()),
                            content_type=FHIR_JSON, headers=headers)

    def _purpose(self, request: web.Request, link: LinkConfig) -> tuple[str, EmergencyOverride | None]:
        stated = request.headers.get(PURPOSE_HEADER, "").strip()
        purposes = link.pull_purposes()
        if not stated:
            return purposes[0], None
        if stated == EMERGENCY_PURPOSE:
            if not link.pull.override_allowed:
                raise PolicyError("this link does not grant emergency overrides",
                                  location=PURPOSE_HEADER)
            actor = _percent_decoded(request, ACTOR_HEADER)
            reason = _percent_decoded(request, REASON_HEADER)
            if not actor:
                raise ParseError("an emergency override names who invokes it", location=ACTOR_HEADER)
            if not reason:
                raise ParseError("an emergency override states a reason", location=REASON_HEADER)
            if len(actor) > 128 or len(reason) > 1000:
                raise ParseError("override header too long",
                                 location=ACTOR_HEADER if len(actor) > 128 else REASON_HEADER)
            return stated, EmergencyOverride(actor=actor, reason=reason)
        if stated not in purposes:
            raise PolicyError("purpose of use not permitted on this link", location=PURPOSE_HEADER)
        return stated, None

    def _query(self, request: web.Request, rtype: str, op: str, link: LinkConfig) -> SearchQuery:
        params = list(request.query.items())
        profile = self.c.profiles[link.id]
        pull = link.pull
        if op == "read":
            for position, (name, _) in enumerate(params):
                if name not in ("_format", "_pretty"):
                    raise UnsupportedParameter("a read takes no search parameters",
                                               location=param_label(name, position))
            check_format(params)
            pid = check_id(request.match_info["id"], where="Patient.id")
            return SearchQuery("Patient", "read", 1, patient=pid, ids=(pid,))
        if op == "everything":
            return parse_everything(
                request.match_info["id"], params, default_count=pull.default_count,
                max_count=pull.max_count, types=profile.allowed,
            )
        if not profile.allows_type(rtype):
            raise UnsupportedParameter("resource type not served on this link", location=rtype)
        return parse_search(rtype, params, default_count=pull.default_count,
                            max_count=pull.max_count, offered=offered_params(profile, rtype),
                            base=self.c.config.server.base_url())

    # --- serving -------------------------------------------------------------------------------

    async def _serve(self, request: web.Request, rtype: str, op: str) -> web.StreamResponse:
        subject = f"pull:{'$everything' if op == 'everything' else rtype}"
        try:
            partner = self.r._peer_partner(request)
        except TrustError as exc:
            return await self._refuse(exc, partner=None, subject=subject)
        link = pull_link_for(self.c, partner.id)
        if link is None:
            # Bounded like every refusal of whom a certificate names (PROTOCOL §9.3).
            return await self.r._refuse_peer(
                UnknownPartnerError("partner has no pull link here", location="links"),
                request, partner=partner.id, subject=subject,
            )
        wait = await self._admit(link)
        if wait > 0:
            self.stats["throttled"] += 1
            count = self.guard.throttled(partner.id)
            if count is not None:
                await self.c.db.append_audit(self.c.audit(
                    "pull.throttled", subject=subject, outcome="denied", partner=partner.id,
                    detail=f"rate-limited count={count}",
                ))
            limited = RateLimited("too many requests on this link",
                                  location="links.pull.rate_per_second")
            return web.Response(status=429, body=orjson.dumps(limited.to_operation_outcome()),
                                content_type=FHIR_JSON,
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            # Nothing is answered outside the link's agreement or cross-border approval.
            check_link(self.c.config, link, self.c.clock())
            purpose, emergency = self._purpose(request, link)
            query = self._query(request, rtype, op, link)
            position = decode_cursor(self._cursor_key, query,
                                     holder=_cursor_holder(partner.id, purpose),
                                     now=self.c.clock().timestamp())
            await self.c.count_abroad(link, f"pull:{uuid.uuid4()}")
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject=subject)
        pull = PullRequest(link, partner.id, purpose, emergency)
        if position is None:
            key = (f"{query.identifier[0]}|{query.identifier[1]}" if query.identifier
                   else f"Patient/{query.patient}")
            alarm = self.guard.note_patient(link, key)
            if alarm is not None:
                await self._alarm(pull, alarm)
        answer = await self._answer(pull, query, position)
        # A read answers 404 for a patient unknown or not permitted, whatever the link's
        # choice for searches (PROTOCOL P-PULL-9).
        if answer.decision == "refused" and link.pull.no_consent == "forbidden" and op != "read":
            forbidden = PolicyError("no disclosure is permitted for this request", location=(
                "identifier" if query.identifier else "patient"))
            return await self._refuse(forbidden, partner=partner.id, subject=subject)
        if op == "read":
            return await self._reply_read(pull, query, answer)
        return await self._reply_bundle(pull, query, answer, request)

    async def _admit(self, link: LinkConfig) -> float:
        """0 when the link's partner may be answered now, else seconds to wait.

        The bucket is the partner's, whichever process answers: in a PostgreSQL store
        shared by several processes it lives in the store (one row per partner); a
        SQLite store serves one process, whose memory holds it."""
        if self.c.store.dialect == "postgresql":
            return await self.c.db.call(
                take_token, self.c.store, bucket=f"pull:{link.partner}",
                rate=link.pull.rate_per_second, burst=float(link.pull.rate_burst),
                now=time.time(),
            )
        return self.guard.admit(link)

    async def _alarm(self, pull: PullRequest, distinct: int) -> None:
        c = self.c
        log.warning("bulk-query alarm: partner %s asked about %d patients", pull.partner, distinct)
        await c.db.call(
            rec.add_review, c.store, link=pull.link.id, partner=pull.partner, kind="bulk-query",
            actor=None, reason=f"{distinct} distinct patients within "
                               f"{pull.link.pull.bulk_alarm_window_seconds} s",
            audit=c.audit("pull.alarm", subject=f"link:{pull.link.id}", outcome="denied",
                          partner=pull.partner, detail=f"bulk-query distinct={distinct}"),
        )

    async def _answer(
        self, pull: PullRequest, query: SearchQuery, position: tuple[int, int] | None
    ) -> Answer:
        c = self.c
        profile = c.profiles[pull.link.id]
        refused = Answer([], [], None, None, [], "refused", position is None)
        pid = query.ids[0] if query.ids else query.patient
        view = await self.source.open_patient(
            identifier=query.identifier, patient_id=None if query.identifier else pid,
            snapshot=position[0] if position is not None else None,
        )
        if view is None:
            return refused
        snapshot, after = view.snapshot, position[1] if position is not None else 0
        patient, person = view.patient, view.person
        identifiers = list(view.identifiers)
        refused.person, refused.identifiers = person, identifiers
        await c.sync_consents()
        # The patient-wide question first (with what the Patient refers to): without a
        # permit nothing else is looked at. For a Patient search it is the whole answer.
        own = await self._closure(person, [patient], snapshot)
        try:
            gate = self._release(pull, profile, patient, own)
        except ConsentDenied:
            return refused
        decision = "override" if pull.emergency is not None else (
            f"permit {','.join(gate.record.consent_ids) if gate.record else '-'}")
        if query.resource_type == "Patient" and query.operation != "everything" and not (
            query.last_updated
        ):
            own_patient = [e["resource"] for e in gate.bundle["entry"]
                           if e["resource"]["resourceType"] == "Patient"]
            mine = own_patient if after < patient.seq else []
            return Answer(mine, [], None, person, identifiers, decision, position is None)
        if query.operation == "everything":
            types = sorted(query.types if query.types is not None else profile.allowed)
        else:
            types = [query.resource_type]
        ids = [person] if query.resource_type == "Patient" and query.operation != "everything" else []
        matches: list[tuple[StoredResource, dict[str, Any]]] = []
        released_all: dict[tuple[str, str], dict[str, Any]] = {}
        scan, last, more = after, after, False
        batch = min(max(query.count + 1, 32), 500)
        while True:
            candidates = await self.source.resources(
                person, types=types, snapshot=snapshot, after=scan, limit=batch,
                dates=query.dates, last_updated=query.last_updated, ids=ids,
            )
            if not candidates:
                break
            released = await self._released(pull, profile, patient, candidates, snapshot)
            released_all.update(released)
            for cand in candidates:
                scan = cand.seq
                resource = released.get((cand.rtype, cand.rid))
                if resource is None:
                    continue
                if len(matches) < query.count:
                    matches.append((cand, resource))
                    last = cand.seq
                else:
                    more = True
                    break
            if more or len(candidates) < batch:
                break
        includes: list[dict[str, Any]] = []
        if query.includes:
            have = {(m.rtype, m.rid) for m, _ in matches}
            wanted: set[tuple[str, str]] = set()
            for m, resource in matches:
                if (m.rtype, "encounter") in query.includes:
                    _refs(resource.get("encounter"), wanted)
            for ref in sorted(wanted - have):
                if ref in released_all:
                    includes.append(released_all[ref])
        expires = c.clock().timestamp() + pull.link.pull.cursor_ttl_seconds
        cursor = (encode_cursor(self._cursor_key, query, snapshot=snapshot, after=last,
                                holder=_cursor_holder(pull.partner, pull.purpose),
                                expires=expires)
                  if more else None)
        return Answer([r for _, r in matches], includes, cursor, person, identifiers, decision,
                      position is None)

    def _release(
        self, pull: PullRequest, profile: LinkProfile, patient: StoredResource,
        resources: Sequence[StoredResource],
    ) -> PolicyResult:
        """apply_policy over the Patient and ``resources`` (raises ConsentDenied)."""
        base = self.c.config.server.base_url()
        entries = [{"fullUrl": f"{base}/Patient/{patient.rid}", "resource": patient.resource}]
        entries += [
            {"fullUrl": f"{base}/{r.rtype}/{r.rid}", "resource": r.resource}
            for r in resources if not (r.rtype == "Patient" and r.rid == patient.rid)
        ]
        collection = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        return apply_policy(
            collection, registry=self.c.consents_for(pull.link), profile=profile, recipient=pull.partner,
            purpose=pull.purpose, now=self.c.clock(), emergency=pull.emergency,
        )

    async def _closure(
        self, person: str, resources: Iterable[StoredResource], snapshot: int
    ) -> list[StoredResource]:
        """What the resources refer to in the patient's compartment (three levels deep),
        so the policy cleans references to whatever it withholds."""
        have = {(r.rtype, r.rid) for r in resources}
        frontier = list(resources)
        out: list[StoredResource] = []
        for _ in range(3):
            refs: set[tuple[str, str]] = set()
            for r in frontier:
                _refs(r.resource, refs)
            refs -= have
            if not refs:
                break
            frontier = await self.source.read(person, sorted(refs), snapshot=snapshot)
            have |= refs
            out.extend(frontier)
        return out

    async def _released(
        self, pull: PullRequest, profile: LinkProfile, patient: StoredResource,
        candidates: list[StoredResource], snapshot: int,
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Of the candidates (and what they refer to), what the policy releases, by
        ``(type, id)``. A page whose consent question fails as a whole (a consent
        limited to a span of care, a deny provision) is asked resource by resource."""
        closure = await self._closure(patient.rid, [patient, *candidates], snapshot)
        try:
            groups = [self._release(pull, profile, patient, [*candidates, *closure])]
        except ConsentDenied:
            groups = []
            for cand in candidates:
                own = await self._closure(patient.rid, [patient, cand], snapshot)
                try:
                    groups.append(self._release(pull, profile, patient, [cand, *own]))
                except ConsentDenied:
                    continue
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for result in groups:
            for entry in result.bundle["entry"]:
                resource = entry["resource"]
                out.setdefault((str(resource["resourceType"]), str(resource["id"])), resource)
        return out

    # --- replies -------------------------------------------------------------------------------

    def _url(self, request: web.Request, query: SearchQuery, cursor: str | None) -> str:
        base = self.c.config.server.base_url()
        path = request.path[len(self.c.config.server.base_path.rstrip("/")):]
        qs = urlencode(query.page_params(cursor))
        return f"{base}{path}" + (f"?{qs}" if qs else "")

    async def _reply_bundle(
        self, pull: PullRequest, query: SearchQuery, answer: Answer, request: web.Request
    ) -> web.Response:
        c = self.c
        now = c.clock()
        page_id = uuid.uuid4()
        identity = f"urn:uuid:{page_id}"
        base = c.config.server.base_url()
        links = [{"relation": "self", "url": self._url(request, query, query.cursor)}]
        if answer.next_cursor is not None:
            links.append({"relation": "next", "url": self._url(request, query, answer.next_cursor)})
        entries = [
            {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
             "search": {"mode": "match"}}
            for r in answer.matches
        ] + [
            {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
             "search": {"mode": "include"}}
            for r in answer.includes
        ]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(page_id),
            "identifier": {"system": "urn:ietf:rfc:3986", "value": identity},
            "type": "searchset",
            "timestamp": now.isoformat(timespec="seconds"),
        }
        if answer.first_page and answer.next_cursor is None:
            # One page holds the whole answer: its size says no more than its entries.
            bundle["total"] = len(answer.matches)
        bundle["link"] = links
        if entries:
            bundle["entry"] = entries
        signed = sign_bundle(bundle, c.signer_for(pull.link.id), issuer=c.id, audience=pull.partner,
                             message_id=identity, now=now)
        body = orjson.dumps(signed)
        await self._audit(pull, query, answer, identity, digest(signed_payload(signed)))
        self.stats["pages"] += 1
        return web.Response(body=body, content_type=FHIR_JSON)

    async def _reply_read(self, pull: PullRequest, query: SearchQuery, answer: Answer) -> web.Response:
        c = self.c
        identity = f"urn:uuid:{uuid.uuid4()}"
        if not answer.matches:
            await self._audit(pull, query, answer, identity, None)
            exc = NotFound("no such patient", location="Patient.id")
            return web.Response(status=404, body=orjson.dumps(exc.to_operation_outcome()),
                                content_type=FHIR_JSON, headers={CORRELATION_HEADER: identity})
        body = orjson.dumps(answer.matches[0])
        signature = sign_detached_bytes(body, c.signer_for(pull.link.id), issuer=c.id,
                                        audience=pull.partner,
                                        message_id=identity, now=c.clock())
        await self._audit(pull, query, answer, identity, digest(body))
        return web.Response(body=body, content_type=FHIR_JSON,
                            headers={SIGNATURE_HEADER: signature, CORRELATION_HEADER: identity})

    async def _audit(
        self, pull: PullRequest, query: SearchQuery, answer: Answer, identity: str,
        payload_digest: str | None,
    ) -> None:
        c = self.c
        released = answer.matches + answer.includes
        types = sorted({str(r["resourceType"]) for r in released})
        override = (f" override actor={pull.emergency.actor}" if pull.emergency is not None
                    else "")
        detail = (f"{pull.link.id} {query.operation} {pull.purpose} {answer.decision}"
                  f" released={len(released)}{override}")
        entry = c.audit(
            "record.pull", subject=identity,
            outcome="success" if answer.decision != "refused" else "denied",
            partner=pull.partner, patient=c.pseudonym(answer.identifiers),
            categories=types, detail=detail, digest_value=payload_digest,
        )
        # Every page released under an override is reported for review (pages of one
        # emergency by one actor within the hour make one item): a traversal read on by
        # someone else is their override, not the first one's.
        if pull.emergency is not None and answer.decision == "override":
            await c.db.call(
                rec.add_review, c.store, link=pull.link.id, partner=pull.partner,
                kind="override", actor=pull.emergency.actor, reason=pull.emergency.reason,
                audit=entry, coalesce_since=format_time(c.clock() - timedelta(hours=1)),
            )
        else:
            await self.audits.append(entry)
