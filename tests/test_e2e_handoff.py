"""End to end: hospital bridge -> mutual TLS -> insurer bridge -> the insurer's own systems.

The insurer's claim system is played by a real aiohttp endpoint and a real RabbitMQ
queue (127.0.0.1:5672), each consumed the way the insurer's integration team would
from the README: deduplicating on (sender, message identity). Raw deliveries are
counted too: hand-off is at least once, so a resumed stream may repeat a claim.
"""

from __future__ import annotations

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
    verify_signature,
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


def check_envelopes(got: Received, sender: str, pki: Path) -> None:
    """What the insurer's system can check on its own, from the README's description."""
    for (who, mid), env in got.first.items():
        verify_signature(env["message"], pki / sender / "sign.pem")
        verify_signature(env["receipt"], pki / "insurer-b" / "sign.pem")
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
    # A generous timeout: on a loaded machine a slow answer must not count as a failure
    # here, where the point is that a healthy path hands each claim over exactly once.
    add_destinations(insurer_cfg, http_url=endpoint.url,
                     amqp_url="amqp://127.0.0.1:5672/", queue=queue_name, timeout=20)
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
        check_envelopes(got, "hospital-a", tmp_path / "pki")
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
        # A request cut by the endpoint's stop fails as http-failed (server disconnected);
        # every attempt after it finds nothing listening: http-unreachable.
        await wait_for(lambda: insurer.handoff.workers["claims-http"].failing == "http-unreachable"
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


async def test_a_claim_the_system_refuses_is_dead_lettered_and_requeued_by_an_operator(
    tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
) -> None:
    """The endpoint answers 422 past the give-up duration: the hand-off is dead with its
    reason and the endpoint's answer; the claims behind it are not held up; the
    operator lists, reads and requeues it, and it is handed over."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    endpoint = ClaimEndpoint(free_port())
    endpoint.fail_with = 422
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url, extra="give_up_after_seconds = 0.3\n")
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    cfg = str(insurer_cfg)
    try:
        [dead] = await push(hospital, records[:1])
        worker = insurer.handoff.workers["claims-http"]
        await wait_for(lambda: worker.stats["dead"] == 1, 20, "the hand-off to die")
        endpoint.fail_with = None
        behind = await push(hospital, records[1:3])
        await wait_for(lambda: endpoint.got.ids == set(behind), 20, "the claims behind it")

        capsys.readouterr()
        assert cli_main(["status", "--config", cfg]) == 1
        out = capsys.readouterr().out
        assert "dead 1" in out and f"dead seq 1 from hospital-a (http-422): {dead}" in out

        assert cli_main(["inbox", "list", "--config", cfg, "--state", "dead", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [e["messageId"] for e in listed] == [dead]
        assert listed[0]["handoffs"][0] | {"nextAttempt": None} == {
            "destination": "claims-http", "state": "dead", "sequence": 1,
            "attempts": listed[0]["handoffs"][0]["attempts"], "lastError": "http-422",
            "nextAttempt": None, "delivered": None}

        assert cli_main(["inbox", "show", "--config", cfg, dead]) == 0
        shown = capsys.readouterr().out
        assert "hand-off claims-http: dead, sequence 1" in shown
        assert "last answer: HTTP 422 Unprocessable" in shown
        assert "--- message" in shown and "--- receipt" in shown

        assert cli_main(["inbox", "requeue", "--config", cfg, "--destination", "claims-http",
                         "--json"]) == 0
        requeued = json.loads(capsys.readouterr().out)
        # As it is now, and where it was taken from (a script reading it sees it requeued).
        assert requeued["requeuedCount"] == 1 and requeued["queued"] == 0
        assert [(r["messageId"], r["state"], r["requeuedFrom"])
                for r in requeued["requeued"]] == [(dead, "queued", "dead")]
        await wait_for(lambda: endpoint.got.ids == {dead, *behind}, 20, "the requeued claim")
        assert endpoint.got.order[-1][1] == dead  # handed over late, with its own sequence
        assert endpoint.got.order[-1][2] == 1
        capsys.readouterr()
        assert cli_main(["status", "--config", cfg]) == 0
    finally:
        await hospital.stop()
        await insurer.stop()
        await endpoint.stop()
    actions = _actions(insurer_cfg)
    assert actions.count("handoff.dead") == 1
    assert actions.count("handoff.requeue") == 1
    assert actions.count("handoff.delivered") == 3
    assert actions.count("inbox.show") == 1


def _actions(config: Path) -> list[str]:
    from bridge.ledger.sqlite import SQLiteStore

    with SQLiteStore(load_config(config).store.path) as store:
        return [e.record.action for e in store.audit_entries()]


async def test_operators_list_show_and_export_while_logs_and_lists_hold_no_health_data(
    tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url)
    cfg = str(insurer_cfg)
    caplog.set_level("DEBUG")
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    try:
        ids = await push(hospital, records[3:6])
        await wait_for(lambda: endpoint.got.ids == set(ids), 20, "the claims")
        endpoint.fail_with = 503
        more = await push(hospital, records[6:7])
        await wait_for(lambda: insurer.handoff.workers["claims-http"].failing == "http-503", 20,
                       "the endpoint to fail")
    finally:
        await hospital.stop()
        await insurer.stop()
        await endpoint.stop()
    names = [_patient_name(r) for r in records[3:7]]
    assert all(names)

    capsys.readouterr()
    assert cli_main(["inbox", "list", "--config", cfg]) == 0
    listing = capsys.readouterr().out
    assert [line.split("\t")[2] for line in listing.splitlines()] == ids + more
    assert "claims-http=delivered" in listing and "claims-http=queued(http-503)" in listing
    assert cli_main(["inbox", "list", "--config", cfg, "--state", "queued", "--json"]) == 0
    assert [e["messageId"] for e in json.loads(capsys.readouterr().out)] == more
    assert cli_main(["inbox", "list", "--config", cfg, "--sender", "clinic-x"]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["inbox", "list", "--config", cfg, "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["inbox", "list", "--config", cfg, "--until", "2999-01-01T00:00:00+08:00",
                     "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli_main(["inbox", "list", "--config", cfg, "--since", "last tuesday"]) == 2
    assert "(at --since)" in capsys.readouterr().err

    assert cli_main(["inbox", "show", "--config", cfg, ids[0], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["message"]["identifier"]["value"] == ids[0]
    assert shown["receipt"]["entry"][0]["resource"]["response"]["code"] == "ok"
    assert cli_main(["inbox", "show", "--config", cfg, "urn:uuid:nothing-here"]) == 2
    assert "no such message" in capsys.readouterr().err

    folder = tmp_path / "export"
    assert cli_main(["inbox", "export", "--config", cfg, "--to", str(folder)]) == 0
    files = sorted(folder.iterdir())
    assert len(files) == 4 and all(f.stat().st_mode & 0o077 == 0 for f in files)
    exported = [json.loads(f.read_bytes()) for f in files]
    assert {e["messageId"] for e in exported} == set(ids + more)
    assert all(e["messageDigest"] == canonical_digest(e["message"]) for e in exported)
    capsys.readouterr()
    assert cli_main(["inbox", "export", "--config", cfg, "--message-id", ids[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["messageId"] == ids[1]

    # Health data appears only where it was asked for, never in lists, status or logs.
    capsys.readouterr()
    cli_main(["status", "--config", cfg])
    status = capsys.readouterr().out
    for name in names:
        assert name not in listing and name not in status
        assert name not in caplog.text
    assert any(name in json.dumps(e["message"], ensure_ascii=False) for e in exported
               for name in names)
    actions = _actions(insurer_cfg)
    assert actions.count("inbox.show") == 1 and actions.count("inbox.export") == 5


def _patient_name(record: dict[str, Any]) -> str:
    return str(record["elements"]["HDSD00.11.110"])  # 患者姓名


async def test_a_destination_added_later_gets_the_claims_received_before_it(
    tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    try:
        early = await push(hospital, records[7:9])
        await wait_for(lambda: insurer.controller.store.inbox_count() == 2, 20, "the claims")
    finally:
        await insurer.stop()
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url)
    capsys.readouterr()
    assert cli_main(["inbox", "requeue", "--config", str(insurer_cfg), "--missing",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"requeued": [], "requeuedCount": 0, "queued": 2}
    insurer = await start(insurer_cfg)
    try:
        late = await push(hospital, records[9:10])
        await wait_for(lambda: endpoint.got.ids == {*early, *late}, 20, "every claim")
    finally:
        await hospital.stop()
        await insurer.stop()
        await endpoint.stop()
    assert [m for _, m, _ in endpoint.got.order] == [*early, *late]
