"""The hand-off worker against the real broker, with claims from several senders.

Claims are put straight into the insurer's store (as the receiving path does, with
the queue filled in the same transaction), so the worker is tested on its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from e2e_support import make_workdir
from handoff_support import (
    FaultProxy,
    QueueConsumer,
    add_destinations,
    delete_queue,
    unique_queue,
    wait_for,
)

from bridge.config import load_config
from bridge.demo import free_port
from bridge.ledger.audit import AuditRecord
from bridge.ledger.handoff import queue_hook
from bridge.link.handoff import HandoffService
from bridge.link.node import Controller

SENDERS = ("hospital-a", "clinic-x")


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


def accept(c: Controller, sender: str, n: int) -> str:
    mid = f"urn:uuid:{uuid.uuid4()}"
    now = datetime.now(UTC)
    c.store.inbox_accept(
        sender=sender, message_id=mid, digest="sha256:" + "0" * 64,
        payload=b'{"resourceType":"Bundle","n":%d}' % n,
        audit=AuditRecord(time=now, actor=c.id, action="message.receive", subject=mid),
        make_receipt=lambda e: b'{"resourceType":"Bundle","type":"message"}', now=now,
        within=queue_hook(c.handoff_routes, sender=sender, link="claims-in", now=now),
    )
    return mid


def controller_with_senders(tmp_path: Path, **destinations: str) -> Controller:
    _, insurer_cfg = make_workdir(tmp_path)
    add_destinations(insurer_cfg, **destinations)
    text = insurer_cfg.read_text(encoding="utf-8")
    text += '\n[[partners]]\nid = "clinic-x"\nsigning_certs = ["pki/clinic-x/sign.pem"]\n'
    insurer_cfg.write_text(text, encoding="utf-8")
    return Controller(load_config(insurer_cfg))


async def test_senders_go_in_parallel_over_one_broker_connection_each_in_order(
    tmp_path: Path, queue_name: str
) -> None:
    proxy = FaultProxy(free_port())
    await proxy.start()
    c = controller_with_senders(tmp_path, amqp_url=f"amqp://127.0.0.1:{proxy.port}/",
                                queue=queue_name)
    sent = {s: [accept(c, s, n) for n in range(15)] for s in SENDERS}
    service = HandoffService(c, poll_interval=0.02)
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    await service.start()
    try:
        await wait_for(lambda: len(consumer.got.ids) == 30, 20, "every claim")
    finally:
        await service.stop()
        await consumer.stop()
        await proxy.stop()
        await c.close()
    assert consumer.got.in_order_per_sender()
    for sender, ids in sent.items():
        assert [m for s, m, _ in consumer.got.order if s == sender] == ids
    assert len(consumer.got.raw) == 30
    assert proxy.connections == 1


async def test_stopping_gives_back_what_was_not_handed_over(tmp_path: Path) -> None:
    """A clean stop leaves nothing leased: the next start takes up at once."""
    from handoff_support import ClaimEndpoint

    endpoint = ClaimEndpoint(free_port(), delay=0.2)
    await endpoint.start()
    c = controller_with_senders(tmp_path, http_url=endpoint.url)
    ids = [accept(c, "hospital-a", n) for n in range(10)]
    service = HandoffService(c, poll_interval=0.02)
    await service.start()
    try:
        await wait_for(lambda: len(endpoint.got.ids) >= 1, 20, "the first hand-off")
        await service.stop()
        handed = len(endpoint.got.ids)
        assert handed < len(ids)
        with c.store.read("check") as tx:
            leased = tx.one("SELECT COUNT(*) FROM handoff WHERE state='sending'")[0]
        assert leased == 0
        service = HandoffService(c, poll_interval=0.02)
        await service.start()
        await wait_for(lambda: endpoint.got.ids == set(ids), 20, "the rest after a restart")
    finally:
        await service.stop()
        await endpoint.stop()
        await c.close()
    assert [m for _, m, _ in endpoint.got.order] == ids


@pytest.mark.battery
async def test_a_store_that_fails_for_a_while_does_not_stop_the_hand_off(tmp_path: Path) -> None:
    """Another process holds the store's write lock past the busy timeout while claims
    are being handed over: recording fails, the worker carries on, and once the store
    answers again every claim is handed over (some twice: at least once)."""
    import asyncio
    import sqlite3

    from handoff_support import ClaimEndpoint

    endpoint = ClaimEndpoint(free_port(), delay=0.1)
    await endpoint.start()
    c = controller_with_senders(tmp_path, http_url=endpoint.url)
    ids = [accept(c, "hospital-a", n) for n in range(6)]
    service = HandoffService(c, poll_interval=0.02)
    await service.start()
    blocker = sqlite3.connect(c.config.store.path, isolation_level=None)
    try:
        await wait_for(lambda: len(endpoint.got.ids) >= 1, 20, "the first hand-off")
        blocker.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(6.5)  # longer than the store's 5 s busy timeout
        blocker.execute("COMMIT")
        await wait_for(lambda: endpoint.got.ids == set(ids), 40, "every claim afterwards")
        worker = service.workers["claims-http"]
        assert worker._task is not None and not worker._task.done()
    finally:
        blocker.close()
        await service.stop()
        await endpoint.stop()
        await c.close()
    assert endpoint.got.in_order_per_sender()
