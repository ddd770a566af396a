"""Hand received claims to this controller's own systems: HTTP POST or AMQP (RabbitMQ).

One :class:`HandoffWorker` per configured destination drains that destination's
queue (:mod:`bridge.ledger.handoff`). Per sender it hands claims over one at a time in
the order they were accepted, so they arrive in that order; different senders go in
parallel. A claim is handed over as one envelope (:func:`bridge.handoff.build_envelope`):
the signed message and the receipt beside it, with the message identity, sender,
sequence, receipt digest and audit entry also in HTTP headers or AMQP properties.

* HTTP: ``POST url``; only a 2xx answer counts as taken.
* AMQP: a persistent message published on a channel with publisher confirms, to the
  configured exchange (durable, declared on connect) with ``mandatory`` set; only the
  broker's confirm counts as taken; a nack or an unroutable return is a failure.

Any failure is retried with exponential backoff and full jitter; a failure after the
destination's give-up duration dead-letters the hand-off with the error code and the
destination's last answer, until an operator requeues it (``bridge inbox requeue``).
Logs name destinations, senders, message identities and error codes, never content.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Protocol

import aio_pika
import aio_pika.exceptions
import aiohttp
import aiormq.exceptions
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from yarl import URL

from bridge.config import HandoffConfig
from bridge.errors import ConfigError
from bridge.handoff import EnvelopeFacts, build_envelope, gives_up, receipt_digest
from bridge.ledger import handoff as queue
from bridge.ledger.audit import AuditRecord, format_time
from bridge.ledger.states import next_attempt
from bridge.link.node import Controller
from bridge.logs import event
from bridge.ops.metrics import ScrapeContext, metric_source

log = logging.getLogger("bridge.handoff")
#: A broker's refusal of the user, its password or the virtual host (wrong credentials, no
#: permission, a virtual host that does not exist).
_AMQP_REFUSALS = (aiormq.exceptions.AuthenticationError,
                  aiormq.exceptions.ProbableAuthenticationError,
                  aiormq.exceptions.ConnectionNotAllowed,
                  aiormq.exceptions.ChannelAccessRefused)

_ANSWER_LIMIT = 2048


class DeliveryFailed(Exception):
    """One attempt failed: ``code`` for logs and status, ``answer`` what the destination
    said (kept sealed for ``bridge inbox show``; never logged)."""

    def __init__(self, code: str, answer: bytes | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.answer = answer[:_ANSWER_LIMIT] if answer is not None else None


class NotAttempted(Exception):
    """The hand-off was not started: the worker's lease no longer covers it."""


class Transport(Protocol):
    async def send(self, body: bytes, facts: EnvelopeFacts, *,
                   publish_by: float | None = None) -> None: ...
    async def close(self) -> None: ...


def _secret(dest: HandoffConfig, index: int, source: str, env_key: str, file_key: str
            ) -> str | None:
    env_name = getattr(dest, env_key)
    file_path = getattr(dest, file_key)
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(f"environment variable {env_name} is not set",
                              location=f"{source}: handoff[{index}].{env_key}")
        return value
    if file_path:
        try:
            return str(file_path.read_text(encoding="utf-8")).strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file: {exc.strerror}",
                              location=f"{source}: handoff[{index}].{file_key}") from None
    return None


def _client_ssl(dest: HandoffConfig, index: int, source: str) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(dest.ca) if dest.ca else None)
        if dest.client_cert is not None and dest.client_key is not None:
            ctx.load_cert_chain(dest.client_cert, dest.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files ({type(exc).__name__})",
                          location=f"{source}: handoff[{index}].ca") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class HTTPTransport:
    """POST each envelope; a 2xx answer means the claim system holds it."""

    def __init__(self, dest: HandoffConfig, index: int, source: str) -> None:
        self.dest = dest
        token = _secret(dest, index, source, "token_env", "token_file")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = _client_ssl(dest, index, source) if dest.url.startswith("https:") else None
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True,
                                             limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.dest.timeout_seconds),
            )
        return self._session

    async def send(self, body: bytes, facts: EnvelopeFacts, *,
                   publish_by: float | None = None) -> None:
        # One request bounded by the destination's timeout: the worker starts it only
        # while its lease covers that timeout (``publish_by`` is checked before).
        session = self._open()
        headers = {"Content-Type": "application/json", **facts.headers(), **self._auth}
        try:
            # Redirects are not followed: a 301/302/303 would turn the POST into a
            # bodiless GET that something else answers 2xx, a 307/308 would carry the
            # claim to wherever the Location names. A 3xx is a failed hand-off.
            async with session.post(self.dest.url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                status, reason = resp.status, resp.reason or ""
                location = resp.headers.get("Location")
                answer = await _read_at_most(resp, _ANSWER_LIMIT)
        except TimeoutError:
            raise DeliveryFailed("http-timeout", b"no answer in time") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise DeliveryFailed("http-tls", type(exc).__name__.encode()) from None
        except aiohttp.ClientConnectorError as exc:
            errno = getattr(exc.os_error, "errno", None)
            raise DeliveryFailed("http-unreachable",
                                 f"{type(exc).__name__} errno {errno}".encode()) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryFailed("http-failed", type(exc).__name__.encode()) from None
        if not 200 <= status < 300:
            head = f"HTTP {status} {reason}\n"
            if location is not None and 300 <= status < 400:
                head += f"Location: {location}\n"
            raise DeliveryFailed(f"http-{status}", head.encode() + answer)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The first ``limit`` bytes of the answer's body. An answer longer than that is not
    read on: its connection is closed, so an endpoint answering with hundreds of
    megabytes costs a few kilobytes, not its size in memory."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = await resp.content.read(limit - size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
    if not resp.content.at_eof():
        resp.close()
    return b"".join(parts)


class AMQPTransport:
    """Publish each envelope persistently and wait for the broker's confirm.

    The connection is opened on first use and again after any failure (the state of a
    broken channel is unknown: what was not confirmed is published again).
    """

    def __init__(self, dest: HandoffConfig, index: int, source: str) -> None:
        self.dest = dest
        url = URL(dest.url)
        password = _secret(dest, index, source, "password_env", "password_file")
        if dest.username:
            url = url.with_user(dest.username)
        if password is not None:
            url = url.with_password(password)
        self._url = url
        self._ssl = _client_ssl(dest, index, source) if url.scheme == "amqps" else None
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        # Lines of several senders publish concurrently; they share one connection.
        self._connecting = asyncio.Lock()
        self.routing_key = dest.routing_key if dest.routing_key is not None else (dest.queue or "")

    async def _open(self) -> aio_pika.abc.AbstractExchange:
        if self._exchange is not None and self._connection is not None \
                and not self._connection.is_closed:
            return self._exchange
        await self.close()
        dest = self.dest
        try:
            self._connection = await aio_pika.connect(
                self._url, timeout=dest.timeout_seconds, ssl_context=self._ssl,
                client_properties={"connection_name": f"ws-fhir-bridge handoff {dest.id}"},
            )
        except (TimeoutError, ConnectionError, OSError, aiormq.exceptions.AMQPError) as exc:
            await self.close()
            # The broker answered and refused this user or virtual host: a setting to fix,
            # not a broker that is down.
            refused = isinstance(exc, _AMQP_REFUSALS)
            raise DeliveryFailed("amqp-refused" if refused else "amqp-unreachable",
                                 _amqp_answer(exc)) from None
        try:
            channel = await self._connection.channel(publisher_confirms=True,
                                                     on_return_raises=True)
            if dest.exchange:
                exchange = (
                    await channel.declare_exchange(dest.exchange, dest.exchange_type,
                                                   durable=True)
                    if dest.declare else await channel.get_exchange(dest.exchange)
                )
            else:
                exchange = channel.default_exchange
            if dest.queue and dest.declare:
                declared = await channel.declare_queue(
                    dest.queue, durable=True, arguments=dict(dest.queue_arguments) or None)
                if dest.exchange:
                    await declared.bind(exchange, routing_key=self.routing_key)
        except (TimeoutError, ConnectionError, OSError, aiormq.exceptions.AMQPError,
                aio_pika.exceptions.AMQPException) as exc:
            await self.close()
            raise DeliveryFailed("amqp-declare-failed", _amqp_answer(exc)) from None
        self._exchange = exchange
        return exchange

    async def send(self, body: bytes, facts: EnvelopeFacts, *,
                   publish_by: float | None = None) -> None:
        """Publish and wait for the confirm. ``publish_by`` (event-loop time) is when the
        worker's lease stops covering a publish and its confirm: a reconnect (or a wait
        for another line's reconnect) that ends later publishes nothing, since by then
        another worker may have taken the claim and handed it over."""
        async with self._connecting:
            exchange = await self._open()
        if publish_by is not None and asyncio.get_running_loop().time() > publish_by:
            raise NotAttempted()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=facts.message_id,
            correlation_id=f"{facts.receiver} audit {facts.audit_seq}",
            app_id="ws-fhir-bridge",
            type="claim-handoff",
            headers={k.lower(): v for k, v in facts.headers().items()},
        )
        try:
            await exchange.publish(message, routing_key=self.routing_key, mandatory=True,
                                   timeout=self.dest.timeout_seconds)
        except aio_pika.exceptions.PublishError as exc:
            # Returned: the queue (or binding) is gone under a live connection. The next
            # attempt connects afresh, and so declares them again.
            await self.close()
            raise DeliveryFailed("amqp-unroutable", _amqp_answer(exc)) from None
        except aio_pika.exceptions.DeliveryError as exc:
            await self.close()
            raise DeliveryFailed("amqp-nack", _amqp_answer(exc)) from None
        except TimeoutError:
            await self.close()
            raise DeliveryFailed("amqp-timeout", b"no publisher confirm in time") from None
        except (ConnectionError, OSError, aiormq.exceptions.AMQPError,
                aio_pika.exceptions.AMQPException, RuntimeError) as exc:
            await self.close()
            raise DeliveryFailed("amqp-connection-lost", _amqp_answer(exc)) from None

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close
                log.debug("hand-off %s: connection closed uncleanly (%s)", self.dest.id,
                          type(exc).__name__)


def _amqp_answer(exc: BaseException) -> bytes:
    """What the broker said, without anything that could hold the URL and its password."""
    reply = getattr(exc, "reply_text", None) or getattr(exc, "message", None)
    code = getattr(exc, "reply_code", None) or getattr(exc, "code", None)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} errno {exc.errno}".encode()
    text = type(exc).__name__
    if code is not None:
        text += f" {code}"
    if isinstance(reply, str) and "://" not in reply:
        text += f" {reply}"
    return text.encode()


def make_transport(dest: HandoffConfig, index: int, source: str) -> Transport:
    if dest.kind == "http":
        return HTTPTransport(dest, index, source)
    return AMQPTransport(dest, index, source)


class HandoffWorker:
    """Drains one destination's hand-off queue (see the module docstring)."""

    def __init__(self, controller: Controller, dest: HandoffConfig, index: int, *,
                 poll_interval: float = 0.25, rng: random.Random | None = None) -> None:
        self.c = controller
        self.dest = dest
        source = str(controller.config.source or "config")
        self.transport = make_transport(dest, index, source)
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self.lease = timedelta(seconds=2 * dest.timeout_seconds + 5)
        self.failing: str | None = None  # the last error code while the destination fails
        self.stats = {"delivered": 0, "failed": 0, "dead": 0}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.c.hold_dispatch()  # marked as sending before it leases anything
        self._task = asyncio.create_task(self._run(), name=f"handoff:{self.dest.id}")

    async def stop(self, grace: float = 5.0) -> None:
        """Finish the hand-off in progress and give back the rest. One that takes longer
        than ``grace`` seconds (a broker that does not answer) is abandoned: its lease
        expires and it goes again, so nothing is lost."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task),
                                       timeout=min(grace, self.dest.timeout_seconds + 2))
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            except asyncio.CancelledError:
                pass
        await self.transport.close()

    def wake(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        c = self.c
        while not self._stopping:
            try:
                lines = await c.db.call(queue.claim, c.store, self.dest.id, now=c.clock(),
                                        limit=self.dest.batch, lease=self.lease)
            except Exception as exc:  # noqa: BLE001 - the store may be failing; try again
                log.warning("hand-off %s: cannot read the queue (%s)", self.dest.id,
                            type(exc).__name__)
                await self._sleep(self.poll_interval)
                continue
            if not lines:
                await self._sleep(self.poll_interval)
                continue
            claimed_at = asyncio.get_running_loop().time()
            try:
                await asyncio.gather(*(self._hand_line(line, claimed_at) for line in lines))
            except Exception as exc:  # noqa: BLE001 - e.g. the store failed while marking
                # What was handed over but not recorded goes again when its lease expires.
                log.warning("hand-off %s: round interrupted (%s); carrying on", self.dest.id,
                            type(exc).__name__)
                await self._sleep(self.poll_interval)

    async def _hand_line(self, line: Sequence[queue.Claimed], claimed_at: float) -> None:
        """Hand one sender's claims over in order; stop the line at the first failure."""
        c = self.c
        loop = asyncio.get_running_loop()
        budget = self.lease.total_seconds() - self.dest.timeout_seconds - 1.0
        delivered: list[queue.HandoffRow] = []
        audits: list[AuditRecord] = []
        try:
            for i, item in enumerate(line):
                if self._stopping or loop.time() - claimed_at > budget:
                    # Not attempted: back in line, in order, for the next round.
                    await c.db.call(queue.release, c.store, [x.row for x in line[i:]],
                                    now=c.clock())
                    return
                try:
                    facts, body = self._envelope(item)
                    await self._send(body, facts, publish_by=claimed_at + budget)
                except NotAttempted:
                    await c.db.call(queue.release, c.store, [x.row for x in line[i:]],
                                    now=c.clock())
                    return
                except DeliveryFailed as failure:
                    await self._flush(delivered, audits)
                    delivered, audits = [], []
                    await self._failed(item.row, failure)
                    await c.db.call(queue.release, c.store, [x.row for x in line[i + 1:]],
                                    now=c.clock())
                    return
                delivered.append(item.row)
                audits.append(c.audit(
                    "handoff.delivered", subject=item.row.message_id, partner=item.row.sender,
                    digest_value=facts.message_digest,
                    detail=f"{self.dest.id} seq {item.row.seq}",
                ))
                if self.failing is not None:
                    event("handoff_recovered", controller=c.id, destination=self.dest.id)
                    self.failing = None
        finally:
            await self._flush(delivered, audits)

    async def _send(self, body: bytes, facts: EnvelopeFacts, *, publish_by: float) -> None:
        try:
            await self.transport.send(body, facts, publish_by=publish_by)
        except (DeliveryFailed, NotAttempted):
            raise
        except Exception as exc:  # noqa: BLE001 - a client failure not classified above
            await self.transport.close()  # its state is unknown: start afresh next time
            raise DeliveryFailed(f"{self.dest.kind}-failed", type(exc).__name__.encode()) from None

    async def _flush(self, rows: list[queue.HandoffRow], audits: list[AuditRecord]) -> None:
        if not rows:
            return
        c = self.c
        await c.db.call(queue.mark_delivered, c.store, rows, now=c.clock(), audits=audits)
        self.stats["delivered"] += len(rows)
        rows.clear()
        audits.clear()

    def _envelope(self, item: queue.Claimed) -> tuple[EnvelopeFacts, bytes]:
        inbox = item.inbox
        if inbox is None:
            raise DeliveryFailed("inbox-row-missing")
        row = item.row
        facts = EnvelopeFacts(
            destination=self.dest.id,
            receiver=self.c.id,
            sender=row.sender,
            link=row.link,
            message_id=row.message_id,
            sequence=row.seq,
            received=format_time(inbox.received),
            audit_seq=inbox.audit_seq,
            message_digest=inbox.digest,
            receipt_digest=receipt_digest(inbox.receipt),
        )
        return facts, build_envelope(facts, inbox.payload, inbox.receipt)

    async def _failed(self, row: queue.HandoffRow, failure: DeliveryFailed) -> None:
        c = self.c
        now = c.clock()
        self.stats["failed"] += 1
        if gives_up(row.due_since, now, self.dest.give_up_after_seconds):
            self.stats["dead"] += 1
            event("handoff_dead_letter", controller=c.id, destination=self.dest.id,
                  partner=row.sender, message_id=row.message_id, seq=row.seq,
                  attempt=row.attempts, code=failure.code)
            await c.db.call(
                queue.mark_failed, c.store, row, error=failure.code, answer=failure.answer,
                now=now, retry_at=None,
                audit=c.audit("handoff.dead", subject=row.message_id, outcome="failure",
                              partner=row.sender,
                              detail=f"{self.dest.id} seq {row.seq}: {failure.code}", now=now),
            )
            return
        retry_at = next_attempt(row.attempts, now=now, base=self.dest.retry_base_seconds,
                                cap=self.dest.retry_cap_seconds, rng=self.rng)
        if self.failing != failure.code:
            # Once per change, not once per attempt: an outage is one line, not thousands.
            event("handoff_failing", controller=c.id, destination=self.dest.id,
                  partner=row.sender, message_id=row.message_id, attempt=row.attempts,
                  code=failure.code,
                  retry_in_seconds=round((retry_at - now).total_seconds(), 3))
            self.failing = failure.code
        await c.db.call(queue.mark_failed, c.store, row, error=failure.code,
                        answer=failure.answer, now=now, retry_at=retry_at, audit=None)


class HandoffService:
    """The workers of every configured destination, started and stopped together."""

    def __init__(self, controller: Controller, *, poll_interval: float = 0.25) -> None:
        self.workers: dict[str, HandoffWorker] = {
            dest.id: HandoffWorker(controller, dest, i, poll_interval=poll_interval)
            for i, dest in enumerate(controller.config.handoff)
        }

    async def start(self) -> None:
        for worker in self.workers.values():
            await worker.start()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()))

    def wake(self) -> None:
        for worker in self.workers.values():
            worker.wake()


@metric_source
def handoff_figures(ctx: ScrapeContext) -> Iterator[Metric]:
    """Per destination: claims waiting, handed over and dead, read from the store."""
    waiting = GaugeMetricFamily("bridge_handoff_pending",
                                "Received claims waiting to be handed over",
                                labels=["destination"])
    delivered = GaugeMetricFamily("bridge_handoff_delivered",
                                  "Received claims the destination took", labels=["destination"])
    dead = GaugeMetricFamily("bridge_handoff_dead",
                             "Hand-offs given up, waiting for bridge inbox requeue",
                             labels=["destination"])
    failing = GaugeMetricFamily("bridge_handoff_failing",
                                "1 while a waiting hand-off to it has failed and is retried",
                                labels=["destination"])
    configured = [dest.id for dest in ctx.config.handoff]
    # A destination removed from the configuration keeps its series while the store
    # holds claims waiting for it (handed to no one) or dead ones.
    held = [d for d in queue.destinations_held(ctx.store) if d not in configured]
    for dest_id in (*configured, *held):
        counts = queue.destination_status(ctx.store, dest_id, dead_limit=0)
        waiting.add_metric([dest_id], counts.counts["queued"] + counts.counts["sending"])
        delivered.add_metric([dest_id], counts.counts["delivered"])
        dead.add_metric([dest_id], counts.counts["dead"])
        failing.add_metric([dest_id], 1 if counts.failing is not None else 0)
    yield from (waiting, delivered, dead, failing)


__all__ = ["AMQPTransport", "DeliveryFailed", "HTTPTransport", "HandoffService",
           "HandoffWorker"]
