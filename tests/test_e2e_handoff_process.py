"""The insurer's ``bridge serve`` as a real process: killed with SIGKILL during hand-off,
pointed at a broker that refuses connections, and given bad destination settings.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import (
    ClaimEndpoint,
    FaultProxy,
    QueueConsumer,
    Serve,
    add_destinations,
    delete_queue,
    fast_hospital,
    unique_queue,
    wait_for,
)

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(24, seed=41)


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue()
    yield name
    await delete_queue(name)


def inbox_ids(store: Path) -> list[str]:
    con = sqlite3.connect(store)
    try:
        return [r[0] for r in con.execute("SELECT message_id FROM inbox ORDER BY id")]
    finally:
        con.close()


async def outbox_settled(hospital: BridgeService, ids: list[str]) -> bool:
    for mid in ids:
        row = await hospital.controller.db.get_outbox(mid)
        if row is None or row.state != "acked":
            return False
    return True


async def test_kill_9_during_hand_off_loses_nothing(
    tmp_path: Path, records: list[dict[str, Any]], queue_name: str
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    endpoint = ClaimEndpoint(free_port(), delay=0.05)
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url, amqp_url="amqp://127.0.0.1:5672/",
                     queue=queue_name, extra="batch = 4\n")
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        ids = []
        for i, record in enumerate(records):
            consent = consent_for(record, consent_id=f"c-{i}")
            await hospital.controller.put_consent(consent)
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)
        await wait_for(lambda: len(endpoint.got.ids) >= 3, 30, "hand-off to be under way")
        insurer.kill()  # mid-stream: some claims handed off, some leased, some waiting
        handed_before = len(endpoint.got.ids)
        await insurer.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await outbox_settled(hospital, ids):
            assert loop.time() < deadline, "the hospital's claims were not all acknowledged"
            await asyncio.sleep(0.1)
        accepted = inbox_ids(insurer_cfg.parent / "insurer-b" / "bridge.sqlite")
        assert sorted(accepted) == sorted(ids)
        await wait_for(lambda: endpoint.got.ids == set(ids) and consumer.got.ids == set(ids),
                       60, "every accepted claim handed off after the restart")
    finally:
        await hospital.stop()
        code = insurer.stop()
        await consumer.stop()
        await endpoint.stop()
    assert code == 0
    assert handed_before < len(ids)
    for got in (endpoint.got, consumer.got):
        assert got.in_order_per_sender()
        # In acceptance order: the insurer's inbox order is the per-sender sequence.
        assert [m for _, m, _ in got.order] == accepted
    assert "Traceback" not in (tmp_path / "insurer.log").read_text()
    print(f"\n  after kill -9: {len(ids)} claims, raw deliveries http {len(endpoint.got.raw)},"
          f" amqp {len(consumer.got.raw)}")


async def test_a_refused_broker_connection_is_retried_and_shown_in_status(
    tmp_path: Path, records: list[dict[str, Any]], queue_name: str
) -> None:
    """Nothing listens where the broker should be: the hand-off waits, retrying; status
    says so and exits 1; the log says it in one line, never with a traceback. When the
    broker is reachable, the claims go."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    proxy = FaultProxy(free_port())  # not started yet: connection refused
    add_destinations(insurer_cfg, amqp_url=f"amqp://127.0.0.1:{proxy.port}/", queue=queue_name)
    with insurer_cfg.open("a", encoding="utf-8") as fh:
        fh.write("\n[operations]\nport = 0\n")
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    consumer = QueueConsumer(queue_name)
    try:
        ids = []
        for i, record in enumerate(records[:3]):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            status = await asyncio.to_thread(_status, insurer_cfg)
            if "FAILING: amqp-unreachable" in status.stdout:
                break
            assert loop.time() < deadline, status.stdout + status.stderr
            await asyncio.sleep(0.2)
        assert status.returncode == 1
        assert "hand-off claims-amqp (amqp): waiting 3, delivered 0, dead 0" in status.stdout
        metrics = await _metrics(insurer)
        assert 'bridge_handoff_pending{destination="claims-amqp"} 3.0' in metrics
        assert 'bridge_handoff_failing{destination="claims-amqp"} 1.0' in metrics
        await proxy.start()
        await consumer.start()
        await wait_for(lambda: consumer.got.ids == set(ids), 30, "claims after the broker came")
        ok = await asyncio.to_thread(_status, insurer_cfg)
        assert ok.returncode == 0, ok.stdout
    finally:
        await hospital.stop()
        insurer.stop()
        await consumer.stop()
        await proxy.stop()
    log = (tmp_path / "insurer.log").read_text()
    failing = [line for line in log.splitlines() if "handoff_failing" in line]
    assert len(failing) == 1, log  # one line for the outage, not one per attempt
    assert "destination=claims-amqp" in failing[0] and "code=amqp-unreachable" in failing[0]
    assert "handoff_recovered" in log
    assert "Traceback" not in log


async def _metrics(serve: Serve) -> str:
    import aiohttp

    ops = next(w.removeprefix("operations=") for w in serve.ready if w.startswith("operations="))
    async with aiohttp.ClientSession() as session, session.get(f"{ops}/metrics") as resp:
        return await resp.text()


def _status(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("snippet", "key", "says"),
    [
        ('[[handoff]]\nid = "x"\nkind = "http"\n', "handoff[0].url", "Field required"),
        ('[[handoff]]\nid = "x"\nkind = "http"\nurl = "amqp://h/"\n', "handoff[0].url",
         "http or https URL"),
        ('[[handoff]]\nid = "x"\nkind = "amqp"\nurl = "amqp://u:secret@h/"\nqueue = "q"\n',
         "handoff[0].url", "must not hold a password"),
        ('[[handoff]]\nid = "x"\nkind = "amqp"\nurl = "amqp://h/"\n', "handoff[0].queue",
         "needs a queue or an exchange"),
        ('[[handoff]]\nid = "x"\nkind = "smtp"\nurl = "http://h/"\n', "handoff[0].kind",
         "'http' or 'amqp'"),
        ('[[handoff]]\nid = "x"\nkind = "http"\nurl = "http://h/"\nsenders = ["nobody"]\n',
         "handoff[0].senders[0]", "no partner with that id"),
        ('[[handoff]]\nid = "x"\nkind = "http"\nurl = "http://h/"\ntimeout_seconds = -1\n',
         "handoff[0].timeout_seconds", "greater than 0"),
        ('[[handoff]]\nid = "x"\nkind = "http"\nurl = "http://h/"\nretries = 3\n',
         "handoff[0].retries", "Extra inputs"),
    ],
)
def test_bad_destination_settings_name_the_file_and_key(
    tmp_path: Path, snippet: str, key: str, says: str
) -> None:
    _, insurer_cfg = make_workdir(tmp_path)
    insurer_cfg.write_text(insurer_cfg.read_text(encoding="utf-8") + "\n" + snippet,
                           encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert f"{insurer_cfg}: {key}" in run.stderr and says in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "secret" not in run.stderr


def test_a_missing_secret_is_a_config_error_naming_its_key(tmp_path: Path) -> None:
    _, insurer_cfg = make_workdir(tmp_path)
    insurer_cfg.write_text(
        insurer_cfg.read_text(encoding="utf-8")
        + '\n[[handoff]]\nid = "x"\nkind = "amqp"\nurl = "amqp://127.0.0.1/"\nqueue = "q"\n'
        'username = "claims"\npassword_env = "HANDOFF_TEST_UNSET_PASSWORD"\n',
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "HANDOFF_TEST_UNSET_PASSWORD"}
    run = subprocess.run([sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg)],
                         capture_output=True, text=True, timeout=60, check=False, env=env)
    assert run.returncode == 2, run.stderr
    assert f"{insurer_cfg}: handoff[0].password_env" in run.stderr
    assert "HANDOFF_TEST_UNSET_PASSWORD is not set" in run.stderr
