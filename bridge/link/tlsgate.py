"""A TCP listener that performs the TLS handshake itself before handing over.

``loop.create_server(ssl=...)`` swallows handshake failures: a client without a
certificate, or with one from another CA, is dropped without the application ever
hearing of it. Every refusal must leave an audit record, so this listener accepts the
TCP connection, runs ``loop.start_tls`` itself, reports a failed handshake to a
callback, and only gives a connection whose handshake succeeded to the HTTP (or
MLLP) protocol. No byte reaches the application before the handshake completes, and
the protocol handed a connection is told of its end (``connection_lost``) like any
protocol, also when the client sent its bytes and left before the hand-over.

Failed handshakes are sorted and audited by :mod:`bridge.link.handshakes`: refusals
with their reason and the fingerprint of the certificate the client presented, stalls
and drops as bounded counts. The fingerprint is read from the client's Certificate
message as OpenSSL processes it (the context's message callback), because a refused
handshake leaves no peer certificate to ask for afterwards; it works alike for TLS 1.2
and 1.3, whose handshake messages the callback sees decrypted.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from bridge.link.handshakes import HandshakeAudit, HandshakeHook, classify

log = logging.getLogger("bridge.link.tls")

#: What the listener calls to write one audit row about failed handshakes.
RefusalHook = HandshakeHook

_HANDSHAKE = 22  # TLS content type
_CERTIFICATE = 11  # handshake message type


def _first_certificate(body: bytes) -> bytes | None:
    """The DER of the first certificate in a Certificate handshake message body.

    TLS 1.3 prefixes the list with a request context and gives each entry extensions;
    TLS 1.2 does neither. The layout whose lengths add up is the one used.
    """

    def u24(data: bytes, at: int) -> int:
        return int.from_bytes(data[at : at + 3], "big")

    context_len = body[0] if body else 0
    at13 = 1 + context_len
    if len(body) >= at13 + 3 and at13 + 3 + u24(body, at13) == len(body):  # TLS 1.3
        start = at13 + 3
    elif len(body) >= 3 and 3 + u24(body, 0) == len(body):  # TLS 1.2
        start = 3
    else:
        return None
    if len(body) < start + 3:
        return None  # an empty list: no certificate
    size = u24(body, start)
    der = body[start + 3 : start + 3 + size]
    return der if len(der) == size and size else None


def _note_certificate(
    conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
) -> None:
    if direction != "read" or content_type != _HANDSHAKE or msg_type != _CERTIFICATE:
        return
    with contextlib.suppress(IndexError, TypeError, AttributeError):
        der = _first_certificate(bytes(data[4:]))  # after the 4-byte handshake header
        if der is not None:
            conn._presented_sha256 = "sha256:" + hashlib.sha256(der).hexdigest()


class _ProbedSSLObject(ssl.SSLObject):
    """Carries the presented certificate's fingerprint on a failed handshake's error."""

    _presented_sha256: str | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            exc.presented_sha256 = self._presented_sha256  # type: ignore[attr-defined]
            raise


def probe_presented_certificates(ctx: ssl.SSLContext) -> None:
    """Make failed handshakes on ``ctx`` report the presented certificate's fingerprint."""
    ctx.sslobject_class = _ProbedSSLObject
    # The C-level setter takes the raw integers; ssl.py's wrapper would convert every
    # record's fields to enums first, for every record of every connection.
    _ssl._SSLContext._msg_callback.__set__(ctx, _note_certificate)  # type: ignore[attr-defined]


class _Gate(asyncio.Protocol):
    def __init__(self, listener: TLSListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        # Application data can arrive with the client's last handshake flight and be
        # decrypted before the application protocol takes over: keep it for that protocol.
        self._early: list[bytes] = []
        self._early_eof = False
        # Bytes of the handshake read before the TLS layer took the transport over.
        # The standard library's loop honours pause_reading() in connection_made; uvloop
        # starts reading anyway, so the client's first flight can arrive here first.
        self._raw: list[bytes] = []
        self._tls_installed = False
        self._gone = asyncio.Event()
        # The end of the connection, when the TLS layer reported it to this gate: before
        # the hand-over (kept for the application protocol), or after it, through a call
        # the TLS layer scheduled while this gate was still its protocol.
        self._lost: tuple[Exception | None] | None = None
        self._application: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not derive from asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # Nothing may be read before start_tls takes over the transport.
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self._listener._tasks.add(task)
        task.add_done_callback(self._listener._tasks.discard)

    # Until the application protocol takes over (set_protocol), the TLS transport
    # reports to this gate; afterwards it reports to the application directly.

    def data_received(self, data: bytes) -> None:
        (self._early if self._tls_installed else self._raw).append(data)

    def _replay_raw(self, transport: asyncio.Transport) -> None:
        """Hand the TLS layer what was read before it took over, ahead of any later
        read: it runs after start_tls installed its protocol and before that protocol
        starts the handshake (both are scheduled by start_tls, after this)."""
        self._tls_installed = True
        layer = transport.get_protocol()
        if layer is self:
            return
        for chunk in self._raw:
            view = memoryview(chunk)
            while view:
                buffer = layer.get_buffer(len(view))  # type: ignore[attr-defined]
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                layer.buffer_updated(n)  # type: ignore[attr-defined]
                view = view[n:]
        self._raw.clear()

    def eof_received(self) -> bool | None:
        self._early_eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._application is not None:
            # Both loops' TLS layers report the end with call_soon, bound to the protocol
            # of that moment: a loss reported before the hand-over runs after it, and
            # possibly before what the application's connection_made started (see
            # _upgrade), hence once more through the loop.
            asyncio.get_running_loop().call_soon(self._application.connection_lost, exc)
            return
        if not self._tls_installed:
            # Gone before the TLS layer took over; uvloop's start_tls would then wait
            # for a handshake that never comes.
            self._gone.set()
            return
        # Gone during or right after the handshake, before the hand-over: the
        # application protocol hears of it after what was received (see _upgrade).
        self._lost = (exc,)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"
        upgrade = loop.create_task(loop.start_tls(
            transport,
            self,
            self._listener.ssl_context,
            server_side=True,
            ssl_handshake_timeout=self._listener.handshake_timeout,
        ))
        # Runs right after start_tls's first step (which swaps the transport's protocol
        # and schedules the handshake): see _replay_raw.
        loop.call_soon(self._replay_raw, transport)
        gone = loop.create_task(self._gone.wait())
        try:
            await asyncio.wait({upgrade, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not upgrade.done():
            upgrade.cancel()
            await asyncio.gather(upgrade, return_exceptions=True)
            transport.abort()
            await self._listener.audit.failed(classify(None, address, None))
            return
        try:
            tls_transport = upgrade.result()
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            transport.abort()
            fingerprint = getattr(exc, "presented_sha256", None)
            await self._listener.audit.failed(classify(exc, address, fingerprint))
            return
        ssl_object = tls_transport.get_extra_info("ssl_object") if tls_transport else None
        if tls_transport is None or ssl_object is None or ssl_object.version() is None:
            # The connection closed during the handshake (uvloop answers a connection
            # gone before its first byte with a closed transport rather than an error).
            if tls_transport is not None:
                tls_transport.abort()
            await self._listener.audit.failed(classify(None, address, None))
            return
        protocol = self._listener.protocol_factory()
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        for chunk in self._early:
            protocol.data_received(chunk)
        self._early.clear()
        if self._early_eof:
            protocol.eof_received()
        # Every protocol that was told of a connection is told of its end: a request
        # that a client sent and left in the same breath has nobody to wait for. Like
        # a transport, through the loop: what connection_made started runs first
        # (aiohttp's request loop on Python 3.11 fails an assertion if its connection
        # ended before that loop's first step, and logs it as an error).
        if self._lost is not None:
            loop.call_soon(protocol.connection_lost, self._lost[0])
        else:
            self._application = protocol


class TLSListener:
    """Listen on TCP, handshake with ``ssl_context``, then run ``protocol_factory``."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol] | Callable[[], Any],
        ssl_context: ssl.SSLContext,
        *,
        on_refused: RefusalHook | None = None,
        handshake_timeout: float = 10.0,
        audit_window: float = 60.0,
    ) -> None:
        """``on_refused`` writes the audit rows about failed handshakes, at most a
        bounded number per ``audit_window`` seconds (:class:`HandshakeAudit`)."""
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        probe_presented_certificates(ssl_context)
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout
        self.audit = HandshakeAudit(on_refused, listener="tls-listener", window=audit_window)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self), host, port, reuse_address=True)
        sock = self._server.sockets[0]
        bound = int(sock.getsockname()[1])
        self.audit = HandshakeAudit(
            self.on_refused, listener=f"tls-listener:{bound}", window=self.audit.window
        )
        self._flusher = loop.create_task(self._flush_periodically())
        return bound

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.audit.window)
            await self.audit.flush()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.audit.flush()
