"""The TLS listener and the protocols it starts, over real sockets and real certificates,
on uvloop and on the standard library's loop.

A protocol the listener starts after a handshake is told of everything on its connection,
in order: ``connection_made``, what the client sent, and ``connection_lost``, also when
the client sent its bytes and left before the listener handed the connection over. A
protocol that never hears of the end keeps whatever it was waiting for (an HTTP request's
body, an HL7 message's end) until some timeout.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from e2e_support import client_ssl
from leaving_support import WAYS, leave

from bridge import eventloop
from bridge.link.tlsgate import TLSListener
from bridge.trust.pki import init_dev_pki
from bridge.trust.tls import server_context

_PER_KIND = 5
_PAUSES = (0.0, 0.02)


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = b""
        self.ended = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        # Like aiohttp's request loop: a task started here takes its first step before
        # the protocol hears of the end (aiohttp on Python 3.11 fails an assertion else).
        self.task = asyncio.get_running_loop().create_task(self._first_step())

    async def _first_step(self) -> None:
        self.events.append("task")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.ended.set()


def _send_and_leave(port: int, ctx: ssl.SSLContext, n: int, way: str, pause: float,
                    start: threading.Barrier) -> None:
    start.wait()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    if pause:
        threading.Event().wait(pause)
    tls.sendall(b"hello %d\n" % n)
    leave(tls, way)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_every_protocol_started_hears_the_end_of_its_connection(tmp_path: Path, loop: str) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki, ["insurer-b", "hospital-a"], now=datetime.now(UTC) - timedelta(days=1))
    client = client_ssl(tmp_path, "hospital-a")
    kinds = [(way, pause) for way in WAYS for pause in _PAUSES for _ in range(_PER_KIND)]

    async def run() -> list[_Recorder]:
        started: list[_Recorder] = []

        def factory() -> _Recorder:
            started.append(_Recorder())
            return started[-1]

        listener = TLSListener(factory, server_context(
            pki / "insurer-b" / "tls.pem", pki / "insurer-b" / "tls.key", pki / "ca.pem"))
        port = await listener.start("127.0.0.1", 0)
        start = threading.Barrier(len(kinds))
        threads = [threading.Thread(target=_send_and_leave,
                                    args=(port, client, n, way, pause, start))
                   for n, (way, pause) in enumerate(kinds)]
        try:
            for t in threads:
                t.start()
            await asyncio.to_thread(lambda: [t.join() for t in threads])
            # Each end is told within moments; a protocol left waiting would wait forever.
            async with asyncio.timeout(5):
                while len(started) < len(kinds):
                    await asyncio.sleep(0.05)
                await asyncio.gather(*(r.ended.wait() for r in started))
        except TimeoutError:
            pass
        finally:
            await listener.close()
        return started

    started = eventloop.run(run(), loop)
    assert len(started) == len(kinds)
    for recorder in started:
        assert recorder.events[0] == "made"
        assert recorder.events.index("task") < recorder.events.index("lost"), recorder.events
        assert recorder.events[-1] == "lost", recorder.events
        assert recorder.events.count("lost") == 1, recorder.events
    # What the clients that closed in order sent arrived before the end was told.
    received = sorted(r.data for r in started if r.data)
    orderly = [n for n, (way, _) in enumerate(kinds) if way != "reset"]
    assert {b"hello %d\n" % n for n in orderly} <= set(received), received
