"""The HL7 v2 listener: MLLP over TCP (loopback) or over mutual TLS.

One connection is one :class:`asyncio.Protocol`. Received bytes go through the pure
:class:`~bridge.link.mllp_framer.MLLPFramer`; complete messages are queued and a
single task per connection handles them one after another, so ACKs leave in the
order the messages arrived. Each message goes:

1. MSH is read by the listener's own reader (no parser needed to answer);
2. the sending facility (MSH-4) must be allowed, if the configuration lists any;
3. a control id (MSH-10) already stored for this sender (MSH-3|MSH-4) is answered
   with the ACK stored for it, byte for byte; with other content it is refused;
4. the :class:`MessageHandler` parses and maps it (in a worker thread: hl7apy takes
   tens of milliseconds per message);
5. message, DE record, ACK and audit entry are committed in one SQLite transaction
   (``synchronous=FULL``), and only then is the AA sent.

ACK rule (original acknowledgement mode). The code is the error's ``ack_code``:

* **AA** — stored durably with its audit entry. Never sent for anything else.
* **AR** — the message as such is refused and resending the same bytes cannot
  change that: unreadable (no MSH, MSH-9/MSH-10 missing, unknown MSH-18 character
  set), rejected by the full parser (``ParseError``), larger than
  ``max_message_bytes``, from a sending facility not allowed, or of a message type,
  event, processing id or version not supported (HL7 errors 200-203, whatever the
  error class: HL7 v2 answers those with AR).
* **AE** — the message was read but not accepted: mapping failed
  (``MappingError``), the control id was already used for different content
  (ERR-3 ``205``), or the bridge failed (store or handler failure, ERR-3 ``207``;
  nothing was stored and the same message may be sent again).

Every AE/AR carries an ERR segment naming the location (ERR-2 for an HL7 location,
ERR-8 text) and an HL7 table 0357 code (ERR-3), never a value from the message.
Every outcome is audited (``hl7.receive``, ``hl7.duplicate``, ``hl7.reject``);
refused TLS handshakes are audited by the TLS gate as ``tls.refused``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from bridge.errors import (
    BridgeError,
    ConflictError,
    ParseError,
    PolicyError,
    StoreError,
    TrustError,
)
from bridge.link.mllp_framer import (
    Event,
    FrameTooLarge,
    MLLPFramer,
    MSHHeader,
    build_fallback_ack,
    frame,
    read_msh,
)
from bridge.link.tlsgate import RefusalHook, TLSListener
from bridge.trust.identity import certificate_identity

if TYPE_CHECKING:
    from bridge.config import MLLPConfig
    from bridge.link.node import Controller

log = logging.getLogger("bridge.mllp")

# Per-connection backlog of framed messages awaiting their turn: reading pauses above
# the high mark, so a client that does not wait for ACKs cannot fill memory.
_HIGH_WATER = 64
_LOW_WATER = 16


class FacilityNotAllowed(PolicyError):
    """MSH-4 names a sending facility this listener does not accept."""

    code = "hl7-facility-not-allowed"
    ack_code = "AR"


class HandlerFailure(BridgeError):
    """The parser or mapper failed in an unexpected way: our fault, nothing stored."""

    code = "hl7-handler-failure"
    ack_code = "AE"
    fault = "local"


# --- what the listener needs from the HL7 v2 room ------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A message the handler has parsed and mapped, ready to be stored."""

    parsed: Any  # the handler's own parsed form, handed back to its ``ack``
    record: dict[str, Any] | None  # the DE record, or None when stored unmapped


class MessageHandler(Protocol):
    """Parse, map and acknowledge HL7 v2 messages (synchronous; called from a thread)."""

    def prepare(self, message: bytes, header: MSHHeader) -> Prepared:
        """Parse and map ``message``; raise ``ParseError`` (AR) or ``MappingError`` (AE)."""
        ...

    def ack(
        self,
        message: bytes,
        header: MSHHeader | None,
        prepared: Prepared | None,
        code: str,
        *,
        error: BridgeError | None,
        now: datetime,
    ) -> bytes:
        """The ACK for ``message`` (``prepared`` is None when it could not be prepared)."""
        ...


class HeaderOnlyHandler:
    """Stores messages whose MSH is readable, unmapped; ACKs from the minimal builder."""

    def prepare(self, message: bytes, header: MSHHeader) -> Prepared:
        return Prepared(parsed=header, record=None)

    def ack(
        self,
        message: bytes,
        header: MSHHeader | None,
        prepared: Prepared | None,
        code: str,
        *,
        error: BridgeError | None,
        now: datetime,
    ) -> bytes:
        return build_fallback_ack(header, code, error=error, now=now)


class HL7v2Handler:
    """Parse with ``bridge.mapping.hl7v2.parse_hl7``, map with ``hl7_to_record``, ACK with ``build_ack``.

    When the parser's ACK builder cannot answer (the message did not parse at all),
    the minimal ACK of :func:`build_fallback_ack` is sent instead.
    """

    def __init__(self, module: Any) -> None:
        self._parse = module.parse_hl7
        self._to_record = module.hl7_to_record
        self._build_ack = module.build_ack

    def prepare(self, message: bytes, header: MSHHeader) -> Prepared:
        parsed = self._parse(message)
        return Prepared(parsed=parsed, record=self._to_record(parsed))

    def ack(
        self,
        message: bytes,
        header: MSHHeader | None,
        prepared: Prepared | None,
        code: str,
        *,
        error: BridgeError | None,
        now: datetime,
    ) -> bytes:
        if header is not None:
            try:
                target = prepared.parsed if prepared is not None else message
                return bytes(self._build_ack(target, code, error=error, now=now))
            except Exception as exc:  # noqa: BLE001 - the ACK must go out even if the parser cannot
                log.debug("HL7 ACK builder fell back (%s)", type(exc).__name__)
        return build_fallback_ack(header, code, error=error, now=now)


#: HL7 table 0357 codes that mean "this kind of message is not taken here": answered AR,
#: as HL7 v2 prescribes for an unsupported MSH-9, MSH-11 or MSH-12.
_UNSUPPORTED = frozenset({"200", "201", "202", "203"})


def ack_code_for(error: BridgeError) -> str:
    """AE or AR for a refusal (see the module docstring for the rule)."""
    if error.detail.get("hl7_code") in _UNSUPPORTED:
        return "AR"
    return error.ack_code if error.ack_code in ("AE", "AR") else "AE"


def default_handler() -> MessageHandler:
    """The HL7 v2 room's parser and mapper when installed, else :class:`HeaderOnlyHandler`."""
    try:
        module = importlib.import_module("bridge.mapping.hl7v2")
    except ImportError:
        return HeaderOnlyHandler()
    if all(hasattr(module, name) for name in ("parse_hl7", "hl7_to_record", "build_ack")):
        return HL7v2Handler(module)
    return HeaderOnlyHandler()


# --- the listener ----------------------------------------------------------------------------

_ID_SYSTEMS = (
    ("HDSD00.11.048", "urn:oid:2.16.156.10011.1.3"),
    ("HDSD00.11.140", "urn:oid:2.16.156.10011.1.12"),
    ("HDSD00.11.006", "urn:oid:2.16.156.10011.1.13"),
    ("HDSD00.11.053", "urn:oid:2.16.156.10011.1.19"),
)


def _patient_ids(record: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Patient identifiers of a WS 445.10 DE record, for the audit pseudonym."""
    elements = record.get("elements") if isinstance(record, dict) else None
    if not isinstance(elements, dict):
        return []
    return [(system, str(elements[de])) for de, system in _ID_SYSTEMS if elements.get(de)]


class MLLPListener:
    """Accept HL7 v2 over MLLP for one controller (see the module docstring)."""

    def __init__(
        self,
        controller: Controller,
        config: MLLPConfig,
        *,
        handler: MessageHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_refused: RefusalHook | None = None,
    ) -> None:
        """``ssl_context`` is required when ``config.tls`` is true (a server context
        requiring client certificates); ``on_refused`` audits failed handshakes."""
        if config.tls and ssl_context is None:
            raise ValueError("an MLLP listener with tls needs an ssl_context")
        self.c = controller
        self.config = config
        self.handler = handler if handler is not None else default_handler()
        self._ssl_context = ssl_context if config.tls else None
        self._on_refused = on_refused
        self._server: asyncio.base_events.Server | None = None
        self._tls: TLSListener | None = None
        self._connections: set[_MLLPConnection] = set()
        self._allowed = frozenset(config.allowed_facilities)
        self.port: int | None = None
        self.stats: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0, "failed": 0}

    async def start(self) -> int:
        """Listen; returns the bound port (useful with ``port = 0``)."""
        host, port = self.config.host, self.config.port
        if self._ssl_context is not None:
            self._tls = TLSListener(
                lambda: _MLLPConnection(self), self._ssl_context, on_refused=self._on_refused
            )
            self.port = await self._tls.start(host, port)
        else:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _MLLPConnection(self), host, port, reuse_address=True
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "%s MLLP listening on %s:%s (%s)",
            self.c.id,
            host,
            self.port,
            "mutual TLS" if self._tls else "plain TCP, loopback",
        )
        return self.port

    async def close(self) -> None:
        """Stop accepting, let each connection finish the message in hand, then close."""
        if self._tls is not None:
            await self._tls.close()
            self._tls = None
        if self._server is not None:
            self._server.close()
            self._server = None
        connections = list(self._connections)
        for conn in connections:
            conn.shutdown()
        workers = [conn.worker for conn in connections if conn.worker is not None]
        if workers:
            _done, pending = await asyncio.wait(workers, timeout=5.0)
            for task in pending:
                task.cancel()

    # --- one message --------------------------------------------------------------------

    def client_allowed(self, der: bytes | None) -> bool:
        """May this TLS client send HL7 here?

        HL7 comes from this controller's own systems. A certificate from the trusted CA
        issued to a partner (an insurer, a regional platform) must not be able to inject
        messages into the hospital's inbox: the client certificate must name this
        controller (and be pinned in ``[server] local_client_fingerprints`` when pins
        are set), or be pinned in ``[mllp] allowed_client_fingerprints``.
        """
        if not der:
            return False
        try:
            identity = certificate_identity(der)
        except TrustError:
            return False
        if identity.fingerprint_sha256 in self.config.allowed_client_fingerprints:
            return True
        if identity.partner_id != self.c.id:
            return False
        pins = self.c.config.server.local_client_fingerprints
        return not pins or identity.fingerprint_sha256 in pins

    def _facility_allowed(self, header: MSHHeader) -> bool:
        if not self._allowed:
            return True
        return header.sending_facility in self._allowed or header.facility_id in self._allowed

    async def handle(self, event: Event, peer: str) -> bytes:
        """Answer one framed message (or framing error) with the bytes of its ACK."""
        c = self.c
        now = c.clock()
        if isinstance(event, FrameTooLarge):
            try:
                head_header: MSHHeader | None = read_msh(event.head)
            except ParseError:
                head_header = None
            return await self._refuse(event, event.head, head_header, peer, now)
        message = event
        try:
            header = read_msh(message)
        except ParseError as exc:
            return await self._refuse(exc, message, None, peer, now)
        if not self._facility_allowed(header):
            exc2 = FacilityNotAllowed("sending facility is not allowed here", location="MSH-4")
            return await self._refuse(exc2, message, header, peer, now)
        digest = hashlib.sha256(message).hexdigest()
        subject = f"hl7:{header.sender}/{header.control_id}"
        try:
            existing = await c.db.hl7_lookup(header.sender, header.control_id)
        except StoreError as exc:
            return await self._failed(exc, message, header, None, now)
        if existing is not None:
            return await self._answer_existing(existing, digest, message, header, peer, now)
        try:
            prepared = await asyncio.to_thread(self.handler.prepare, message, header)
        except BridgeError as exc:
            return await self._refuse(exc, message, header, peer, now, by_handler=True)
        except Exception as exc:  # noqa: BLE001 - answered AE 207, logged by type
            # Only the type: third-party exception texts can carry field values.
            log.error("HL7 handler failed on %s: %s", subject, type(exc).__name__)
            failure = HandlerFailure(
                "message could not be processed", location="MSH", hl7_code="207"
            )
            return await self._refuse(failure, message, header, peer, now)
        record = prepared.record
        categories = [f"HL7v2:{header.message_type}"]
        if isinstance(record, dict) and isinstance(record.get("dataset"), str):
            categories.append(str(record["dataset"]))
        audit = c.audit(
            "hl7.receive",
            subject=subject,
            patient=c.pseudonym(_patient_ids(record)),
            categories=categories,
            digest_value=digest,
            now=now,
        )

        def make_ack(entry: Any) -> bytes:
            return self.handler.ack(message, header, prepared, "AA", error=None, now=now)

        try:
            row, created = await c.db.hl7_accept(
                sender=header.sender,
                control_id=header.control_id,
                digest=digest,
                message=message,
                record=orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
                if record is not None
                else None,
                audit=audit,
                make_ack=make_ack,
                now=now,
            )
        except ConflictError as exc:  # another connection stored other content first
            return await self._refuse(exc, message, header, peer, now)
        except BridgeError as exc:
            return await self._failed(exc, message, header, prepared, now)
        except Exception as exc:  # noqa: BLE001 - answered AE 207, logged by type
            log.error("HL7 ACK could not be built for %s: %s", subject, type(exc).__name__)
            failure = HandlerFailure(
                "acknowledgement could not be built", location="MSH", hl7_code="207"
            )
            return await self._failed(failure, message, header, prepared, now)
        self.stats["accepted" if created else "duplicates"] += 1
        return bytes(row.ack)

    async def _answer_existing(
        self,
        existing: Any,
        digest: str,
        message: bytes,
        header: MSHHeader,
        peer: str,
        now: datetime,
    ) -> bytes:
        if existing.digest != digest:
            conflict = ConflictError(
                "duplicate control id with different content", location="MSH-10"
            )
            return await self._refuse(conflict, message, header, peer, now)
        self.stats["duplicates"] += 1
        await self._audit(
            self.c.audit(
                "hl7.duplicate",
                subject=f"hl7:{header.sender}/{header.control_id}",
                digest_value=digest,
                now=now,
            )
        )
        return bytes(existing.ack)

    async def _refuse(
        self,
        exc: BridgeError,
        message: bytes,
        header: MSHHeader | None,
        peer: str,
        now: datetime,
        *,
        by_handler: bool = False,
    ) -> bytes:
        """Audit and answer a refusal. Errors found by the handler (its parser and mapper)
        are answered by the handler's ACK builder, which knows their HL7 locations; errors
        the listener found itself by the minimal builder, which names their MSH field."""
        self.stats["rejected"] += 1
        subject = f"hl7:{header.sender}/{header.control_id}" if header else f"peer:{peer}"
        log.info("HL7 message refused (%s): %s", subject, exc)
        await self._audit(
            self.c.audit(
                "hl7.reject",
                subject=subject,
                outcome="denied" if isinstance(exc, (PolicyError, TrustError)) else "failure",
                detail=f"{exc.code}@{exc.location or '-'}",
                now=now,
            )
        )
        if by_handler:
            return self._ack(message, header, None, exc, now)
        return build_fallback_ack(header, ack_code_for(exc), error=exc, now=now)

    async def _failed(
        self,
        exc: BridgeError,
        message: bytes,
        header: MSHHeader,
        prepared: Prepared | None,
        now: datetime,
    ) -> bytes:
        """Our side failed (store, ACK builder): never AA; AE 207 so the sender tries again."""
        self.stats["failed"] += 1
        log.error("HL7 message %s not stored: %s", header.control_id, exc.code)
        await self._audit(
            self.c.audit(
                "hl7.reject",
                subject=f"hl7:{header.sender}/{header.control_id}",
                outcome="failure",
                detail=f"{exc.code}@{exc.location or '-'}",
                now=now,
            )
        )
        # The ACK says what the sender needs (not stored, send again), not our file paths.
        answer = StoreError("message could not be stored; send it again", hl7_code="207")
        return self._ack(message, header, prepared, answer, now)

    def _ack(
        self,
        message: bytes,
        header: MSHHeader | None,
        prepared: Prepared | None,
        error: BridgeError,
        now: datetime,
        *,
        code: str | None = None,
    ) -> bytes:
        code = code or ack_code_for(error)
        try:
            return self.handler.ack(message, header, prepared, code, error=error, now=now)
        except Exception as exc:  # noqa: BLE001 - the minimal ACK still goes out
            log.debug("handler ACK failed (%s); minimal ACK sent", type(exc).__name__)
            return build_fallback_ack(header, code, error=error, now=now)

    async def _audit(self, record: Any) -> None:
        try:
            await self.c.db.append_audit(record)
        except BridgeError as exc:  # the answer stands even if the log cannot take it
            log.error("could not audit an HL7 outcome: %s", exc.code)


class _MLLPConnection(asyncio.Protocol):
    """One MLLP connection: frame, queue, answer in order."""

    def __init__(self, listener: MLLPListener) -> None:
        self.listener = listener
        self.framer = MLLPFramer(listener.config.max_message_bytes)
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None
        self.peer = "unknown"
        self._paused = False
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and not self.listener.client_allowed(
            ssl_object.getpeercert(binary_form=True)
        ):
            # Refused before a byte is read; the refusal is audited like a TLS refusal.
            self._closing = True
            transport.close()
            asyncio.get_running_loop().create_task(
                self.listener._audit(
                    self.listener.c.audit(
                        "mllp.refused",
                        subject=f"peer:{self.peer}",
                        outcome="denied",
                        detail="client-not-allowed@TLS.client-certificate",
                    )
                )
            )
            return
        self.listener._connections.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        for event in self.framer.events(data):
            self.queue.put_nowait(event)
        if self.queue.qsize() >= _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # Answer what was received, then close (see _run). Plain TCP can keep its write
        # side open after the peer's FIN; TLS cannot (the transport closes anyway).
        self.queue.put_nowait(None)
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.transport = None
        self.listener._connections.discard(self)
        self.queue.put_nowait(None)

    def shutdown(self) -> None:
        """Stop after the message in hand; unanswered messages will be resent by the peer."""
        self._closing = True
        if self.transport is not None:
            self.transport.pause_reading()
        self.queue.put_nowait(None)

    async def _run(self) -> None:
        try:
            while True:
                event = await self.queue.get()
                if event is None or self._closing:
                    break
                if self._paused and self.queue.qsize() <= _LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                try:
                    ack = await self.listener.handle(event, self.peer)
                except Exception as exc:  # noqa: BLE001 - a bug must not leave the peer waiting
                    log.error("MLLP connection %s failed: %s", self.peer, type(exc).__name__)
                    break
                if self.transport is None:
                    break
                self.transport.write(frame(ack))
        finally:
            if self.transport is not None:
                self.transport.close()
