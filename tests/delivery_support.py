"""A byte-level fault proxy between two bridges, and waiting on outbox states.

The proxy forwards TCP bytes (the TLS session passes through it untouched) and can
misbehave the way networks and partners do:

- ``refuse``: the port is closed (connection refused);
- ``blackhole``: connections are accepted and read, nothing is ever answered;
- ``cut_responses``: the request reaches the partner, the answer never comes back
  (the connection is aborted once the partner starts answering);
- ``pass``: a plain relay.

``accepted`` counts connections the proxy took (each one a connection attempt by the
sender), with their times, so tests can bound connection attempts during an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path
from typing import Any, Literal

Mode = Literal["pass", "refuse", "blackhole", "cut_responses"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultProxy:
    def __init__(self, target_port: int, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.target = ("127.0.0.1", target_port)
        self.mode: Mode = "pass"
        #: Bytes from the client past which an answer counts as the answer to a request
        #: (a TLS handshake from the client is well under this; a claim well above).
        self.request_bytes = 6000
        #: In ``cut_responses``: the share of connections whose answer is cut.
        self.cut_ratio = 1.0
        self.cuts = 0
        self._rng = random.Random(7)
        self.accepted: list[float] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        await self.set_mode("pass")

    async def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "refuse":
            await self._close_server()
            self.cut()
            return
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        if mode != "pass":
            self.cut()

    def attempts_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.accepted if start <= t < end)

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def stop(self) -> None:
        await self._close_server()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted.append(time.monotonic())
        self._transports.add(writer.transport)
        try:
            if self.mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            self._transports.add(up_writer.transport)
            cut = self.mode == "cut_responses" and self._rng.random() < self.cut_ratio
            sent = [0]

            async def pump(
                src: asyncio.StreamReader, dst: asyncio.StreamWriter, answer: bool
            ) -> None:
                try:
                    while data := await src.read(65536):
                        if not answer:
                            sent[0] += len(data)
                        elif cut and sent[0] > self.request_bytes:
                            # The client has sent more than a handshake (a request) and
                            # the partner answers it: drop the answer and the connection.
                            self.cuts += 1
                            writer.transport.abort()
                            up_writer.transport.abort()
                            return
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        dst.close()

            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        finally:
            self._tasks.discard(task)
            self._transports.discard(writer.transport)


def point_partner_at(config: Path, port: int) -> None:
    """Send the hospital's claims to ``port`` (the proxy) instead of the insurer's port."""
    text = config.read_text(encoding="utf-8")
    import re

    new, n = re.subn(
        r'base_url = "https://127\.0\.0\.1:\d+/',
        f'base_url = "https://127.0.0.1:{port}/',
        text,
        count=1,
    )
    assert n == 1, "the hospital's configuration names the insurer's base_url"
    config.write_text(new, encoding="utf-8")


def link_settings(config: Path, **values: Any) -> None:
    """Add keys to the outbound link of the hospital's configuration file."""
    lines = "".join(
        f"{k} = {v!r}\n" if not isinstance(v, str) else f'{k} = "{v}"\n' for k, v in values.items()
    )
    text = config.read_text(encoding="utf-8")
    assert 'purpose = "HPAYMT"\n' in text
    config.write_text(
        text.replace('purpose = "HPAYMT"\n', 'purpose = "HPAYMT"\n' + lines, 1), encoding="utf-8"
    )
