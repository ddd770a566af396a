"""A TCP listener that performs the TLS handshake itself before handing over.

``loop.create_server(ssl=...)`` swallows handshake failures: a client without a
certificate, or with one from another CA, is dropped without the application ever
hearing of it. Every refusal must leave an audit record, so this listener accepts the
TCP connection, runs ``loop.start_tls`` itself, reports a failed handshake to a
callback, and only gives a connection whose handshake succeeded to the HTTP (or
MLLP) protocol. No byte reaches the application before the handshake completes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("bridge.link.tls")

RefusalHook = Callable[[str, str], Awaitable[None]]


def handshake_reason(exc: BaseException) -> str:
    """A short, value-free reason for a failed handshake (OpenSSL's reason code)."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "HANDSHAKE_TIMEOUT"
    return type(exc).__name__


class _Gate(asyncio.Protocol):
    def __init__(self, listener: TLSListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        # Application data can arrive with the client's last handshake flight and be
        # decrypted before the application protocol takes over: keep it for that protocol.
        self._early: list[bytes] = []
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Nothing may be read before start_tls takes over the transport.
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self._listener._tasks.add(task)
        task.add_done_callback(self._listener._tasks.discard)

    # Until the application protocol takes over (set_protocol), the TLS transport
    # reports to this gate; afterwards it reports to the application directly.

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._early_eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"
        try:
            tls_transport = await loop.start_tls(
                transport,
                self,
                self._listener.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self._listener.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            transport.abort()
            reason = handshake_reason(exc)
            log.warning("TLS handshake refused from %s: %s", address, reason)
            if self._listener.on_refused is not None:
                try:
                    await self._listener.on_refused(address, reason)
                except Exception:  # the refusal stands even if recording it fails
                    log.exception("could not record a refused handshake")
            return
        if tls_transport is None:  # connection closed during the handshake
            return
        protocol = self._listener.protocol_factory()
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        for chunk in self._early:
            protocol.data_received(chunk)
        self._early.clear()
        if self._early_eof:
            protocol.eof_received()


class TLSListener:
    """Listen on TCP, handshake with ``ssl_context``, then run ``protocol_factory``."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol] | Callable[[], Any],
        ssl_context: ssl.SSLContext,
        *,
        on_refused: RefusalHook | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Gate(self), host, port, reuse_address=True)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
