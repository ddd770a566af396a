"""End to end: hospital bridge -> mutual TLS -> insurer bridge -> the insurer's own systems.

The insurer's claim system is played by a real aiohttp endpoint and a real RabbitMQ
queue (127.0.0.1:5672), each consumed the way the insurer's integration team would
from the README: deduplicating on (sender, message identity). Raw deliveries are
counted too: hand-off is at least once, so a resumed stream may repeat a claim.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import (
    ClaimEndpoint,
    FaultProxy,
    QueueConsumer,
    Received,
    add_destinations,
    canonical_digest,
    delete_queue,
    receipt_extension,
    unique_queue,
    wait_for,
)

from bridge.cli import main as cli_main
from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(16, seed=31)


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


async def start(config: Path) -> BridgeService:
    service = BridgeService(Controller(load_config(config)), poll_interval=0.05)
    await service.start()
    return service


async def push(hospital: BridgeService, records: list[dict[str, Any]]) -> list[str]:
    ids = []
    for record in records:
        await hospital.controller.put_consent(consent_for(record, consent_id=_cid(record)))
        ids.append((await hospital.submit(record, LINK_OUT)).message_id)
    return ids


def _cid(record: dict[str, Any]) -> str:
    return "c-" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def check_envelopes(got: Received, sender: str) -> None:
    """What the insurer's system can check on its own, from the README's description."""
    for (who, mid), env in got.first.items():
        assert who == sender == env["sender"]
        assert env["envelope"] == "ws-fhir-bridge.handoff" and env["version"] == 1
        assert env["messageId"] == mid == env["message"]["identifier"]["value"]
        assert env["messageDigest"] == canonical_digest(env["message"])
        receipt = env["receipt"]
        assert receipt_extension(receipt, "urn:ws-fhir-bridge:ext:request-message-id") == mid
        assert receipt_extension(receipt, "urn:ws-fhir-bridge:ext:request-digest") == \
            env["messageDigest"]
        assert receipt_extension(receipt, "urn:ws-fhir-bridge:ext:audit-seq") == env["auditSeq"]
        assert env["receiptDigest"].startswith("sha256:")


async def test_every_claim_reaches_the_queue_and_the_endpoint_once_per_identity_in_order(
    tmp_path: Path, records: list[dict[str, Any]], queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url,
                     amqp_url="amqp://127.0.0.1:5672/", queue=queue_name)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    try:
        ids = await push(hospital, records[:10])
        await wait_for(lambda: endpoint.got.ids == set(ids) and consumer.got.ids == set(ids),
                       30, "every claim at both destinations")
    finally:
        await hospital.stop()
        await insurer.stop()
        await consumer.stop()
        await endpoint.stop()

    for got in (endpoint.got, consumer.got):
        assert got.in_order_per_sender()
        assert [seq for _, _, seq in got.order] == list(range(1, 11))
        check_envelopes(got, "hospital-a")
        # Nothing went wrong on the way, so nothing came twice.
        assert len(got.raw) == len(ids)
    # The claim system can deduplicate from the headers alone, before parsing.
    h = endpoint.headers_seen[0]
    assert h["Idempotency-Key"] == f"hospital-a {h['X-Bridge-Message-Id']}"
    assert h["Content-Type"].startswith("application/json")
    m = consumer.properties[0]
    assert m.delivery_mode == 2 and m.content_type == "application/json"
    assert m.headers["x-bridge-sequence"] == "1"
    assert m.correlation_id == f"insurer-b audit {consumer.got.first[('hospital-a', m.message_id)]['auditSeq']}"

    # Every hand-off is settled and audited; status needs nobody.
    capsys.readouterr()
    assert cli_main(["status", "--config", str(insurer_cfg)]) == 0
    out = capsys.readouterr().out
    assert "hand-off claims-http (http): waiting 0, delivered 10, dead 0" in out
    assert "hand-off claims-amqp (amqp): waiting 0, delivered 10, dead 0" in out


async def test_hand_off_resumes_after_the_endpoint_and_the_broker_go_away(
    tmp_path: Path, records: list[dict[str, Any]], queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Stop the HTTP endpoint and cut the broker connection mid-stream; restart the
    queue consumer too. Hand-off resumes and nothing is lost."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    endpoint = ClaimEndpoint(free_port(), delay=0.02)
    await endpoint.start()
    proxy = FaultProxy(free_port())
    await proxy.start()
    add_destinations(insurer_cfg, http_url=endpoint.url,
                     amqp_url=f"amqp://127.0.0.1:{proxy.port}/", queue=queue_name)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    try:
        first = await push(hospital, records[:6])
        await wait_for(lambda: len(endpoint.got.ids) >= 2 and len(consumer.got.ids) >= 2, 30,
                       "the stream to start")
        # Mid-stream: the claim system goes down, the broker connection drops, and the
        # queue's consumer restarts.
        await endpoint.stop()
        await proxy.stop()
        await consumer.stop()
        rest = await push(hospital, records[6:12])
        ids = first + rest
        await wait_for(lambda: insurer.handoff.workers["claims-http"].failing is not None
                       and insurer.handoff.workers["claims-amqp"].failing is not None,
                       15, "both destinations to be seen failing")
        capsys.readouterr()
        assert cli_main(["status", "--config", str(insurer_cfg)]) == 1
        out = capsys.readouterr().out
        assert "FAILING: http-unreachable" in out
        assert "FAILING: amqp-" in out

        await endpoint.start()
        await proxy.start()
        consumer = QueueConsumer(queue_name, got=consumer.got)  # the same system, restarted
        await consumer.start()
        await wait_for(lambda: endpoint.got.ids == set(ids) and consumer.got.ids == set(ids),
                       45, "every claim at both destinations after they came back")
    finally:
        await hospital.stop()
        await insurer.stop()
        await consumer.stop()
        await endpoint.stop()
        await proxy.stop()
    for got in (endpoint.got, consumer.got):
        assert got.in_order_per_sender()
        assert len(got.raw) >= len(ids)
    capsys.readouterr()
    assert cli_main(["status", "--config", str(insurer_cfg)]) == 0
    with capsys.disabled():
        print(f"\n  raw deliveries for {len(ids)} claims after an outage: http"
              f" {len(endpoint.got.raw)}, amqp {len(consumer.got.raw)}")
