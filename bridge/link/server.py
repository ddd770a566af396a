"""The receiving side: an aiohttp application behind a mutual-TLS listener.

Every request, whatever its route, first passes :func:`peer_gate`: the connection's
client certificate is checked again for this request (validity dates, CRL) and must
belong to a registered partner or to this controller's own systems (401 otherwise).
A handshake proves the certificate once; a connection can outlive it.

Request path for ``POST [base]/$process-message`` (PROTOCOL §6.1, in this order):

1. the certificate must map to a registered partner with an inbound link (401);
2. media type and Content-Encoding (415), size (413), a body in time (408);
3. the body must be I-JSON (400) and a message envelope the endpoint accepts (400):
   :func:`bridge.messages.check_envelope`;
4. the MessageHeader must name the TLS peer as sender and this bridge as receiver (403);
5. the signature must verify, be made by that same partner and be addressed to us,
   inside the replay window (403);
6. an identity being processed right now gets 409, only now that the request is
   known to be authentic, and that answer is audited;
7. a message identity seen before gets the original receipt back, or 422 if the
   content differs;
8. the content must be valid FHIR and hold only what the link's profile allows (422/403);
9. the inbox row, the audit entry and the signed receipt are committed together,
   and only then is the receipt returned.

Every refusal is audited, and so is every unexpected failure (an audited 500): an
answer that depends only on the request is never a 5xx, because senders retry those.
No health data appears in an error or a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from bridge.batch import ENTRY_DEPTH, BatchEntry, encode_batch_response, read_batch
from bridge.compliance.agreements import check_link
from bridge.config import LinkConfig, ServerConfig
from bridge.errors import (
    BridgeError,
    CertificateRejected,
    ConflictError,
    InFlightError,
    InternalError,
    NotFound,
    ParseError,
    PayloadTooLarge,
    PolicyError,
    ProfileError,
    RequestTimeout,
    SignatureError,
    StoreError,
    TrustError,
    UnknownPartner,
    UnsupportedMediaType,
    ValidationError,
    bounded_path,
    is_fhir_id,
)
from bridge.ledger.handoff import queue_hook
from bridge.link.capability import capability_statement
from bridge.link.httperrors import REFUSAL
from bridge.link.node import Controller, resource_types
from bridge.link.pull import PullAPI
from bridge.link.witness import AuditExchangeAPI
from bridge.logs import escape_line, refusal_event
from bridge.mapping import patient_identifiers
from bridge.messages import (
    MAX_NESTING,
    check_addressing,
    check_envelope,
    collection_of,
    read_json,
)
from bridge.policy.consent import PARTNER_SOURCE, parse_consent
from bridge.policy.consent_rules import unbounded_permit
from bridge.records.fhir import ValidationCache, empty_value, validation_cache
from bridge.trust.identity import pinned
from bridge.trust.jws import SignedClaims, payload_digests, verify_bundle, verify_detached_bytes
from bridge.trust.peercheck import PeerCertificateCheck
from bridge.trust.receipts import make_receipt
from bridge.trust.registry import Partner

log = logging.getLogger("bridge.server")

FHIR_JSON = "application/fhir+json"
_ACCEPTED_TYPES = {FHIR_JSON, "application/json"}
#: Message events ``$process-message`` accepts (PROTOCOL §4.3): claims only. A receipt
#: travels as an answer, never as a request.
ACCEPTED_EVENTS = frozenset({"claim-submit"})
_BASE_PATH = web.AppKey("base_path", str)


def outcome_response(exc: BridgeError) -> web.Response:
    response = web.Response(
        status=exc.http_status,
        body=orjson.dumps(exc.to_operation_outcome()),
        content_type=FHIR_JSON,
    )
    if isinstance(exc, (CertificateRejected, RequestTimeout, PayloadTooLarge)):
        # The connection's certificate is no longer good, or its stream is mid-body.
        response.force_close()
    return response


def refusal_detail(exc: BridgeError) -> str:
    """``code@location`` of a refusal, as its audit entry keeps it: the location is
    built by the bridge from element names and labels (never from a sender's text), and
    is cut to :data:`~bridge.errors.MAX_PATH` characters with any control character
    escaped all the same, because the audit log keeps what it is given for good."""
    return f"{exc.code}@{bounded_path(escape_line(exc.location or '-'))}"


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a request, as :func:`peer_gate` established."""

    partner: Partner | None  # None: this controller's own systems
    fingerprint: str


#: Where the verified peer of a request is kept (see :func:`peer_gate`).
PEER = web.RequestKey("bridge.peer", Peer)


async def read_body(request: web.Request, server: ServerConfig, *, limit: int | None = None) -> bytes:
    """The request body, or 415 (any Content-Encoding), 413 (too large), 408 (too slow).

    Content codings are refused rather than decoded (PROTOCOL P-HTTP-2): a receiver
    never inflates what a sender compressed. aiohttp's own decoding is off
    (``auto_decompress=False``), so a refused body is never decompressed either.
    ``limit``: a bound other than ``server.max_body_bytes`` (a batch request's); the
    body is then read in chunks and refused as soon as it passes the bound.
    """
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise UnsupportedMediaType(
            "Content-Encoding is not accepted; send the body as it is",
            location="Content-Encoding",
        )
    bound = server.max_body_bytes if limit is None else limit
    declared = request.content_length
    if declared is not None and declared > bound:
        # Refused on what it announces, before waiting for a byte of it.
        raise PayloadTooLarge(
            f"body larger than this bridge accepts ({bound} bytes)", location="Content-Length"
        )
    try:
        async with asyncio.timeout(server.body_timeout_seconds):
            if limit is None:
                return await request.read()
            # aiohttp's client_max_size bounds request.read() for every route; a batch
            # route has its own bound, so its body is read here.
            parts: list[bytes] = []
            size = 0
            while chunk := await request.content.read(64 * 1024):
                size += len(chunk)
                if size > bound:
                    raise web.HTTPRequestEntityTooLarge(max_size=bound, actual_size=size)
                parts.append(chunk)
            return b"".join(parts)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body larger than this bridge accepts ({bound} bytes)", location="body"
        ) from None
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time", location="body") from None
    except RequestPayloadError:
        # The parser failed inside the body (a chunk size that is not a number, say):
        # the client's bytes, refused naming none of them.
        raise ParseError("the request body could not be read", location="body") from None
    except ConnectionResetError:
        # The client hung up mid-body: its failure, not the receiver's. Nobody is left
        # to answer, and nothing is audited (a row per dropped connection would let any
        # client write the trail).
        raise ClientGone() from None


class ClientGone(Exception):
    """The client closed the connection before its request was complete."""


@dataclass
class _Flight:
    """A message identity being processed, and how many copies were told to wait."""

    refused: int = 0


class PeerRefusals:
    """Requests refused for their certificate, audited a bounded number of times.

    A certificate that names no registered partner (or one that expired since the
    handshake, or a partner's without a link for the route asked) is refused on every
    request, and a client can repeat such a request as fast as it likes. The first refusal per (certificate, error) in a window is audited
    at once; repeats are counted and written as one entry, ``<code>@<where>
    repeated=N``, when the window closes; past ``max_distinct`` keys a window writes one
    ``other-refusals count=N`` entry (PROTOCOL §9.3). Every refusal is still counted.
    """

    def __init__(
        self, write: Callable[[str, str | None, str, str | None], Awaitable[None]], *,
        window: float = 60.0, max_distinct: int = 100, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write  # (detail, fingerprint, subject, partner) -> one audit entry
        self.window = window
        self._max_distinct = max_distinct
        self._clock = clock
        self._start = clock()
        self._seen: dict[tuple[str, str | None, str | None], tuple[str, int]] = {}
        self._overflow = 0
        self._flusher: asyncio.Task[None] | None = None

    async def refused(
        self, detail: str, fingerprint: str | None, subject: str, partner: str | None = None
    ) -> bool:
        """Count one refusal; True when it was written now (the first of its kind)."""
        if self._clock() - self._start >= self.window:
            await self.flush()
        key = (detail, fingerprint, partner)
        seen = self._seen.get(key)
        if seen is None and len(self._seen) < self._max_distinct:
            self._seen[key] = (subject, 0)
            await self._write(detail, fingerprint, subject, partner)
            return True
        if seen is not None:
            self._seen[key] = (seen[0], seen[1] + 1)
        else:
            self._overflow += 1
        if self._flusher is None:
            remaining = max(0.0, self.window - (self._clock() - self._start))
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later(remaining))
        return False

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._flusher = None
        await self.flush()

    async def flush(self) -> None:
        """Write what the window counted, and start a new window."""
        seen, overflow = self._seen, self._overflow
        self._seen, self._overflow, self._start = {}, 0, self._clock()
        for (detail, fingerprint, partner), (subject, repeated) in seen.items():
            if repeated:
                await self._write(f"{detail} repeated={repeated}", fingerprint, subject, partner)
        if overflow:
            await self._write(f"other-refusals count={overflow}", None, "connection", None)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()


class ReceiverApp:
    """HTTP handlers of one controller."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self._in_flight: dict[tuple[str, str], _Flight] = {}
        self.stats: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0}
        self.peer_check = PeerCertificateCheck.from_crl_file(controller.config.tls.crl)
        self.peer_refusals = PeerRefusals(self._audit_peer_refusal)
        from bridge.link.sync import KnownStreams

        self.streams = KnownStreams(controller.config.server.max_streams_per_partner)

    def build(self) -> web.Application:
        app = web.Application(
            client_max_size=self.c.config.server.max_body_bytes,
            middlewares=[outcome_on_failure(self), peer_gate(self)],
        )
        base = self.c.config.server.base_path.rstrip("/")
        app[_BASE_PATH] = base
        app[REFUSAL] = self.refuse_request
        app.router.add_post(f"{base}/$process-message", self.process_message)
        if self.c.config.server.max_batch_entries > 0:
            app.router.add_post(base or "/", self.process_batch)
            if base:
                app.router.add_post(f"{base}/", self.process_batch)
        app.router.add_get(f"{base}/metadata", self.metadata)
        consents = ConsentAPI(self)
        app.router.add_post(f"{base}/Consent", consents.create)
        app.router.add_put(f"{base}/Consent/{{id}}", consents.update)
        # GET only on what answers with records or signs (a HEAD would do the work and
        # audit it for an answer nobody receives); metadata answers HEAD too.
        app.router.add_get(f"{base}/Consent/{{id}}", consents.read, allow_head=False)
        self.pull = PullAPI(self)
        self.pull.register(app, base)
        AuditExchangeAPI(self).register(app, base)
        from bridge.link.sync import SyncAPI

        SyncAPI(self).register(app, base)

        async def flush_refusals(_app: web.Application) -> None:
            await self.peer_refusals.close()

        app.on_cleanup.append(flush_refusals)
        return app

    # --- helpers ----------------------------------------------------------------------

    def _peer(self, request: web.Request) -> Peer:
        """The peer :func:`peer_gate` verified for this request (checked again if absent)."""
        if PEER in request:
            return request[PEER]
        return self.identify(request)

    def identify(self, request: web.Request) -> Peer:
        """Check the connection's client certificate for this request and say whose it is.

        Raises :class:`CertificateRejected` (expired, not yet valid, revoked) or
        :class:`UnknownPartner` (no certificate, or one that names no registered
        partner and is not a pinned certificate of this controller's own systems).
        """
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise UnknownPartner("no client certificate on this connection", location="TLS")
        identity = self.peer_check.check(der, self.c.clock())
        if identity.partner_id == self.c.id:
            pins = self.c.config.server.local_client_fingerprints
            if pins and not pinned(identity.fingerprint_sha256, pins):
                raise UnknownPartner(
                    "certificate names this controller but is not a pinned local client",
                    location="TLS.client-certificate",
                )
            return Peer(None, identity.fingerprint_sha256)
        return Peer(self.c.partners.identify(der), identity.fingerprint_sha256)

    def _peer_partner(self, request: web.Request) -> Partner:
        """The registered partner of this request; this controller's own systems are not one."""
        partner = self._peer(request).partner
        if partner is None:
            raise UnknownPartner(
                "certificate names this controller, not a partner", location="TLS.client-certificate"
            )
        return partner

    def _caller(self, request: web.Request) -> str | None:
        """``None`` for this controller's own systems, else the partner id of the peer.

        The controller's own systems (its HIS, its patient app back end) connect with a
        client certificate issued to the controller itself; anything else must be a
        registered partner.
        """
        partner = self._peer(request).partner
        return partner.id if partner is not None else None

    async def _refuse(
        self,
        exc: BridgeError,
        *,
        partner: str | None,
        subject: str,
        patient: str | None = None,
        action: str = "message.reject",
    ) -> web.Response:
        self.stats["rejected"] += 1
        await self.c.db.append_audit(
            self.c.audit(
                action,
                subject=subject,
                outcome="denied" if isinstance(exc, (TrustError, PolicyError)) else "failure",
                partner=partner,
                patient=patient,
                detail=refusal_detail(exc),
            )
        )
        log.info("refused %s from %s: %s", subject, partner or "unknown partner", exc)
        refusal_event(self.c, "receive", exc, partner=partner, subject=subject)
        return outcome_response(exc)

    async def _refuse_peer(
        self, exc: TrustError, request: web.Request, *, partner: str | None = None,
        subject: str | None = None,
    ) -> web.Response:
        """401 for a request whose certificate is not (or no longer) a partner's, or is
        a partner's without a link for this route: audited within
        :class:`PeerRefusals`' bounds, and the connection closed. A certificate refused
        once is refused on every request, so the client gets to try again only with a
        new handshake."""
        self.stats["rejected"] += 1
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        fingerprint = f"sha256:{hashlib.sha256(der).hexdigest()}" if der else None
        subject = subject or _route_name(request)
        detail = refusal_detail(exc)
        if await self.peer_refusals.refused(detail, fingerprint, subject, partner):
            # Logged as audited: once per certificate and error in a window.
            log.info("refused %s from %s: %s", subject, partner or "a certificate of no partner",
                     exc)
            refusal_event(self.c, "receive", exc, partner=partner, subject=subject)
        response = outcome_response(exc)
        response.force_close()
        return response

    async def refuse_request(self, request: web.Request, exc: BridgeError) -> web.Response:
        """Answer, audit and log a refusal of ``request`` made outside a handler's own
        checks (an ``Expect`` it does not understand, an error a handler raised): as the
        handlers refuse, naming the partner when the connection's certificate is one's."""
        try:
            peer = self._peer(request)
        except TrustError as trust:
            return await self._refuse_peer(trust, request)
        if isinstance(exc, TrustError):
            return await self._refuse_peer(
                exc, request, partner=peer.partner.id if peer.partner else None)
        return await self._refuse(exc, partner=peer.partner.id if peer.partner else None,
                                  subject=_route_name(request))

    async def _audit_peer_refusal(
        self, detail: str, fingerprint: str | None, subject: str, partner: str | None
    ) -> None:
        await self.c.db.append_audit(
            self.c.audit("message.reject", subject=subject, outcome="denied", partner=partner,
                         detail=detail, digest_value=fingerprint)
        )

    # --- handlers ---------------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            caller = self._caller(request)
        except TrustError as exc:
            return await self._refuse(exc, partner=None, subject="metadata")
        return web.Response(
            body=orjson.dumps(capability_statement(self.c, caller)), content_type=FHIR_JSON
        )

    async def _inbound_peer(
        self, request: web.Request
    ) -> tuple[Partner, LinkConfig] | web.Response:
        """The calling partner (from its certificate) and its inbound link here, or the
        refusal to answer: no certificate, no partner or an ambiguous one; no link."""
        try:
            partner = self._peer_partner(request)
        except TrustError as exc:
            return await self._refuse(exc, partner=None, subject="connection")
        link = self.c.inbound_link_for(partner.id)
        if link is None:
            return await self._refuse_peer(
                UnknownPartner("partner has no inbound link here", location="links"),
                request, partner=partner.id, subject="connection",
            )
        return partner, link

    async def process_message(self, request: web.Request) -> web.Response:
        peer = await self._inbound_peer(request)
        if isinstance(peer, web.Response):
            return peer
        partner, link = peer
        try:
            from bridge.link.sync import read_sequence

            sequence = read_sequence(request.headers)
            if sequence is not None:
                await self.streams.admit(self.c.db, partner.id, sequence[0])
            if request.content_type not in _ACCEPTED_TYPES:
                raise UnsupportedMediaType(
                    "media type must be application/fhir+json", location="Content-Type"
                )
            body = await read_body(request, self.c.config.server)
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject="request")
        return await self._process_one(partner, link, body, sequence)

    async def _process_one(
        self,
        partner: Partner,
        link: Any,
        body: bytes,
        sequence: tuple[str, int] | None,
        bundle: Any = None,
    ) -> web.Response:
        """Steps 3 to 9 of a message (PROTOCOL §6.1), posted alone or as a batch entry.

        ``bundle``: the message already parsed (a batch entry); ``body`` is then its
        serialised form, which is what the inbox keeps.
        """
        subject = "request"
        try:
            if bundle is None:
                bundle = read_json(body)
            envelope = check_envelope(bundle, accepted_events=ACCEPTED_EVENTS)
            subject = envelope.message_id
            check_addressing(envelope, peer=partner.id, receiver=self.c.id)
            now = self.c.clock()
            # The signer must be the partner the TLS handshake authenticated.
            claims = verify_bundle(
                bundle, self.c.keyring, expected_issuer=partner.id, expected_audience=self.c.id,
                now=now,
            )
            # Nothing is accepted outside this side's data-use agreement.
            check_link(self.c.config, link, now, resource_types=resource_types(bundle))
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject=subject)

        # Only an authentic request is told to come back later: a forged copy of a
        # message in flight is refused for what it is.
        key = (partner.id, envelope.message_id)
        flight = self._in_flight.get(key)
        if flight is not None:
            return await self._in_progress(flight, partner.id, envelope.message_id)
        flight = self._in_flight[key] = _Flight()
        try:
            return await self._accept(
                bundle, body, envelope.message_id, partner, link.profile, claims, now,
                sequence=sequence,
            )
        finally:
            del self._in_flight[key]
            if flight.refused > 1:
                await self._audit_in_progress(partner.id, envelope.message_id, flight.refused - 1)

    async def process_batch(self, request: web.Request) -> web.Response:
        """``POST [base]`` with a batch of messages (PROTOCOL §6b).

        The request as a whole is checked for who sends it (as a single message is),
        its media type, size (``max_batch_bytes``), entry count (``max_batch_entries``)
        and form; then every entry is processed exactly as a message POSTed alone,
        concurrently, so that the accepted ones share the store's commit. An entry's
        refusal never touches another entry; the answer has one entry per request
        entry, in order, each receipt only after its own commit.
        """
        peer = await self._inbound_peer(request)
        if isinstance(peer, web.Response):
            return peer
        partner, link = peer
        server = self.c.config.server
        try:
            if request.content_type not in _ACCEPTED_TYPES:
                raise UnsupportedMediaType(
                    "media type must be application/fhir+json", location="Content-Type"
                )
            body = await read_body(request, server, limit=server.max_batch_bytes)
            # The batch wraps each message three levels deeper: a message nested as deep
            # as one alone may be is taken; one deeper makes the body deeper than this.
            entries = read_batch(read_json(body, nesting=MAX_NESTING + ENTRY_DEPTH),
                                 max_entries=server.max_batch_entries)
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject="batch")
        # Entries are processed concurrently, but two copies of one message identity
        # in one batch are taken in order: the later copy is judged once the earlier
        # one is settled, as if posted after it (its original receipt, or 422 for
        # other content), never told that its own batch neighbour is in flight.
        last: dict[str, asyncio.Task[web.Response]] = {}
        tasks: list[asyncio.Task[web.Response]] = []
        for entry in entries:
            identity = _entry_identity(entry)
            before = last.get(identity) if identity is not None else None
            task = asyncio.ensure_future(self._batch_entry(partner, link, entry, after=before))
            if identity is not None:
                last[identity] = task
            tasks.append(task)
        answers = await asyncio.gather(*tasks)
        return web.Response(
            body=encode_batch_response([(a.status, a.body) for a in answers]),  # type: ignore[misc]
            content_type=FHIR_JSON,
        )

    async def _batch_entry(
        self, partner: Partner, link: Any, entry: BatchEntry,
        after: asyncio.Task[web.Response] | None = None,
    ) -> web.Response:
        """One entry of a batch, answered as :meth:`process_message` would answer it
        alone; a failure of this entry is this entry's answer only. ``after``: an
        earlier entry of the same identity, settled first."""
        from bridge.link.sync import read_sequence

        if after is not None:
            await asyncio.wait({after})

        where = f"Bundle.entry[{entry.index}]"
        try:
            if entry.error is not None:
                raise entry.error
            try:
                sequence = read_sequence(entry.headers)
                if sequence is not None:
                    await self.streams.admit(self.c.db, partner.id, sequence[0])
            except BridgeError as exc:
                exc.location = f"{where}.extension"
                raise
            body = orjson.dumps(entry.message)
            if len(body) > self.c.config.server.max_body_bytes:
                raise PayloadTooLarge(
                    f"message larger than this bridge accepts ({self.c.config.server.max_body_bytes}"
                    " bytes)", location=f"{where}.resource",
                )
        except BridgeError as exc:
            return await self._refuse(exc, partner=partner.id, subject=f"batch:{where}")
        try:
            return await self._process_one(partner, link, body, sequence, entry.message)
        except BridgeError as exc:
            log.error("batch entry failed: %s", exc)
            return outcome_response(exc)
        except Exception as exc:
            # As the middleware does for a request alone: logged, audited, a 500.
            log.exception("unexpected failure handling a batch entry")
            await self.c.db.append_audit(self.c.audit(
                "request.failed", subject="batch", outcome="failure",
                detail=f"{type(exc).__name__}@{where}",
            ))
            return outcome_response(
                InternalError("internal error; nothing was stored", location=where)
            )

    async def _in_progress(self, flight: _Flight, partner: str, message_id: str) -> web.Response:
        """409, audited: the first copy gets its own entry; the rest are counted and
        recorded in one entry when the message in flight is done."""
        flight.refused += 1
        if flight.refused == 1:
            await self._audit_in_progress(partner, message_id, 1)
        return outcome_response(
            InFlightError("message is still being processed", location="Bundle.identifier")
        )

    async def _audit_in_progress(self, partner: str, message_id: str, count: int) -> None:
        await self.c.db.append_audit(
            self.c.audit(
                "message.in-progress",
                subject=message_id,
                outcome="failure",
                partner=partner,
                detail=f"message-in-progress@Bundle.identifier count={count}",
            )
        )

    async def _accept(
        self,
        bundle: dict[str, Any],
        body: bytes,
        message_id: str,
        partner: Partner,
        profile_name: str,
        claims: SignedClaims,
        now: datetime,
        *,
        sequence: tuple[str, int] | None = None,
    ) -> web.Response:
        c = self.c
        # A message held already is answered from the inbox (its receipt, or 422 for other
        # content under its identity). Most messages are new, so the content is judged
        # first and the inbox is asked only where the answer could depend on it: on a
        # refusal (a held message gets its receipt instead), and in the accept itself,
        # which finds a held one.
        patient: str | None = None
        try:
            empty = empty_value(body, bundle)
            if empty is not None:
                raise ValidationError("not valid FHIR R4: an empty value (null, \"\", [] or {})",
                                      location=empty)
            validate_message(bundle, parsed=True)  # as read_json returned it
            # Only a validated bundle is read for its patient: a malformed one is refused
            # (and audited) as invalid FHIR, and one without a Patient as unmappable.
            patient = c.pseudonym(patient_identifiers(bundle))
            profile = c.profiles.get(_inbound_link_id(c, partner.id))
            if profile is not None:
                outside = profile.check(collection_of(bundle))
                if outside:
                    raise ProfileError(
                        "message carries elements outside the link profile",
                        location=outside[0],
                    )
        except BridgeError as exc:
            existing = await c.db.inbox_lookup(partner.id, message_id)
            if existing is not None:
                return await self._held(existing, bundle, message_id, partner, claims, now,
                                        sequence=sequence)
            return await self._refuse(exc, partner=partner.id, subject=message_id, patient=patient)

        from bridge.link.sync import recording_hook

        def build_receipt(entry: Any) -> bytes:
            receipt = make_receipt(
                request_message_id=message_id,
                request_digest=claims.payload_digest,
                outcome="ok",
                receiver=c.id,
                sender=partner.id,
                audit_seq=entry.seq,
                audit_hash=entry.hash,
                signer=c.signer_for(_inbound_link_id(c, partner.id)),
                now=now,
                **c.receipt_checkpoint(entry, now),
            )
            return orjson.dumps(receipt)

        try:
            row, created = await c.db.inbox_accept(
                sender=partner.id,
                message_id=message_id,
                digest=claims.payload_digest,
                payload=body,
                audit=c.audit(
                    "message.receive",
                    subject=message_id,
                    partner=partner.id,
                    patient=patient,
                    categories=resource_types(bundle),
                    digest_value=claims.payload_digest,
                    now=now,
                ),
                make_receipt=build_receipt,
                now=now,
                # Queued for hand-off to this controller's own systems in the same
                # transaction: a claim acknowledged with a receipt is always queued.
                within=recording_hook(
                    sequence, sender=partner.id, now=now,
                    also=queue_hook(
                        c.handoff_routes, sender=partner.id,
                        link=_inbound_link_id(c, partner.id), now=now,
                    ),
                ),
            )
        except ConflictError as exc:
            # The identity is held with other bytes: the same content signed under the
            # other protocol version is a duplicate, anything else a conflict.
            existing = await c.db.inbox_lookup(partner.id, message_id)
            if existing is not None:
                return await self._held(existing, bundle, message_id, partner, claims, now,
                                        sequence=sequence)
            return await self._refuse(exc, partner=partner.id, subject=message_id, patient=patient)
        except StoreError as exc:
            # Nothing was stored and nothing is acknowledged: the sender retries.
            log.error("store failed while accepting %s: %s", message_id, exc)
            return outcome_response(exc)
        if not created:
            return await self._held(row, bundle, message_id, partner, claims, now,
                                    sequence=sequence)
        self.stats["accepted"] += 1
        c.handled()
        return web.Response(body=row.receipt, content_type=FHIR_JSON)

    async def _held(
        self,
        existing: Any,
        bundle: dict[str, Any],
        message_id: str,
        partner: Partner,
        claims: SignedClaims,
        now: datetime,
        *,
        sequence: tuple[str, int] | None,
    ) -> web.Response:
        """Answer a message whose identity the inbox holds: its original receipt when the
        content is the same (audited as a duplicate), 422 when it differs."""
        c = self.c
        if sequence is not None:
            from bridge.ledger.sync import note_received

            await c.db.call(
                note_received, c.db.sync, sender=partner.id, stream=sequence[0],
                seq=sequence[1], message_id=message_id, now=now,
            )
        # The same content whichever protocol version signed it (PROTOCOL §6.3).
        if existing.digest != claims.payload_digest and existing.digest not in (
            payload_digests(bundle)
        ):
            return await self._refuse(
                ConflictError(
                    "message identity reused with different content",
                    location="Bundle.identifier",
                ),
                partner=partner.id,
                subject=message_id,
            )
        self.stats["duplicates"] += 1
        await c.db.append_audit(
            c.audit(
                "message.duplicate",
                subject=message_id,
                partner=partner.id,
                digest_value=claims.payload_digest,
            )
        )
        return web.Response(body=existing.receipt, content_type=FHIR_JSON)


def _entry_identity(entry: BatchEntry) -> str | None:
    """The message identity a batch entry claims (``Bundle.identifier.value``), before
    any check: only used to keep two copies of one identity in order."""
    message = entry.message
    ident = message.get("identifier") if isinstance(message, dict) else None
    value = ident.get("value") if isinstance(ident, dict) else None
    return value if isinstance(value, str) else None


def peer_gate(receiver: ReceiverApp) -> Any:
    """Middleware: every request's client certificate is checked again (PROTOCOL P-TLS-7).

    Whatever the route, a request whose connection certificate has expired, is not yet
    valid or has been revoked since the handshake gets 401 ``certificate-rejected`` and
    the connection is closed; one whose certificate names no registered partner (and is
    not a pinned certificate of this controller's own systems) gets 401
    ``unknown-partner``. Both are audited. Handlers read the verified peer from
    ``request[PEER]``.
    """

    @web.middleware
    async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.transport is None:
            # The connection ended between the request's head and this handler: aiohttp
            # ends the body of a request on a lost connection only once its handler has
            # started (from here on). Nobody waits for an answer; nothing is audited.
            raise ClientGone()
        try:
            request[PEER] = receiver.identify(request)
        except TrustError as exc:
            return await receiver._refuse_peer(exc, request)
        return await handler(request)  # type: ignore[no-any-return]

    return gate


def _route_name(request: web.Request) -> str:
    """The route of a request without any value from its path (``Consent/{id}``);
    ``unrouted`` for a path no route serves (it is whatever the client sent)."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unrouted"
    base = request.app.get(_BASE_PATH, "")
    return resource.canonical.removeprefix(base).lstrip("/") or "request"



def outcome_on_failure(receiver: ReceiverApp) -> Any:
    """Middleware: answer every failure as a FHIR OperationOutcome, never as plain text.

    Routing errors (404, 405) keep their status. A failure the handlers did not turn
    into an answer is logged with its traceback and answered 5xx without any detail
    that could carry data, and audited as ``request.failed``: no 5xx goes unrecorded.
    """

    async def record_failure(request: web.Request, code: str) -> None:
        try:
            await receiver.c.db.append_audit(
                receiver.c.audit(
                    "request.failed",
                    subject=_route_name(request),
                    outcome="failure",
                    detail=f"{code}@{request.method}",
                )
            )
        except Exception:  # the store itself may be what failed
            log.exception("could not record a failed request")

    @web.middleware
    async def outcomes(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # The path is whatever the client sent: named by its route, never echoed.
            err = BridgeError(exc.reason or "request refused", location=_route_name(request))
            # A 405 says which methods the resource answers (RFC 9110 §15.5.6).
            allow = exc.headers.get("Allow")
            return web.Response(
                status=exc.status,
                body=orjson.dumps(err.to_operation_outcome()),
                content_type=FHIR_JSON,
                headers={"Allow": allow} if allow is not None else None,
            )
        except ClientGone:
            log.debug("%s %s: the client went away mid-request", request.method,
                      _route_name(request))
            response = web.Response(status=400)
            response.force_close()
            return response
        except BridgeError as exc:
            if exc.http_status < 500:
                # The request's fault, not this bridge's: a refusal like any other.
                return await receiver.refuse_request(request, exc)
            # E.g. the store failing: 503, the sender retries later.
            log.error("%s %s failed: %s", request.method, _route_name(request), exc)
            await record_failure(request, exc.code)
            return outcome_response(exc)
        except Exception as exc:
            log.exception("unexpected failure handling %s %s", request.method, _route_name(request))
            await record_failure(request, type(exc).__name__)
            return outcome_response(
                InternalError("internal error; nothing was stored", location=_route_name(request))
            )

    return outcomes


def validate_message(bundle: dict[str, Any], *, cache: ValidationCache | None = None,
                     parsed: bool = False) -> None:
    """Validate a received message bundle as FHIR R4, envelope and entries.

    The validation cache gives exactly the verdict of full validation (and on refusal
    full validation's own error, naming ``Bundle.entry[i].resource...``), but checks a
    structure it has accepted before only through the primitive validators.
    ``parsed``: the bundle is what the JSON parser returned (see
    :meth:`ValidationCache.validate`).
    """
    if not isinstance(bundle.get("entry"), list):
        raise ParseError("message has no entries", location="Bundle.entry")
    (cache if cache is not None else validation_cache()).validate(bundle, parsed=parsed)


def _inbound_link_id(c: Controller, partner_id: str) -> str:
    link = c.inbound_link_for(partner_id)
    return link.id if link else ""


# --- consents ----------------------------------------------------------------------------


def _consent_subject(consent_id: Any) -> str:
    """The audit subject of a consent write: ``Consent/ID`` when the id is a FHIR id,
    else ``Consent`` (the text is the caller's, not yet checked, and could be anything)."""
    if is_fhir_id(consent_id):
        return f"Consent/{consent_id}"
    return "Consent"


class ConsentAPI:
    """``POST/PUT/GET [base]/Consent``: register, amend, revoke and read consents.

    The controller's own systems may write any consent. A partner may submit a consent
    it collected (GB/T 39725 §11.7.4.1 b 2) only when it is signed by that partner
    (``X-Signature``: a detached JWS over the exact body, ``msgid`` = ``Consent/<id>``)
    and names that partner, and no one else, as recipient; it is recorded as
    partner-submitted. Every write and every refusal is audited.
    """

    def __init__(self, receiver: ReceiverApp) -> None:
        self.r = receiver
        self.c = receiver.c

    async def _read_consent(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        if request.content_type not in _ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                "media type must be application/fhir+json", location="Content-Type"
            )
        body = await read_body(request, self.c.config.server)
        resource = read_json(body)
        if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
            raise ParseError("body is not a FHIR Consent", location="Consent.resourceType")
        return body, resource

    def _check_partner_submission(
        self, request: web.Request, partner: str, body: bytes, resource: dict[str, Any]
    ) -> str:
        signature = request.headers.get("X-Signature")
        if not signature:
            raise SignatureError(
                "a partner-submitted consent must be signed", location="X-Signature"
            )
        claims = verify_detached_bytes(
            signature,
            body,
            self.c.keyring,
            expected_issuer=partner,
            expected_audience=self.c.id,
            now=self.c.clock(),
        )
        if claims.message_id != f"Consent/{resource.get('id')}":
            raise SignatureError("signature is for another consent", location="X-Signature#msgid")
        # Partner-submitted consents live in the partner's own id namespace, so a
        # partner can never create or amend a consent this controller's systems wrote
        # (such as one the patient revoked at the hospital).
        if not str(resource.get("id", "")).startswith(f"{partner}."):
            raise PolicyError(
                "a partner-submitted consent's id starts with the partner id and a dot",
                location="Consent.id",
            )
        record = parse_consent(resource)
        recipients = _permit_recipients(record.provision)
        if recipients != {partner}:
            raise PolicyError(
                "a partner may only submit consents that name itself as the only recipient",
                location="Consent.provision.actor",
            )
        # A partner's word is consent for disclosures to itself only where a link says
        # it collects consents, and only for the purposes the link names (PROTOCOL
        # P-CON-6).
        purposes = frozenset(
            p for link in self.c.config.links if link.partner == partner
            for p in link.partner_consent_purposes
        )
        if not purposes:
            raise PolicyError(
                "this controller takes no consents from this partner"
                " (links.partner_consent_purposes)",
                location="Consent",
            )
        unbounded = unbounded_permit(record.provision, purposes)
        if unbounded is not None:
            raise PolicyError(
                "a partner-submitted consent permits only purposes its links take consents"
                " for, and names them",
                location=unbounded,
            )
        return signature

    async def _write(self, request: web.Request, *, consent_id: str | None) -> web.Response:
        c = self.c
        try:
            caller = self.r._caller(request)
        except TrustError as exc:  # no certificate, no partner, or an ambiguous one
            return await self.r._refuse(exc, partner=None, subject="consent")
        subject = _consent_subject(consent_id)
        try:
            body, resource = await self._read_consent(request)
            if consent_id is None:
                resource.setdefault("id", uuid.uuid4().hex)
            elif resource.get("id") != consent_id:
                raise ParseError("Consent.id differs from the id in the URL", location="Consent.id")
            subject = _consent_subject(resource["id"])
            source = "local"
            if caller is not None:
                signature = self._check_partner_submission(request, caller, body, resource)
                # Reusing an id must not let a partner replace a consent given to
                # someone else (or to several recipients, itself among them).
                existing = await c.db.get_consent(resource["id"])
                if existing is not None:
                    held = parse_consent(orjson.loads(existing.resource))
                    if _permit_recipients(held.provision) != {caller}:
                        raise PolicyError(
                            "a partner may only amend consents that name itself as the only"
                            " recipient",
                            location="Consent.id",
                        )
                source = f"partner:{caller} jws:{signature}"
                # Marked as the partner's: it counts only where the partner's links
                # take its consents (bridge.policy.consent_rules).
                meta = resource.get("meta")
                resource["meta"] = {**(meta if isinstance(meta, dict) else {}),
                                    "source": f"{PARTNER_SOURCE}{caller}"}
            stored_id = await c.put_consent(resource, source=source)
        except BridgeError as exc:
            return await self.r._refuse(exc, partner=caller, subject=subject)
        status = 201 if consent_id is None else 200
        location = f"{c.config.server.base_path.rstrip('/')}/Consent/{stored_id}"
        return web.Response(
            status=status,
            body=orjson.dumps(resource),
            content_type=FHIR_JSON,
            headers={"Location": location},
        )

    async def create(self, request: web.Request) -> web.Response:
        return await self._write(request, consent_id=None)

    async def update(self, request: web.Request) -> web.Response:
        return await self._write(request, consent_id=request.match_info["id"])

    async def read(self, request: web.Request) -> web.Response:
        caller = self.r._caller(request)
        if caller is not None:
            return await self.r._refuse(
                PolicyError("consents are readable by this controller only", location="Consent"),
                partner=caller, subject="Consent",
            )
        row = await self.c.db.get_consent(request.match_info["id"])
        if row is None:
            return outcome_response(NotFound("no such consent", location="Consent.id"))
        return web.Response(body=row.resource, content_type=FHIR_JSON)


def _permit_recipients(provision: Any) -> set[str]:
    found: set[str] = set(provision.recipients) if provision.type == "permit" else set()
    for child in provision.children:
        found |= _permit_recipients(child)
    return found
