"""The insurer's ``bridge serve`` (a real process) publishing to RabbitMQ when the queue it
declared disappears while the connection stays up: an administrator deletes it, or the
consuming team drops and re-creates it with other arguments.

The broker returns what the bridge publishes (``mandatory``), so nothing is lost; but
with ``declare = true`` the bridge owns the queue's existence, and the next attempt
must declare it again rather than publish into the void until the claim dies a day
later.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aio_pika.exceptions
import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import (
    AMQP_URL,
    QueueConsumer,
    Serve,
    add_destinations,
    delete_queue,
    fast_hospital,
    unique_queue,
    wait_for,
)

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


async def test_a_queue_deleted_under_a_live_connection_is_declared_again(
    tmp_path: Path, queue_name: str
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    add_destinations(insurer_cfg, amqp_url="amqp://127.0.0.1:5672/", queue=queue_name)
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    records = inpatient_records(2, seed=53)
    consumer = QueueConsumer(queue_name)
    try:
        for i, record in enumerate(records):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        first = (await hospital.submit(records[0], LINK_OUT)).message_id
        await consumer.start()
        await wait_for(lambda: consumer.got.ids == {first}, 30, "the first claim")
        await consumer.stop()

        # Gone, while the bridge's connection stays open.
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue_name)

        second = (await hospital.submit(records[1], LINK_OUT)).message_id
        # The bridge's first try is returned (no queue); its next declares the queue
        # again and the claim waits there, before any consumer is back.
        async def redeclared() -> int:
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(queue_name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    return -1
                return queue.declaration_result.message_count or 0

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (waiting := await redeclared()) < 1:
            assert loop.time() < deadline, "the bridge did not declare its queue again"
            await asyncio.sleep(0.3)
        assert waiting == 1
        consumer = QueueConsumer(queue_name, consumer.got)
        await consumer.start()
        await wait_for(lambda: second in consumer.got.ids, 20,
                       "the second claim in the re-declared queue")
    finally:
        await hospital.stop()
        insurer.stop()
        await consumer.stop()


async def test_a_broker_refusing_the_user_is_named_as_such_not_as_unreachable(
    tmp_path: Path, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wrong password: the broker answers and refuses. The operator sees amqp-refused
    # (a setting to fix), where a broker that is down is amqp-unreachable.
    import json

    from e2e_support import cli

    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    monkeypatch.setenv("BRIDGE_TEST_AMQP_PASSWORD", "not-the-password")
    add_destinations(insurer_cfg, amqp_url="amqp://127.0.0.1:5672/", queue=queue_name,
                     extra='username = "guest"\npassword_env = "BRIDGE_TEST_AMQP_PASSWORD"\n')
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        record = inpatient_records(1, seed=57)[0]
        await hospital.controller.put_consent(consent_for(record, consent_id="c-0"))
        await hospital.submit(record, LINK_OUT)

        def errors() -> list[str]:
            listed = cli("inbox", "list", "--config", str(insurer_cfg), "--json")
            return [h.get("lastError") or "" for e in json.loads(listed.stdout or "[]")
                    for h in e.get("handoffs", [])]

        deadline = asyncio.get_running_loop().time() + 30
        while not any(errors()):
            assert asyncio.get_running_loop().time() < deadline, "no hand-off attempt"
            await asyncio.sleep(0.3)
        assert errors() == ["amqp-refused"], errors()
        assert "not-the-password" not in (tmp_path / "insurer.log").read_text()
    finally:
        await hospital.stop()
        insurer.stop()
