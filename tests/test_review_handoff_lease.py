"""A hand-off whose broker connection stalls past the worker's lease is not handed over
twice.

Two workers of one insurer store (two processes, as behind a load balancer) hand off
to the real RabbitMQ through a proxy. The first worker's (re)connection is answered up
to the channel and then held: it waits with the claim leased. Once the lease has
expired the second worker takes the claim and hands it over. When the broker's
answers finally reach the first worker it must publish nothing: the consumer sees the
claim once, and the second worker's record of it stands.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from handoff_support import QueueConsumer, delete_queue, unique_queue, wait_for
from test_handoff_worker import accept, controller_with_senders

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.handoff import HandoffWorker
from bridge.link.node import Controller


class StallProxy:
    """A TCP proxy to RabbitMQ that, for connections opened while ``stalling``, passes
    the connection handshake (AMQP channel 0) and holds every later frame from the
    broker until :meth:`release`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stalling = False
        self.held = 0
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def release(self) -> None:
        self._released.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stall = self.stalling
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._writers += [writer, up_writer]

        async def up() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def down() -> None:
            buffer = b""
            while data := await up_reader.read(65536):
                buffer += data
                while len(buffer) >= 7:
                    _kind, channel, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    frame, buffer = buffer[:8 + size], buffer[8 + size:]
                    if stall and channel != 0 and not self._released.is_set():
                        self.held += 1
                        await self._released.wait()
                    writer.write(frame)
                    await writer.drain()

        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_writer.close()


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


@pytest.mark.battery
async def test_a_lease_lost_during_a_reconnect_publishes_nothing(
    tmp_path: Path, queue_name: str
) -> None:
    proxy = StallProxy(free_port())
    await proxy.start()
    first = controller_with_senders(tmp_path, amqp_url=f"amqp://127.0.0.1:{proxy.port}/",
                                    queue=queue_name, timeout=1)  # a lease of 7 s
    dest = first.config.handoff[0]
    mid = accept(first, "hospital-a", 1)
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    proxy.stalling = True
    stalled = HandoffWorker(first, dest, 0, poll_interval=0.05)
    await stalled.start()
    second_controller = Controller(load_config(Path(str(first.config.source))))
    other = HandoffWorker(second_controller, dest, 0, poll_interval=0.05)
    try:
        await wait_for(lambda: proxy.held >= 1, 10, "the first worker's channel to stall")
        proxy.stalling = False
        await other.start()  # takes the claim once the first worker's lease expired
        await wait_for(lambda: len(consumer.got.raw) == 1, 20, "the second worker's hand-off")
        proxy.release()  # the broker's answers reach the first worker at last
        await asyncio.sleep(2.5)  # ample for a publish and its confirm on loopback
        assert [m for _, m, _ in consumer.got.raw] == [mid]
        delivered = [e.record for e in first.store.audit_entries()
                     if e.record.action == "handoff.delivered"]
        assert len(delivered) == 1 and delivered[0].subject == mid
        assert stalled.stats["delivered"] == 0 and other.stats["delivered"] == 1
    finally:
        await other.stop()
        await stalled.stop()
        await consumer.stop()
        await proxy.stop()
