"""The HL7 v2 listener: MLLP over TCP (loopback) or over mutual TLS.

One connection is one :class:`asyncio.Protocol`. Received bytes go through the pure
:class:`~bridge.link.mllp_framer.MLLPFramer`; complete messages are queued and a
single task per connection handles them one after another, so ACKs leave in the
order the messages arrived. Each message goes:

1. MSH is read on its own (:func:`~bridge.mapping.hl7v2.header.read_msh`), so even a
   message the parser cannot read is answered;
2. the sending facility (MSH-4) must be allowed, if the configuration lists any;
3. a control id (MSH-10) already stored for this sender (MSH-3|MSH-4) is answered
   with the ACK stored for it, byte for byte, and audited; with other content it is
   refused;
4. the :class:`MessageHandler` (the HL7 v2 room's reader, with the site's overlay)
   parses, checks and maps it: its own record, its part of a visit, and warnings
   about fields no mapping reads. The work is linear in the message's size: a few
   hundred microseconds for a usual message, done on the event loop; a message of
   ``_INLINE_BYTES`` or more (up to ``max_message_bytes``, which may take a second) is
   read on a thread of the listener's own, so the other connections, the partner port
   and the operations port are answered meanwhile;
5. message, record, visit part, the record to route, ACK and audit entry are
   committed in one transaction (:func:`bridge.ledger.intake.accept`; SQLite
   ``synchronous=FULL``), and only then is the AA sent; a copy that raced with it
   on another connection gets the same ACK and an audit entry of its own;
6. when something became routable, the router is woken (:mod:`bridge.link.intake`).

Timeouts (``[mllp]``): a frame must end within ``frame_timeout_seconds`` of its start
block, else it is dropped and the connection closed (a stalled or trickling peer holds
no memory for long; a start block abandoning an unended frame does not start the clock
again, so a peer cannot hold a connection by restarting its frame); a connection with nothing in progress is closed after
``idle_timeout_seconds`` without a byte in or an ACK out, when that is set (by default
it is not: HIS interfaces keep one connection open between messages). The frame clock
stops while reading is paused for a backlog, which is the bridge's doing, not the peer's.

ACK rule (original acknowledgement mode). The code is the error's ``ack_code``:

* **AA** — stored durably with its audit entry. Never sent for anything else.
* **AR** — the message as such is refused and resending the same bytes cannot
  change that: unreadable (no MSH, MSH-9/MSH-10 missing, unknown MSH-18 character
  set, an MSH field holding an MLLP framing byte: VT, or an FS the framer kept as
  content because no CR followed it), rejected by the full parser (``ParseError``), larger than
  ``max_message_bytes``, framed wrongly but ended (an empty frame; a message sent without
  its start block, ERR-7 ``mllp-no-start-block``), from a sending facility not allowed, or of a message type,
  event, processing id or version not supported (HL7 errors 200-203, whatever the
  error class: HL7 v2 answers those with AR).
* **AE** — the message was read but not accepted: a field a mapping reads is wrong
  (``MappingError``), the message cannot belong to its visit (another patient, a
  discharge before the admission, a visit closed), the control id was already used
  for different content (ERR-3 ``205``), or the bridge failed (store or handler
  failure, ERR-3 ``207``; nothing was stored and the same message may be sent again).

Framing the peer got wrong that ends no message has nothing to answer: a frame abandoned
by a new start block, bytes with neither start nor end block, an end block after nothing,
a frame or such bytes left when the peer closes. Each is logged with the connection and
a count, never the bytes.

An answer always leaves: no field echoed from MSH can end its frame (see
:func:`~bridge.mapping.hl7v2.ack.build_ack`), and if an answer still cannot be built or
framed, the connection is closed with a logged reason (the exception's type, never its
text) and the peer sends again.

Every AE/AR carries an ERR segment naming the location (ERR-2 for an HL7 location,
ERR-8 text naming the data element it was needed for) and an HL7 table 0357 code
(ERR-3), never a value from the message. An AA may carry ERR segments of severity W
for fields no mapping reads that break their data type (from v2.5 on).
Every outcome is audited (``hl7.receive``, ``hl7.duplicate``, ``hl7.reject``), with the
message named ``hl7:MSH-3|MSH-4/MSH-10`` in its subject and in log lines; each of those
fields as sent only when it reads as a plain code or control id, else by a digest keyed
with the bridge's own key (:func:`~bridge.mapping.hl7v2.header.id_label`; ``bridge intake
label`` gives an operator the label of a text): they are the sender's text;
refused TLS handshakes are audited by the TLS gate as ``tls.refused``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import orjson

from bridge.errors import (
    BridgeError,
    ConfigError,
    ConflictError,
    MappingError,
    ParseError,
    PolicyError,
    StoreError,
    TrustError,
)
from bridge.files import load_or_make_key
from bridge.ledger import intake as intake_db
from bridge.link.mllp_framer import Event, FrameTooLarge, MissingStartBlock, MLLPFramer, frame
from bridge.link.routing import Source, could_route
from bridge.link.store import GroupCommit
from bridge.link.tlsgate import RefusalHook, TLSListener
from bridge.mapping.hl7v2 import HL7Message, HL7Reader, Intake, ack_code_for, build_ack, read_msh
from bridge.mapping.hl7v2.ack import tolerant_header
from bridge.mapping.hl7v2.biometric import protect as protect_biometric
from bridge.mapping.hl7v2.header import MSHHeader, id_label, message_label
from bridge.trust.identity import certificate_identity, pinned

if TYPE_CHECKING:
    from bridge.config import MLLPConfig
    from bridge.link.node import Controller

log = logging.getLogger("bridge.mllp")

# Per-connection backlog of framed messages awaiting their turn: reading pauses above
# the high mark, so a client that does not wait for ACKs cannot fill memory.
_HIGH_WATER = 64
_LOW_WATER = 16

# Messages this large or larger are read (biometric digests, parse, check, map) on the
# listener's reading thread instead of the event loop. Below it the work takes well
# under a millisecond and a thread hop would cost more than it spares the loop.
_INLINE_BYTES = 64 * 1024

T = TypeVar("T")

WakeHook = Callable[[], None]


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


class MessageHandler(Protocol):
    """Read HL7 v2 messages (synchronous, CPU only)."""

    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        """Parse, check and map ``message``; raise ``ParseError`` (AR) or
        ``MappingError`` (AE) naming the HL7 location."""
        ...

    def protect(self, message: bytes, header: MSHHeader) -> bytes:
        """``message`` as it may be stored: biometric elements replaced by their digest."""
        ...


class HeaderOnlyHandler:
    """Takes any message whose MSH is readable, maps nothing (listener tests, or a
    bridge that only stores what it receives)."""

    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        return Intake(message=None, message_type=header.type_and_event, record=None,
                      visit=None, part=None, facility=header.facility_id)

    def protect(self, message: bytes, header: MSHHeader) -> bytes:
        return message


class HL7Handler:
    """The HL7 v2 room's reader: the site's mappings, visits and warnings."""

    def __init__(self, reader: HL7Reader, *, biometric_key_file: Path | None = None) -> None:
        self.reader = reader
        self._key_file = biometric_key_file
        self._key: bytes | None = None

    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        return self.reader.intake(message, sender=header.sender)

    def protect(self, message: bytes, header: MSHHeader) -> bytes:
        paths = self.reader.biometric_paths
        if not paths:
            return message
        if self._key is None:
            if self._key_file is None:
                raise ConfigError("a mapping marks a biometric element but no key is configured",
                                  location="intake.biometric_key_file")
            self._key = load_or_make_key(self._key_file)
        return protect_biometric(message, paths, self._key)


def default_handler(controller: Controller | None = None) -> MessageHandler:
    """The HL7 v2 room for ``controller`` (its site overlay and organisation)."""
    from bridge.link.intake import site_reader

    config = controller.config if controller is not None else None
    return HL7Handler(site_reader(config),
                      biometric_key_file=config.intake.biometric_key_file if config else None)


# --- the listener ----------------------------------------------------------------------------

_ID_SYSTEMS = (
    ("HDSD00.11.048", "urn:oid:2.16.156.10011.1.3"),
    ("HDSD00.11.053", "urn:oid:2.16.156.10011.1.19"),
    ("HDSD00.11.006", "urn:oid:2.16.156.10011.1.13"),
    ("HDSD00.11.140", "urn:oid:2.16.156.10011.1.12"),
    ("HDSD00.16.021", "urn:oid:2.16.156.10011.1.19"),
    ("HDSD00.16.052", "urn:oid:2.16.156.10011.1.12"),
    ("HDSD00.13.116", "urn:oid:2.16.156.10011.1.12"),
    ("HDSD00.03.025", "urn:oid:2.16.156.10011.1.11"),
)


def _patient_ids(taken: Intake) -> list[tuple[str, str]]:
    """Patient identifiers of what was read, for the audit pseudonym."""
    elements: dict[str, Any] = {}
    if taken.part is not None:
        elements.update(taken.part.elements)
    if isinstance(taken.record, dict) and isinstance(taken.record.get("elements"), dict):
        elements.update(taken.record["elements"])
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
        on_routable: WakeHook | None = None,
    ) -> None:
        """``ssl_context`` is required when ``config.tls`` is true (a server context
        requiring client certificates); ``on_refused`` audits failed handshakes;
        ``on_routable`` is called after a commit that left something to route."""
        if config.tls and ssl_context is None:
            raise ValueError("an MLLP listener with tls needs an ssl_context")
        self.c = controller
        self.config = config
        # Sender text from MSH is named in logs and audit entries under the bridge's key.
        self._label_key = controller.label_key
        self.handler = handler if handler is not None else default_handler(controller)
        self._ssl_context = ssl_context if config.tls else None
        self._on_refused = on_refused
        self._on_routable = on_routable
        self._server: asyncio.base_events.Server | None = None
        self._tls: TLSListener | None = None
        self._connections: set[_MLLPConnection] = set()
        self._allowed = frozenset(config.allowed_facilities)
        # Messages arriving on several connections while one commit is being flushed
        # are committed together: one flush to disk for the group, each its own answer.
        self._commit: GroupCommit = GroupCommit(controller.db, functools.partial(intake_db.accept_many,
                                                                    controller.store))
        self.port: int | None = None
        self.stats: dict[str, int] = {"accepted": 0, "duplicates": 0, "rejected": 0, "failed": 0}
        # One thread reads large messages, one at a time (see _INLINE_BYTES).
        self._reading: ThreadPoolExecutor | None = None

    def use_context(self, ssl_context: ssl.SSLContext) -> None:
        """Handshake new connections with ``ssl_context`` (certificates reloaded)."""
        if self._tls is not None:
            self._tls.ssl_context = ssl_context

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
        if self._reading is not None:
            self._reading.shutdown(wait=False)
            self._reading = None

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
        if pinned(identity.fingerprint_sha256, self.config.allowed_client_fingerprints):
            return True
        if identity.partner_id != self.c.id:
            return False
        pins = self.c.config.server.local_client_fingerprints
        return not pins or pinned(identity.fingerprint_sha256, pins)

    def _facility_allowed(self, header: MSHHeader) -> bool:
        if not self._allowed:
            return True
        return header.sending_facility in self._allowed or header.facility_id in self._allowed

    async def handle(self, event: Event, peer: str) -> bytes:
        """Answer one framed message (or framing error) with the bytes of its ACK."""
        c = self.c
        now = c.clock()
        if isinstance(event, (FrameTooLarge, MissingStartBlock)):
            return await self._refuse(event, tolerant_header(event.head), peer, now)
        message = event
        try:
            header = read_msh(message)
        except ParseError as exc:
            return await self._refuse(exc, message, peer, now)
        if not self._facility_allowed(header):
            exc2 = FacilityNotAllowed("sending facility is not allowed here", location="MSH-4")
            return await self._refuse(exc2, header, peer, now)
        try:
            # Nothing below (digest, store, mapping) ever sees a biometric value.
            message = await self._read(len(message), self.handler.protect, message, header)
        except BridgeError as exc:
            return await self._refuse(exc, header, peer, now)
        digest = hashlib.sha256(message).hexdigest()
        subject = f"hl7:{header.label(self._label_key)}"
        try:
            taken = await self._read(len(message), self.handler.prepare, message, header)
        except BridgeError as exc:
            # A copy of a message accepted before keeps its answer, even if it would
            # not be accepted today (a site overlay changed since).
            answered = await self._answer_copy(message, digest, header, peer, now)
            return answered if answered is not None else await self._refuse(
                exc, message, peer, now)
        except Exception as exc:  # noqa: BLE001 - answered AE 207, logged by type
            # Only the type: third-party exception texts can carry field values.
            log.error("HL7 handler failed on %s: %s", subject, type(exc).__name__)
            failure = HandlerFailure(
                "message could not be processed", location="MSH", hl7_code="207"
            )
            return await self._refuse(failure, header, peer, now)
        return await self._accept(taken, message, header, digest, peer, now)

    async def _read(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the event loop for a message under ``_INLINE_BYTES``, else on
        the listener's reading thread (the loop keeps answering other peers meanwhile)."""
        if size < _INLINE_BYTES:
            return fn(*args)
        if self._reading is None:
            self._reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-read")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reading, functools.partial(fn, *args))

    async def _accept(self, taken: Intake, message: bytes, header: MSHHeader, digest: str,
                      peer: str, now: datetime) -> bytes:
        c = self.c
        subject = f"hl7:{header.label(self._label_key)}"
        record = taken.record
        categories = [f"HL7v2:{id_label(taken.message_type, self._label_key)}"]
        if taken.dataset:
            categories.append(taken.dataset)
        if taken.visit is not None:
            categories.append(f"visit:{taken.visit.kind}")
        patient = c.pseudonym(_patient_ids(taken))
        audit = c.audit(
            "hl7.receive",
            subject=subject,
            patient=patient,
            categories=categories,
            digest_value=digest,
            detail=f"warnings={len(taken.warnings)}" if taken.warnings else None,
            now=now,
        )
        duplicate = c.audit("hl7.duplicate", subject=subject, digest_value=digest, now=now)
        source = taken.message if taken.message is not None else header

        def make_ack(entry: Any, warnings: list[str]) -> bytes:
            # The message's warnings and filing's (a charge transaction already counted).
            return build_ack(source, "AA", now=now, warnings=warnings)

        record_bytes = (orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
                        if record is not None else None)
        own = None
        if record is not None and record_bytes is not None and taken.dataset:
            routable = could_route(c.config.routes,
                                   Source(taken.message_type, taken.dataset, taken.facility))
            own = intake_db.OwnRecord(taken.message_type, taken.dataset, taken.facility,
                                      record_bytes, "pending" if routable else "unrouted")
        filing = None
        if taken.visit is not None and taken.part is not None:
            filing = intake_db.Filing(taken.visit, taken.part, c.config.intake.correction_days)
        try:
            accepted: intake_db.Accepted = await self._commit(
                sender=header.sender,
                control_id=header.control_id, digest=digest, message=message,
                record=record_bytes,
                warnings=taken.warnings, audit=audit, duplicate_audit=duplicate,
                make_ack=make_ack, filing=filing, own=own, now=now)
        except (ConflictError, MappingError) as exc:
            # Another connection stored other content first, or the message cannot
            # belong to its visit: refused, nothing written.
            return await self._refuse(exc, source, peer, now)
        except BridgeError as exc:
            return await self._failed(exc, header, now)
        except Exception as exc:  # noqa: BLE001 - answered AE 207, logged by type
            log.error("HL7 message %s could not be stored: %s", subject, type(exc).__name__)
            failure = HandlerFailure(
                "acknowledgement could not be built", location="MSH", hl7_code="207"
            )
            return await self._failed(failure, header, now)
        self.stats["accepted" if accepted.created else "duplicates"] += 1
        if accepted.route and self._on_routable is not None:
            self._on_routable()
        return accepted.ack

    async def _answer_copy(self, message: bytes, digest: str, header: MSHHeader, peer: str,
                           now: datetime) -> bytes | None:
        """The answer to a message already accepted under this control id, or None."""
        c = self.c
        try:
            existing = await c.db.call(intake_db.lookup, c.store, header.sender,
                                       header.control_id)
        except StoreError:
            return None
        if existing is None:
            return None
        return await self._answer_existing(existing, digest, header, peer, now)

    async def _answer_existing(
        self,
        existing: intake_db.Stored,
        digest: str,
        header: MSHHeader,
        peer: str,
        now: datetime,
    ) -> bytes:
        if existing.digest != digest:
            conflict = ConflictError(
                "duplicate control id with different content", location="MSH-10"
            )
            return await self._refuse(conflict, header, peer, now)
        self.stats["duplicates"] += 1
        await self._audit(
            self.c.audit(
                "hl7.duplicate",
                subject=f"hl7:{header.label(self._label_key)}",
                digest_value=digest,
                now=now,
            )
        )
        return existing.ack

    async def _refuse(
        self,
        exc: BridgeError,
        source: MSHHeader | HL7Message | bytes | None,
        peer: str,
        now: datetime,
    ) -> bytes:
        """Audit and answer a refusal (AE or AR by :func:`ack_code_for`), naming where."""
        self.stats["rejected"] += 1
        if isinstance(source, (bytes, bytearray)):
            source = tolerant_header(bytes(source)) or None
        subject = f"peer:{peer}"
        if isinstance(source, MSHHeader):
            subject = f"hl7:{source.label(self._label_key)}"
        elif source is not None:
            subject = f"hl7:{_label_of(source, self._label_key)}"
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
        return build_ack(source, ack_code_for(exc), error=exc, now=now)

    async def _failed(self, exc: BridgeError, header: MSHHeader, now: datetime) -> bytes:
        """Our side failed (store, ACK builder): never AA; AE 207 so the sender tries again."""
        self.stats["failed"] += 1
        log.error("HL7 message %s not stored: %s", header.label(self._label_key), exc.code)
        await self._audit(
            self.c.audit(
                "hl7.reject",
                subject=f"hl7:{header.label(self._label_key)}",
                outcome="failure",
                detail=f"{exc.code}@{exc.location or '-'}",
                now=now,
            )
        )
        # The ACK says what the sender needs (not stored, send again), not our file paths.
        answer = StoreError("message could not be stored; send it again", hl7_code="207")
        return build_ack(header, "AE", error=answer, now=now)

    async def _audit(self, record: Any) -> None:
        try:
            await self.c.db.append_audit(record)
        except BridgeError as exc:  # the answer stands even if the log cannot take it
            log.error("could not audit an HL7 outcome: %s", exc.code)


def _label_of(source: HL7Message, key: bytes) -> str:
    """A parsed message named as :meth:`MSHHeader.label` names it."""
    msh = source.msh
    return message_label(f"{msh.raw(3)}|{msh.raw(4)}", msh.raw(10), key)


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
        # Timeouts (loop time): a frame is timed from its start block, so a peer that
        # trickles bytes cannot hold it open; idleness from the last byte in or ACK out.
        self._frame_timeout = listener.config.frame_timeout_seconds
        self._idle_timeout = listener.config.idle_timeout_seconds
        self._frames_ended_seen = 0
        self._anomalies_seen = (0, 0, 0)
        self._frame_began: float | None = None
        self._last_activity = 0.0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not derive from asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
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
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        self.worker = loop.create_task(self._run())
        self._schedule()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        for event in self.framer.events(data):
            self.queue.put_nowait(event)
        self._log_anomalies()
        now = asyncio.get_running_loop().time()
        self._last_activity = now
        began = False
        ended = self.framer.frames_ended
        if not self.framer.in_frame:
            self._frame_began = None
        elif self._frame_began is None or ended != self._frames_ended_seen:
            # A frame began after the last one ended (a start block abandoning an unended
            # frame does not restart the clock).
            self._frame_began = now
            began = True
        self._frames_ended_seen = ended
        if self.queue.qsize() >= _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        # Deadlines that moved later need no new timer: one firing early re-arms itself.
        if began or self._timer is None:
            self._schedule()

    def _log_anomalies(self) -> None:
        """Log framing the peer got wrong that has no answer of its own (what is answered,
        an empty frame or a message without its start block, is logged as a refusal):
        counts only, never the bytes."""
        f = self.framer
        now = (f.aborted_frames, f.unframed_dropped, f.stray_end_blocks)
        if now == self._anomalies_seen:
            return
        aborted, dropped, ends = (a - b for a, b in zip(now, self._anomalies_seen, strict=True))
        self._anomalies_seen = now
        problems = []
        if aborted:
            problems.append(f"{aborted} frame(s) abandoned by a new start block (VT)")
        if dropped:
            problems.append(f"{dropped} run(s) of bytes outside any frame dropped"
                            " (no start block before them, no end block after them)")
        if ends:
            problems.append(f"{ends} end block(s) (FS CR) outside any frame ignored")
        log.warning("MLLP connection %s: %s", self.peer, "; ".join(problems))

    # --- timeouts ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """Arm the timer for the nearest deadline (frame or idle), if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closing:
            return
        deadlines = []
        if self._frame_began is not None and not self._paused:
            deadlines.append(self._frame_began + self._frame_timeout)
        if self._idle_timeout > 0:
            deadlines.append(self._last_activity + self._idle_timeout)
        if deadlines:
            self._timer = asyncio.get_running_loop().call_at(min(deadlines), self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._closing or self.transport is None:
            return
        now = asyncio.get_running_loop().time()
        if self._frame_began is not None and not self._paused \
                and now >= self._frame_began + self._frame_timeout:
            # A half-received frame held past its time: drop it and the connection, so
            # stalled or trickling peers cannot hold memory (at most max_message_bytes
            # each) for ever. The peer resends the whole message on a new connection.
            log.warning("MLLP connection %s closed: a frame was not ended within %s s"
                        " (%d bytes held)", self.peer, self._frame_timeout,
                        self.framer.buffered)
            self._close(abort=True)
            return
        if self._idle_timeout > 0 and now >= self._last_activity + self._idle_timeout:
            if self._busy or not self.queue.empty() or self.framer.in_frame:
                self._last_activity = now  # answering is activity: wait a full period more
            else:
                log.info("MLLP connection %s closed: idle for %s s", self.peer,
                         self._idle_timeout)
                self._close(abort=False)
                return
        self._schedule()

    def _close(self, *, abort: bool) -> None:
        self._closing = True
        self.queue.put_nowait(None)
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def eof_received(self) -> bool:
        # Answer what was received, then close (see _run). Plain TCP can keep its write
        # side open after the peer's FIN; TLS cannot (the transport closes anyway).
        self.queue.put_nowait(None)
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            # The peer closed: what it left unfinished can have no answer.
            if self.framer.in_frame and self.framer.buffered:
                log.warning("MLLP connection %s closed by the peer with a frame not ended"
                            " (no end block, FS CR; %d bytes dropped)", self.peer,
                            self.framer.buffered)
            if self.framer.holds_unframed:
                log.warning("MLLP connection %s closed by the peer after bytes outside any"
                            " frame (no start block, VT, nor end block, FS CR)", self.peer)
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self.listener._connections.discard(self)
        self.queue.put_nowait(None)

    def shutdown(self) -> None:
        """Stop after the message in hand; unanswered messages will be resent by the peer."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
                    if self._frame_began is not None:
                        # The frame could not progress while reading was paused.
                        self._frame_began = asyncio.get_running_loop().time()
                    self._schedule()
                self._busy = True
                try:
                    wire = frame(await self.listener.handle(event, self.peer))
                except Exception as exc:  # noqa: BLE001 - a bug must not leave the peer waiting
                    # Closing tells the peer to send again; the log says why, by type only
                    # (an exception's text can carry values from the message).
                    log.error("MLLP connection %s closed: the answer could not be built (%s)",
                              self.peer, type(exc).__name__)
                    break
                finally:
                    self._busy = False
                if self.transport is None:
                    break
                self.transport.write(wire)
                self._last_activity = asyncio.get_running_loop().time()
        except Exception as exc:  # noqa: BLE001 - never an unretrieved task exception
            log.error("MLLP connection %s closed: %s", self.peer, type(exc).__name__)
        finally:
            if self.transport is not None:
                self.transport.close()
