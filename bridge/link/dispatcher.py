"""The sending side: drain an outbound link's outbox over mutual TLS.

For every due outbox row the dispatcher asks the consent question again (a consent
can be revoked while a message waits), POSTs the signed message, verifies the signed
receipt and only then marks the row acknowledged. Failures are classified before
anything is retried:

* a definitive rejection (4xx other than 408/409/429) is recorded and never retried;
* a transient failure (connection refused or reset, timeout, 408, 409, 429, 5xx) is
  retried a few times at once with tenacity, then rescheduled in the outbox;
* a certificate problem (our certificate refused, theirs not trusted) is a
  configuration fault, not a blip: the link pauses and an operator is told.

Whether the partner is up is the link's business, not each claim's: transient
failures of the link open its circuit (:mod:`bridge.link.circuit`), which then lets one
probe through at a time with capped exponential backoff (and no sooner than a
``Retry-After`` the partner sent); the probe's success closes it and makes the whole
backlog due at once. A claim is given up (``dead``) only when it has been pending for
the link's ``give_up_after``, never by a count of attempts, and never while its fate is
unknown: a claim that may have reached the partner without an answer keeps being
resent until the partner answers, with its original receipt if it holds the claim.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from bridge.batch import ENTRY_OVERHEAD, BatchOffer, batch_offer, encode_batch, read_batch_response
from bridge.config import LinkConfig
from bridge.errors import (
    BridgeError,
    ParseError,
    PartnerRejected,
    PolicyError,
    SignatureError,
    TransportError,
    TrustError,
)
from bridge.ledger.delivery import release_backlog
from bridge.ledger.errors import TransitionError
from bridge.ledger.states import next_attempt, should_give_up
from bridge.link.circuit import Circuit, CircuitState
from bridge.link.node import Controller, _decision_detail, _remember, resource_types
from bridge.link.partner_http import (
    RECEIPT_LIMIT,
    PartnerAnswerRefused,
    partner_session,
    read_answer,
)
from bridge.logs import claim_event
from bridge.messages import read_json
from bridge.trust.identity import certificate_identity, pinned
from bridge.trust.jws import digest, payload_digests, sign_bundle
from bridge.trust.receipts import verify_receipt
from bridge.trust.tls import client_context

log = logging.getLogger("bridge.dispatcher")

# A stored signature younger than this is sent as it is; the receiver's window is five
# minutes, which leaves room for clock skew and a slow first attempt.
_FRESH_SECONDS = 60.0
#: Claims queued in this process and not yet taken for sending at which the intake
#: waits for its dispatcher (see :meth:`Dispatcher.room`): eight requests of 32.
BACKLOG_HIGH = 256
#: The longest a claim's intake waits for room.
INTAKE_HOLD = 0.5
#: Claims tracked as not yet taken, at most (a partner down for long: nothing is held
#: then, and the outbox, not this set, keeps them).
UNTAKEN_TRACKED = 4 * BACKLOG_HIGH
#: A claim queued longer ago than this no longer counts as waiting to be taken.
UNTAKEN_SECONDS = 5.0


class CertificateFault(BridgeError):
    """A TLS certificate problem between the two bridges; retrying will not fix it."""

    code = "tls-certificate-fault"
    http_status = 502
    fault = "local"


class PartnerConnector(aiohttp.TCPConnector):
    """A connector that sends nothing to a server whose certificate is not the partner's.

    The CA and the host name are checked by the TLS context; this adds the partner
    binding of PROTOCOL §2: the server's certificate must name the link's partner in
    its URI SAN (and match a pinned fingerprint when the partner has any). The check
    runs on the finished handshake, before a byte of the request is written, so a
    server that merely holds some certificate from a trusted CA never sees a claim.
    """

    def __init__(self, *, expected_partner: str, fingerprints: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expected_partner = expected_partner
        self._fingerprints = fingerprints

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            identity = certificate_identity(der) if der else None
        except TrustError:
            identity = None
        if (
            identity is None
            or identity.partner_id != self._expected_partner
            or (self._fingerprints and not pinned(identity.fingerprint_sha256, self._fingerprints))
        ):
            transport.close()
            raise CertificateFault(
                "the server's certificate does not name the link's partner",
                location="TLS.server-certificate",
            )
        return transport, protocol


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        inner = getattr(cur, "os_error", None) or getattr(cur, "certificate_error", None)
        if isinstance(inner, ssl.SSLError):
            return inner
        cur = cur.__cause__ or cur.__context__
    return None


def classify_exception(exc: BaseException) -> BridgeError:
    """Map an aiohttp/ssl exception to a bridge error that says whether to retry."""
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return CertificateFault(f"TLS certificate fault: {type(exc).__name__}", location="TLS")
    cause = _ssl_cause(exc)
    if (
        cause is not None
        and cause.reason
        and ("CERTIFICATE" in cause.reason.upper() or "ALERT" in cause.reason.upper())
    ):
        return CertificateFault(f"TLS certificate fault: {cause.reason}", location="TLS")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return TransportError("partner did not answer in time", location="HTTP")
    return TransportError(f"partner unreachable: {type(exc).__name__}", location="HTTP")


def _is_transient(exc: BaseException) -> bool:
    return (
        isinstance(exc, BridgeError)
        and exc.fault == "transient"
        and not isinstance(exc, CertificateFault)
    )


def _quick_retry(exc: BaseException) -> bool:
    # A partner that said when to come back is not asked again at once.
    return _is_transient(exc) and not (
        isinstance(exc, BridgeError) and exc.detail.get("retry_after") is not None
    )


def _never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached the partner (no connection was made)."""
    if isinstance(exc, CertificateFault):
        return True  # refused at the handshake, before a byte of the request
    connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", None)
    if connect_timeout is not None and isinstance(exc, connect_timeout):
        return True
    return isinstance(exc, aiohttp.ClientConnectorError)


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from ``now``.

    Bounded to one hour, so a wrong header cannot stall a link for days; None when
    absent or unreadable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), 3600.0)


def _answer(exc: BridgeError) -> str:
    """What the partner answered, for the outbox and the operator: codes, never values."""
    status = exc.detail.get("status")
    if status is not None:
        remote = exc.detail.get("remote_code")
        return f"HTTP {status}" + (f" {remote}" if remote else "")
    if isinstance(exc, CertificateFault):
        return "no answer: TLS certificate fault"
    return f"no answer: {exc.message}"


@dataclass
class LinkStats:
    """Counters for one outbound link, shown by the demo and ``bridge status``."""

    acked: int = 0
    rejected: int = 0
    refused: int = 0
    dead: int = 0
    retried: int = 0
    signature_failures: int = 0
    certificate_faults: int = 0
    #: HTTP requests started (each one is a connection attempt when none is open).
    requests: int = 0
    #: Batch requests sent, and the claims they carried.
    batches: int = 0
    batched: int = 0
    #: Seconds from enqueue to verified receipt of the latest deliveries this process
    #: made (at most LATENCIES_KEPT: a bridge that runs for months keeps no more).
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))


#: How many of the latest delivery latencies a link's statistics keep.
LATENCIES_KEPT = 10_000


class Dispatcher:
    """Drains one outbound link."""

    def __init__(
        self,
        controller: Controller,
        link: LinkConfig,
        *,
        poll_interval: float = 1.0,
        quick_retries: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        self.c = controller
        self.link = link
        partner = controller.config.partner(link.partner)
        if not partner.base_url:
            raise BridgeError("outbound link has no partner base_url", location=f"links.{link.id}")
        self.base_url = partner.base_url.rstrip("/")
        self.url = self.base_url + "/$process-message"
        self.poll_interval = poll_interval
        self.quick_retries = quick_retries
        self.rng = rng or random.Random()
        self.stats = LinkStats()
        self.paused_reason: str | None = None
        self._paused_until = 0.0
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        # Reloaded in place on SIGHUP (BridgeService.reload_certificates): connections
        # opened afterwards present the new certificate.
        self.client_context: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sem = asyncio.Semaphore(link.concurrency)
        self._sending: set[asyncio.Task[None]] = set()
        # When each claim queued here was queued, for the receipt latency; forgotten at
        # its final state (acknowledged, rejected, refused, dead-lettered).
        self._enqueued_at: dict[str, float] = {}
        # Claims queued in this process and not yet taken for sending, with when each
        # was queued, oldest first (see room()); and when the dispatcher last took some
        # (event loop times).
        self._untaken: dict[str, float] = {}
        self._took_at = -1e9
        # Claims taken lately: one may be taken before its submission returns and is
        # recorded as untaken (it must not be counted then), oldest first.
        self._taken: dict[str, None] = {}
        # Set (and replaced) each time the dispatcher takes claims: what waits in room()
        # looks again then, rather than on a clock.
        self._took = asyncio.Event()
        # A store that several processes dispatch from (PostgreSQL): claims queued here
        # may be taken by another, so what waits here cannot be counted here.
        self._gated = getattr(controller.store, "dispatch_here", None) is None
        #: Set when the service stops: nothing waits for a dispatcher about to stop.
        self.closing = False
        self.circuit = Circuit(base=link.retry_base_seconds, cap=link.probe_cap_seconds)
        self.give_up_after = timedelta(seconds=link.give_up_after)
        # The partner's batch offer (PROTOCOL §6b), read from its CapabilityStatement
        # and trusted until ``_offer_until`` (event loop time).
        self.offer: BatchOffer | None = None
        self._offer_until = 0.0
        self._offer_read = False
        self._offer_task: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the link's HTTP session and start draining the outbox."""
        self.closing = False
        await self.open()
        await self.c.hold_dispatch()  # marked as sending before it leases anything
        dispatch_here = getattr(self.c.store, "dispatch_here", None)
        if dispatch_here is not None:  # a store shared by processes: own claims first
            dispatch_here(self.link.id)
        self._task = asyncio.create_task(self._run(), name=f"dispatch:{self.link.id}")

    def session(self) -> aiohttp.ClientSession:
        """The link's HTTP session (mutual TLS, partner-bound); :meth:`open` first."""
        if self._session is None:
            raise BridgeError("link is not open", location=f"links.{self.link.id}")
        return self._session

    async def open(self) -> None:
        """Open the HTTP session only (resends and reconciliation without draining)."""
        tls = self.c.config.tls
        partner = self.c.config.partner(self.link.partner)
        self.client_context = client_context(tls.cert, tls.key, partner.tls_ca or tls.ca)
        self._session = partner_session(
            self.c.config, self.link.partner, timeout=self.link.request_timeout_seconds,
            limit=self.link.concurrency, ssl_context=self.client_context,
        )

    def reload_tls(self) -> None:
        """Load this bridge's TLS certificate and the partner's CA bundle again into the
        link's context: connections opened afterwards present the new certificate."""
        if self.client_context is None:
            return
        tls = self.c.config.tls
        partner = self.c.config.partner(self.link.partner)
        self.client_context.load_cert_chain(tls.cert, tls.key)
        self.client_context.load_verify_locations(cafile=str(partner.tls_ca or tls.ca))

    async def stop(self) -> None:
        """Stop at once: claims in flight are released for the next start to resend.

        Sends in flight are cancelled rather than awaited (a partner that does not
        answer would hold the stop for the request timeout); each releases its row,
        with its fate unknown. A cancellation of ``stop`` itself is not swallowed.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        if self._offer_task is not None:
            self._offer_task.cancel()
            await asyncio.wait([self._offer_task])
        sending = list(self._sending)
        for task in sending:
            task.cancel()
        if sending:
            await asyncio.wait(sending)
        if self._session is not None:
            await self._session.close()

    def wake(self, message_id: str | None = None, *, queued: bool = False) -> None:
        """Tell the dispatcher new work is due (enqueue or resend); ``queued``: the claim
        ``message_id`` was queued just now (not found queued or sent before)."""
        if message_id is not None:
            now = asyncio.get_running_loop().time()
            self._enqueued_at.setdefault(message_id, now)
            if (queued and self._gated and len(self._untaken) < UNTAKEN_TRACKED
                    and message_id not in self._taken):
                self._untaken[message_id] = now
        self._wake.set()

    async def room(self) -> None:
        """Wait, at most :data:`INTAKE_HOLD` seconds, while this process's dispatcher is
        behind on this link: :data:`BACKLOG_HIGH` or more claims queued here wait to be
        taken for sending, while it is taking claims (it took some within the last
        second) and the partner answers (circuit closed, link not paused).

        The intake and the dispatcher of one process share its CPU. Queued as fast as
        they come, claims would wait in the outbox while the partner's side has nothing
        to do, and then be sent while the intake has nothing left to do; at a few
        hundred waiting, each one queued costs more to send (it is read back from the
        store rather than kept in memory). Held back a moment, the intake leaves the
        dispatcher its share and both bridges work at once.

        Nothing is refused here, and nothing waits longer than the hold (per link a
        record is routed to). Nothing waits while the partner is down (circuit open or
        probing: the outbox takes what comes, as ever), while the link is paused or the
        service stops, or on a store several processes dispatch from (another process
        may take the claims queued here, so this one cannot count what waits)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTAKE_HOLD
        while len(self._untaken) >= BACKLOG_HIGH:
            now = loop.time()
            # A claim waiting longer than this no longer counts (it may have gone some
            # way this process did not see): the count errs on the short side.
            untaken = self._untaken
            while untaken and next(iter(untaken.values())) < now - UNTAKEN_SECONDS:
                del untaken[next(iter(untaken))]
            if (len(untaken) < BACKLOG_HIGH or self.paused_reason is not None or self.closing
                    or self.circuit.state is not CircuitState.CLOSED
                    or now - self._took_at >= 1.0 or now >= deadline):
                return
            try:
                # Woken when claims are taken; a tenth of a second at most, for a
                # circuit that opened or a service that stops meanwhile.
                await asyncio.wait_for(self._took.wait(), min(0.1, deadline - now))
            except TimeoutError:
                pass

    def resume(self) -> None:
        self.paused_reason = None
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self.paused_reason is not None:
                if asyncio.get_running_loop().time() < self._paused_until:
                    await self._sleep(self.poll_interval * 5)
                    continue
                # Probe again: the partner may have renewed its certificate meanwhile.
                log.warning("link %s: retrying after a certificate fault", self.link.id)
                self.paused_reason = None
            free = self.link.concurrency - len(self._sending)
            if free <= 0:
                await asyncio.wait(self._sending, return_when=asyncio.FIRST_COMPLETED)
                continue
            loop_now = asyncio.get_running_loop().time()
            permits = self.circuit.permits(loop_now)
            if permits == 0:
                # The partner is down: nothing goes until the next probe (or an answer
                # to a request still in flight).
                wait = self.circuit.wait(loop_now) or self.poll_interval
                await self._sleep(min(wait, self.poll_interval * 5) if self._sending else wait)
                continue
            probe = permits is not None
            # A probe is one message alone; otherwise as many per request as the
            # partner takes (one where it offers no batches).
            per_request = 1 if probe else await self._per_request()
            try:
                # Consents may have changed in another process since the last batch:
                # taken in with the rows, before any of them is decided on.
                rows = await self.c.claim_due(
                    self.link.id,
                    now=self.c.clock(),
                    limit=(min(free * per_request, max(self.link.batch, per_request))
                           if permits is None else 1),
                    lease=self._lease(),
                )
            except Exception:
                log.exception("outbox read failed on link %s", self.link.id)
                await self._sleep(self.poll_interval)
                continue
            if not rows:
                await self._sleep(self.poll_interval)
                continue
            self._took_at = asyncio.get_running_loop().time()
            for row in rows:
                self._untaken.pop(row.message_id, None)
                _remember(self._taken, row.message_id, None, UNTAKEN_TRACKED)
            took, self._took = self._took, asyncio.Event()
            took.set()
            if probe:
                self.circuit.probe_started()
            for group in self._requests(rows, per_request):
                if len(group) == 1:
                    task = asyncio.create_task(self._deliver(group[0], probe=probe))
                else:
                    task = asyncio.create_task(self._deliver_batch(group))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    def _requests(self, rows: list[Any], per_request: int) -> list[list[Any]]:
        """The claimed rows cut into requests: at most ``per_request`` messages each,
        and within the partner's byte bound."""
        if per_request <= 1 or self.offer is None:
            return [[row] for row in rows]
        groups: list[list[Any]] = []
        size = 0
        for row in rows:
            cost = len(row.payload) + ENTRY_OVERHEAD
            if not groups or len(groups[-1]) >= per_request or size + cost > self.offer.max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(row)
            size += cost
        return groups

    async def _per_request(self) -> int:
        """How many messages go in one request: the partner's batch offer capped by the
        link's ``max_batch_entries``; 1 when the partner makes no offer, or its
        CapabilityStatement cannot be read.

        The offer is read again in the background once it is older than
        ``capability_ttl_seconds`` (the old one holds meanwhile); only the very first
        read is waited for, and at most a second, so that a partner that does not
        answer delays nothing.
        """
        if self.link.max_batch_entries <= 1:
            return 1
        loop = asyncio.get_running_loop()
        if loop.time() >= self._offer_until and self._offer_task is None:
            self._offer_task = loop.create_task(self._refresh_offer())
            if not self._offer_read:
                await asyncio.wait({self._offer_task}, timeout=1.0)
        if self.offer is None:
            return 1
        return max(1, min(self.offer.max_entries, self.link.max_batch_entries))

    async def _refresh_offer(self) -> None:
        try:
            offer = await self._read_offer()
        finally:
            self._offer_task = None
        self._offer_read = True
        self.offer = offer
        ttl = self.link.capability_ttl_seconds
        # A failed read is tried again sooner: the partner may just be restarting.
        self._offer_until = (asyncio.get_running_loop().time()
                             + (ttl if offer is not None else min(ttl, 30.0)))

    async def _read_offer(self) -> BatchOffer | None:
        """``GET [base]/metadata`` over the link's own mutual-TLS session: the batch offer
        of the partner's CapabilityStatement, None when it makes none or the read fails."""
        if self._session is None:
            return None
        try:
            # Bounded well below the request timeout: the drain loop waits for it.
            async with self._session.get(
                self.base_url + "/metadata", headers={"Accept": "application/fhir+json"},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=min(5.0, self.link.request_timeout_seconds)),
            ) as resp:
                body = await read_answer(resp, RECEIPT_LIMIT)
                if resp.status != 200:
                    return None
            return batch_offer(orjson.loads(body))
        except Exception as exc:  # noqa: BLE001 - any failure: one message per request
            log.debug("link %s: partner capabilities not read: %s", self.link.id,
                      type(exc).__name__)
            return None

    def _lease(self) -> timedelta:
        # A claimed row must stay ours for as long as its send can take (every quick
        # retry running to the request timeout, plus their backoff); a shorter lease
        # lets the next poll claim it again and send it twice in parallel.
        send = (self.link.request_timeout_seconds + 1.0) * self.quick_retries
        return max(timedelta(seconds=30), timedelta(seconds=send + 30))

    def _signed_now(self, payload: dict[str, Any], message_id: str, row: Any = None) -> bytes:
        """The stored message with a signature the receiver will find fresh.

        The receiver only accepts signatures from the last few minutes, and a claim may
        wait in the outbox far longer. A claim stored less than a minute ago goes as
        stored; an older one is signed again now. The signed content (and so its digest,
        which the receiver deduplicates on and the receipt names) is unchanged.
        """
        c = self.c
        if row is not None and (c.clock() - row.created).total_seconds() < _FRESH_SECONDS:
            return bytes(row.payload)
        signed = sign_bundle(
            payload,
            c.signer_for(self.link.id),
            issuer=c.id,
            audience=self.link.partner,
            message_id=message_id,
            now=c.clock(),
        )
        return orjson.dumps(signed)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _deliver(self, row: Any, *, probe: bool = False) -> None:
        try:
            await self._deliver_row(row, probe=probe)
        except TransitionError:
            # Another sender settled the row meanwhile (this one's lease ran out and the
            # claim was taken over): its outcome stands, the receiver deduplicated.
            log.info("link %s: seq %s was settled by another sender", self.link.id, row.seq)
        except asyncio.CancelledError:
            # Stopping: give the row back at once (its fate unknown: the request may be
            # out) instead of leaving it leased until the lease runs out.
            await asyncio.shield(self._release(row))
            raise

    async def _release(self, row: Any) -> None:
        try:
            await self.c.db.mark_retry(
                row.message_id, next_attempt=self.c.clock(), error="stopped",
                now=self.c.clock(), audit=None, fate_unknown=True,
            )
        except Exception:  # noqa: BLE001 - settled meanwhile (acked), or the store is gone: the lease recovers it
            log.debug("claim %s not released at stop", row.message_id)

    async def _deliver_row(self, row: Any, *, probe: bool) -> None:
        try:
            payload = await self._cleared(row)
            if payload is None:
                return
            receipt_bytes = await self._post(
                self._signed_now(payload, row.message_id, row), single=probe, seq=row.seq
            )
            self._link_answered()
            await self._acknowledge(row, payload, receipt_bytes)
        except Exception as raw:  # noqa: BLE001 - classified in _settle_failure
            await self._settle_failure(row, raw, probe=probe)

    async def _cleared(self, row: Any) -> dict[str, Any] | None:
        """The row's message, with its consent asked again; None (and the row refused)
        when it no longer holds."""
        c = self.c
        message_id = row.message_id
        payload, raw_sha256 = c.queued_message(message_id, row.payload)
        try:
            c.recheck_consent(payload, self.link, raw=row.payload, raw_sha256=raw_sha256)
        except PolicyError as exc:
            self.stats.refused += 1
            await c.db.mark_refused(
                message_id,
                error=exc.code,
                now=c.clock(),
                audit=c.audit(
                    "claim.refused",
                    subject=message_id,
                    outcome="denied",
                    partner=self.link.partner,
                    detail=f"dispatch:{_decision_detail(exc)}",
                ),
            )
            claim_event("refusal", c, self.link, row, code=exc.code, stage="dispatch")
            self._enqueued_at.pop(message_id, None)
            return None
        return payload

    async def _acknowledge(self, row: Any, payload: dict[str, Any], receipt_bytes: bytes,
                           read: Any = None) -> None:
        """Verify the partner's receipt for ``row`` and only then mark it acknowledged;
        a receipt that fails is a :class:`TransportError` with ``maybe_sent``.

        ``read`` is ``receipt_bytes`` as read already, when they were written from a value
        parsed from JSON (an entry of a batch-response): reading them again gives that
        same value."""
        c = self.c
        message_id = row.message_id
        try:
            # As I-JSON (no member named twice): the bytes kept as evidence must read as
            # the receipt verified, whichever parser reads them later.
            receipt = read_json(receipt_bytes) if read is None else read
            if not isinstance(receipt, dict):
                raise SignatureError("receipt is not a signed Bundle", location="receipt")
            verified = verify_receipt(
                receipt,
                c.keyring,
                expected_issuer=self.link.partner,
                expected_audience=c.id,
                request_message_id=message_id,
                request_digest=c.request_digests(payload),
                now=c.clock(),
                check_time=False,
            )
        except (TrustError, ParseError) as exc:
            self.stats.signature_failures += 1
            code = exc.code
            # The partner answered 200: it may well hold the claim.
            raise TransportError(
                f"receipt failed verification: {code}", location="receipt",
                maybe_sent=True, status=200,
            ) from None
        if verified.outcome != "ok":
            # A signed receipt that does not say ok acknowledges nothing (PROTOCOL
            # P-RCP-5): the claim stays due, and is sent again with its identity.
            raise TransportError(
                f"receipt says {verified.outcome}, not ok", location="receipt.response.code",
                maybe_sent=True, status=200,
            )
        now = c.clock()
        await c.db.mark_acked(
            message_id=message_id,
            receipt=receipt_bytes,
            now=now,
            audit=c.audit(
                "claim.ack",
                subject=message_id,
                partner=self.link.partner,
                categories=resource_types(payload),
                digest_value=row.digest,
                detail=f"receipt audit seq {verified.audit_seq}",
                now=now,
            ),
        )
        self.stats.acked += 1
        claim_event("delivery", c, self.link, row, now=now)
        started = self._enqueued_at.pop(message_id, None)
        if started is not None:
            self.stats.latencies.append(asyncio.get_running_loop().time() - started)

    async def _settle_failure(self, row: Any, raw: Exception, *, probe: bool) -> None:
        """A send of ``row`` failed: a definitive refusal is recorded, anything else is
        rescheduled (or given up) by :meth:`_reschedule`."""
        c = self.c
        message_id = row.message_id
        if isinstance(raw, TransitionError):
            raise raw
        if isinstance(raw, PartnerRejected):
            exc = raw
            self._link_answered()
            self.stats.rejected += 1
            if exc.detail.get("status") == 403 and "signature" in str(
                exc.detail.get("remote_code")
            ):
                self.stats.signature_failures += 1
            await c.db.mark_rejected(
                message_id,
                error=str(exc.detail.get("remote_code") or exc.code),
                receipt=exc.detail.get("body"),
                now=c.clock(),
                audit=c.audit(
                    "claim.rejected",
                    subject=message_id,
                    outcome="failure",
                    partner=self.link.partner,
                    detail=str(exc.detail.get("remote_code") or exc.code),
                ),
            )
            claim_event("rejected", c, self.link, row, code=exc.detail.get("remote_code") or exc.code)
            self._enqueued_at.pop(message_id, None)
            return
        exc2 = classify_exception(raw)
        if not isinstance(raw, BridgeError):
            log.debug("delivery of %s failed", message_id, exc_info=raw)
        await self._reschedule(row, exc2, probe=probe)

    async def _deliver_batch(self, rows: list[Any]) -> None:
        """Several claimed rows in one batch request (PROTOCOL §6b), each settled on
        its own entry of the answer exactly as it would be on an answer of its own.

        A failure of the request as a whole reschedules every row as a single
        request's failure would; a refusal of the batch form itself (a 4xx for the
        whole request) drops the partner's offer and sends the rows one by one.
        """
        # Rows to give back if the link stops meanwhile; releasing one that was
        # settled already changes nothing.
        pending = list(rows)
        try:
            cleared = []
            for row in rows:
                try:
                    payload = await self._settled_by(row, self._cleared(row))
                except Exception as raw:  # noqa: BLE001 - the store failing: retried later
                    await self._settled_by(row, self._settle_failure(row, raw, probe=False))
                    payload = None
                if payload is None:
                    pending.remove(row)
                else:
                    cleared.append((row, payload))
            if not cleared:
                return
            if len(cleared) == 1:
                await self._deliver(cleared[0][0])
                return
            body = encode_batch(
                (self._signed_now(payload, row.message_id, row), self.link.id, row.seq)
                for row, payload in cleared
            )
            try:
                answer = await self._post(body, batch=len(cleared))
            except PartnerRejected as exc:
                # The partner does not take this batch (an offer withdrawn, a bound
                # lower than offered): one message per request until it is read again.
                log.info("link %s: partner refused a batch (%s); sending one by one",
                         self.link.id, _answer(exc))
                self.offer = None
                self._offer_until = (asyncio.get_running_loop().time()
                                     + self.link.capability_ttl_seconds)
                await asyncio.gather(*(self._deliver(row) for row, _ in cleared))
                return
            except Exception as raw:  # noqa: BLE001 - classified in _settle_failure
                await asyncio.gather(*(
                    self._settled_by(row, self._settle_failure(row, raw, probe=False))
                    for row, _ in cleared
                ))
                return
            self._link_answered()
            self.stats.batches += 1
            self.stats.batched += len(cleared)
            try:
                entries = read_batch_response(orjson.loads(answer), len(cleared))
            except (BridgeError, orjson.JSONDecodeError):
                failure = TransportError(
                    "partner answered 200 with no batch-response", location="batch-response",
                    maybe_sent=True, status=200,
                )
                await asyncio.gather(*(
                    self._settled_by(row, self._settle_failure(row, failure, probe=False))
                    for row, _ in cleared
                ))
                return
            await asyncio.gather(*(
                self._settled_by(row, self._settle_entry(row, payload, status, resource))
                for (row, payload), (status, resource) in zip(cleared, entries, strict=True)
            ))
        except asyncio.CancelledError:
            # Stopping: give back the rows not yet settled (their fate unknown).
            await asyncio.shield(asyncio.gather(*(self._release(row) for row in pending)))
            raise

    async def _settled_by(self, row: Any, step: Any) -> Any:
        """Run one row's step; another sender having settled the row is not a failure."""
        try:
            return await step
        except TransitionError:
            log.info("link %s: seq %s was settled by another sender", self.link.id, row.seq)
            return None

    async def _settle_entry(self, row: Any, payload: dict[str, Any], status: int,
                            resource: Any) -> None:
        """One entry of a batch-response, judged as the same answer to a request alone."""
        try:
            body = orjson.dumps(resource) if resource is not None else b""
            if len(body) > RECEIPT_LIMIT:
                # As an answer of its own would be (PROTOCOL P-HTTP-6): the batch's bound
                # is the sum, each entry still has a receipt's.
                raise PartnerAnswerRefused(
                    f"partner's answer is larger than {RECEIPT_LIMIT} bytes",
                    location="batch-response", status=status, maybe_sent=True,
                )
            if status == 200:
                await self._acknowledge(row, payload, body, resource)
                return
            raise _answer_error(status, body, retry_after=None, where="batch-response")
        except Exception as raw:  # noqa: BLE001 - classified in _settle_failure
            await self._settle_failure(row, raw, probe=False)

    def _link_answered(self) -> None:
        """The partner answered: the link works; an open circuit closes and the backlog
        that waited for it is made due at once."""
        if self.circuit.succeeded():
            log.info("link %s: partner answers again; sending the backlog", self.link.id)
            task = asyncio.create_task(self._release_backlog())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _release_backlog(self) -> None:
        try:
            await self.c.db.call(release_backlog, self.c.db.sync, self.link.id, now=self.c.clock())
        except Exception:  # noqa: BLE001 - the rows stay due at their own times
            log.warning("link %s: backlog could not be made due at once", self.link.id)
        self._wake.set()

    async def _reschedule(self, row: Any, exc: BridgeError, *, probe: bool = False) -> None:
        c = self.c
        now = c.clock()
        loop_now = asyncio.get_running_loop().time()
        retry_after = exc.detail.get("retry_after")
        link_down = False
        if _is_transient(exc) and exc.detail.get("status") not in (409, 200):
            if self.circuit.failed(loop_now, self.rng, retry_after=retry_after, probe=probe):
                log.warning(
                    "link %s: partner unavailable (%s); probing it with backoff up to %.1f s",
                    self.link.id, _answer(exc), self.link.probe_cap_seconds,
                )
            link_down = self.circuit.state is not CircuitState.CLOSED
        if isinstance(exc, CertificateFault):
            self.stats.certificate_faults += 1
            if self.paused_reason is None:
                log.error(
                    "link %s paused for %.0f s: %s. Check the partner's CA and our certificate.",
                    self.link.id,
                    self.link.retry_cap_seconds,
                    exc,
                )
                claim_event("certificate_refusal", c, self.link, row, code=exc.code)
                await c.db.append_audit(
                    c.audit(
                        "link.paused",
                        subject=f"link:{self.link.id}",
                        outcome="failure",
                        partner=self.link.partner,
                        detail=f"{exc.code}@{exc.location or '-'}",
                        now=now,
                    )
                )
            self.paused_reason = exc.message
            self._paused_until = asyncio.get_running_loop().time() + self.link.retry_cap_seconds
        answer = _answer(exc)
        fate_unknown = bool(row.fate_unknown or exc.detail.get("maybe_sent"))
        if should_give_up(
            pending_since=row.pending_since, now=now, give_up_after=self.give_up_after,
            fate_unknown=fate_unknown,
        ):
            self.stats.dead += 1
            reason = f"gave-up:{exc.code}"
            await c.db.mark_dead(
                row.message_id,
                error=reason,
                answer=answer,
                now=now,
                audit=c.audit(
                    "claim.dead",
                    subject=row.message_id,
                    outcome="failure",
                    partner=self.link.partner,
                    detail=f"{reason}; last answer: {answer}",
                ),
            )
            log.warning(
                "link %s: claim %s (seq %s) dead-lettered after %.0f s pending: %s;"
                " last answer: %s. Requeue it with: bridge outbox requeue --id %s",
                self.link.id, row.message_id, row.seq,
                (now - row.pending_since).total_seconds(), exc.code, answer, row.message_id,
            )
            claim_event("dead_letter", c, self.link, row, code=exc.code)
            self._enqueued_at.pop(row.message_id, None)
            return
        self.stats.retried += 1
        if link_down:
            # The circuit decides when the link is tried again; the row waits for it.
            due = now
        else:
            due = next_attempt(
                row.attempts,
                now=now,
                base=self.link.retry_base_seconds,
                cap=self.link.retry_cap_seconds,
                rng=self.rng,
            )
        if retry_after is not None:
            due = max(due, now + timedelta(seconds=retry_after))
        await c.db.mark_retry(
            row.message_id, next_attempt=due, error=exc.code, now=now, audit=None,
            fate_unknown=fate_unknown, answer=answer,
        )
        claim_event("retry", c, self.link, row, code=exc.code, now=now, retry_at=due)

    async def resend(self, message_id: str) -> bytes:
        """Send a delivered claim again and return the receipt the partner answers with.

        Used when the partner says it is missing a message, and to show that a resend
        creates nothing new: the partner must answer with its original receipt. The
        outbox row stays ``acked`` with its first receipt; the resend and whether the
        receipt matched are audited. A ``dead`` or ``rejected`` claim is requeued
        instead, and goes through the ordinary path.
        """
        c = self.c
        row = await c.db.get_outbox(message_id)
        if row is None:
            raise BridgeError("no such message in the outbox", location=f"outbox[{message_id}]")
        if row.state in ("dead", "rejected"):
            await c.db.requeue(
                message_id,
                now=c.clock(),
                audit=c.audit("claim.requeue", subject=message_id, partner=self.link.partner),
            )
            self.wake(message_id)
            return b""
        if row.state != "acked":
            raise BridgeError(
                "message is not delivered yet", location=f"outbox[{message_id}].state"
            )
        payload = orjson.loads(row.payload)
        await c.sync_consents()
        c.recheck_consent(payload, self.link, raw=row.payload)
        receipt_bytes = await self._post(self._signed_now(payload, message_id), seq=row.seq)
        verify_receipt(
            read_json(receipt_bytes),
            c.keyring,
            expected_issuer=self.link.partner,
            expected_audience=c.id,
            request_message_id=message_id,
            request_digest=payload_digests(payload),
            now=c.clock(),
            check_time=False,
        )
        same = receipt_bytes == row.receipt
        await c.db.append_audit(
            c.audit(
                "claim.resend",
                subject=message_id,
                partner=self.link.partner,
                digest_value=digest(receipt_bytes),
                detail="original-receipt" if same else "new-receipt",
            )
        )
        return receipt_bytes

    async def _post(self, payload: bytes, *, single: bool = False, seq: int | None = None,
                    batch: int = 0) -> bytes:
        """POST once, with a few immediate retries for transient failures.

        ``single`` (a probe of a partner that is down, or the circuit not closed): one
        request only. A failure raised from here carries ``maybe_sent`` when any of the
        requests may have reached the partner. ``batch``: ``payload`` is a batch
        request of that many messages, POSTed to ``[base]``.
        """
        assert self._session is not None
        tries = 1 if single or self.circuit.state is not CircuitState.CLOSED else self.quick_retries
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(tries, 1)),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            retry=retry_if_exception(_quick_retry),
            reraise=True,
        )
        maybe_sent = False
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        if batch:
                            return await self._post_once(payload, None, batch=batch)
                        return await self._post_once(payload, seq)
                    except BridgeError as exc:
                        maybe_sent = maybe_sent or bool(exc.detail.get("maybe_sent"))
                        raise
        except BridgeError as exc:
            if maybe_sent:
                exc.detail["maybe_sent"] = True
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_once(self, payload: bytes, seq: int | None = None, *, batch: int = 0) -> bytes:
        assert self._session is not None
        self.stats.requests += 1
        headers = {"Content-Type": "application/fhir+json"}
        if seq is not None and not batch:
            # The claim's place in the link's sequence (PROTOCOL §8a): the receiver
            # records it and so sees gaps.
            headers["Bridge-Stream"] = self.link.id
            headers["Bridge-Sequence"] = str(seq)
        try:
            async with self._session.post(
                self.base_url if batch else self.url, data=payload, headers=headers,
                allow_redirects=False,
            ) as resp:
                # A 3xx or an oversize: refused.
                body = await read_answer(resp, RECEIPT_LIMIT * max(batch, 1))
                status = resp.status
                retry_after = retry_after_seconds(
                    resp.headers.get("Retry-After"), now=self.c.clock()
                )
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none is swallowed
            classified = classify_exception(exc)
            if not _never_sent(exc):
                classified.detail["maybe_sent"] = True
            raise classified from None
        if status == 200:
            return body
        raise _answer_error(status, body, retry_after=retry_after, where="HTTP")


def _answer_error(status: int, body: bytes, *, retry_after: float | None,
                  where: str) -> BridgeError:
    """What a non-200 answer to one message means for it (PROTOCOL §7, §8), whether it
    answered a request alone or an entry of a batch (``where`` names which)."""
    remote_code = _remote_code(body)
    if status in (408, 409, 429) or status >= 500:
        return TransportError(
            f"partner answered {status}", location="HTTP", status=status,
            remote_code=remote_code, retry_after=retry_after,
        )
    if not 400 <= status < 500:
        # Neither a receipt nor a refusal (a 1xx, a 201, a 202 of a server that queues,
        # a 3xx): only a definitive 4xx rejects a claim; the partner may hold this one.
        return TransportError(
            f"partner answered {status} without a receipt", location=where,
            maybe_sent=True, status=status, remote_code=remote_code,
        )
    return PartnerRejected(
        f"partner rejected the message with {status}", location="HTTP",
        status=status, remote_code=remote_code, body=body,
    )


#: What a refusal's code becomes when it is not one of the protocol's (PROTOCOL §7).
UNLISTED_CODE = "unlisted-code"


@lru_cache(maxsize=1)
def protocol_codes() -> frozenset[str]:
    """The error codes a partner may answer with (PROTOCOL §7, P-ERR-4): the codes of
    this bridge's own errors, wherever the protocol answers with them (the claim path,
    sync, agreements, audit checkpoints, record pull)."""
    import bridge.compliance.agreements
    import bridge.link.pull
    import bridge.link.sync
    import bridge.records.search
    import bridge.trust.checkpoint  # noqa: F401 - imported for their errors' codes

    found: set[str] = set()
    stack: list[type[BridgeError]] = [BridgeError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("bridge."):
            found.add(cls.code)
        stack.extend(cls.__subclasses__())
    return frozenset(found)


def _remote_code(body: bytes) -> str | None:
    """The code of a partner's OperationOutcome, as the outbox, the audit trail, the log
    and the status page keep it: one of the protocol's codes, else ``unlisted-code``.
    The partner wrote it, and its text could be anything (a value, a name, thousands of
    characters); the answer itself is kept whole as the outbox's evidence."""
    try:
        outcome = orjson.loads(body)
        code = outcome["issue"][0]["details"]["coding"][0]["code"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return code if isinstance(code, str) and code in protocol_codes() else UNLISTED_CODE


__all__ = ["CertificateFault", "Dispatcher", "LinkStats", "classify_exception"]
