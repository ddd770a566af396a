"""Delivery through partner outages, lost answers and stops, over real sockets.

The hospital's claims go through a byte-level fault proxy to a real insurer bridge, so
the outages are the network's and the partner's, not the dispatcher's own doing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from delivery_support import FaultProxy, free_port, link_settings, point_partner_at
from e2e_support import LINK_OUT, consent_for, make_workdir

from bridge.config import load_config
from bridge.demo import INSURER
from bridge.link.dispatcher import retry_after_seconds
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records
from bridge.trust.tls import server_context

FINAL = {"acked", "rejected", "refused", "dead"}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(12, seed=41)


async def states_of(service: BridgeService, ids: list[str]) -> dict[str, str]:
    rows = [await service.controller.db.get_outbox(m) for m in ids]
    return {m: (r.state.value if r else "missing") for m, r in zip(ids, rows, strict=True)}


async def wait_until(predicate: Any, timeout: float = 30.0, step: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(step)
    return bool(await predicate())


def inbox(store: Path) -> dict[str, bytes]:
    con = sqlite3.connect(store)
    try:
        return {m: bytes(r) for m, r in con.execute("SELECT message_id, receipt FROM inbox")}
    finally:
        con.close()


def circuit_figures(service: BridgeService) -> dict[str, float]:
    """The link circuit's metrics as a scrape of the operations port reads them."""
    from bridge.ops.metrics import ScrapeContext, link_circuit

    ctx = ScrapeContext(
        config=service.controller.config,
        store=service.controller.store,
        now=datetime.now(UTC),
        service=service,
    )
    return {
        sample.name: sample.value
        for metric in link_circuit(ctx)
        for sample in metric.samples
        if sample.labels.get("link") == LINK_OUT
    }


async def submit_all(hospital: BridgeService, records: list[dict[str, Any]]) -> list[str]:
    ids = []
    for i, record in enumerate(records):
        await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        ids.append((await hospital.submit(record, LINK_OUT)).message_id)
    return ids


async def test_an_outage_longer_than_any_attempt_budget_dead_letters_nothing(
    tmp_path: Path, records: list
) -> None:
    """Under the old rule (``max_attempts`` per claim, each claim three quick POSTs),
    this outage dead-lettered every claim within a second or two."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    link_settings(
        hospital_cfg,
        max_attempts=3,
        retry_base_seconds=0.05,
        retry_cap_seconds=0.2,
        probe_cap_seconds=0.3,
        request_timeout_seconds=2.0,
    )
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    insurer: BridgeService | None = None
    try:
        ids = await submit_all(hospital, records[:5])
        await asyncio.sleep(3.0)  # the insurer is down: connection refused
        assert set((await states_of(hospital, ids)).values()) <= {"queued", "sending"}
        dispatcher = hospital.dispatchers[LINK_OUT]
        assert dispatcher.circuit.opened_total >= 1 and dispatcher.stats.dead == 0
        figures = circuit_figures(hospital)
        assert figures["bridge_link_circuit_open"] == 1.0
        assert figures["bridge_link_circuit_opened_total"] >= 1
        assert figures["bridge_link_requests_total"] == dispatcher.stats.requests

        insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
        await insurer.start()

        async def all_acked() -> bool:
            return set((await states_of(hospital, ids)).values()) == {"acked"}

        assert await wait_until(all_acked)
        assert sorted(inbox(Path(insurer.controller.config.store.path))) == sorted(ids)
        assert circuit_figures(hospital)["bridge_link_circuit_open"] == 0.0
    finally:
        await hospital.stop()
        if insurer is not None:
            await insurer.stop()


async def test_a_claim_is_given_up_only_after_give_up_after_with_reason_and_answer(
    tmp_path: Path, records: list, caplog: pytest.LogCaptureFixture
) -> None:
    hospital_cfg, _insurer_cfg = make_workdir(tmp_path)
    link_settings(
        hospital_cfg,
        give_up_after="2s",
        retry_base_seconds=0.05,
        retry_cap_seconds=0.2,
        probe_cap_seconds=0.2,
        request_timeout_seconds=2.0,
    )
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    caplog.set_level(logging.WARNING, logger="bridge.dispatcher")
    await hospital.start()
    try:
        record = records[5]
        [mid] = await submit_all(hospital, [record])

        async def dead() -> bool:
            return (await states_of(hospital, [mid]))[mid] == "dead"

        assert await wait_until(dead, timeout=20)
        row = await hospital.controller.db.get_outbox(mid)
        # Given up no sooner than give_up_after from when the claim was queued (the
        # submission returns after that, so a clock read then would be late).
        assert (row.updated - row.created).total_seconds() >= 2.0
        assert row.last_error == "gave-up:transport-error"
        assert row.last_answer.startswith("no answer: partner unreachable")
        assert not row.fate_unknown
        [warning] = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
        text = warning.getMessage()
        assert mid in text and "gave-up" not in text or "transport-error" in text
        assert "bridge outbox requeue --id" in text
        # No health data in the log line: nothing of the record's values.
        for value in (
            record["elements"].get("HDSD00.11.110"),
            record["elements"].get("HDSD00.11.026"),
        ):
            if value:
                assert str(value) not in text
        audit = [
            e
            for e in await hospital.controller.db.audit_entries()
            if e.record.action == "claim.dead"
        ]
        assert audit and "last answer: no answer" in (audit[-1].record.detail or "")
    finally:
        await hospital.stop()


async def test_a_claim_whose_answer_is_lost_is_never_dead_and_gets_its_original_receipt(
    tmp_path: Path, records: list
) -> None:
    """The insurer stores the claim and answers; the answer never arrives. Past
    ``give_up_after`` the claim is still pending (its fate is unknown), and once the
    answers come through it is acknowledged with the receipt the insurer signed first."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    assert insurer.port is not None
    proxy = FaultProxy(insurer.port)
    await proxy.start()
    await proxy.set_mode("cut_responses")
    point_partner_at(hospital_cfg, proxy.port)
    link_settings(
        hospital_cfg,
        give_up_after="1s",
        retry_base_seconds=0.05,
        retry_cap_seconds=0.2,
        probe_cap_seconds=0.2,
        request_timeout_seconds=2.0,
    )
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        [mid] = await submit_all(hospital, [records[6]])
        held = Path(insurer.controller.config.store.path)

        async def at_insurer() -> bool:
            return mid in inbox(held)

        assert await wait_until(at_insurer)
        await asyncio.sleep(2.5)  # well past give_up_after
        row = await hospital.controller.db.get_outbox(mid)
        assert row.state in ("queued", "sending") and row.fate_unknown
        assert hospital.dispatchers[LINK_OUT].stats.dead == 0

        await proxy.set_mode("pass")

        async def acked() -> bool:
            return (await states_of(hospital, [mid]))[mid] == "acked"

        assert await wait_until(acked)
        row = await hospital.controller.db.get_outbox(mid)
        assert row.receipt == inbox(held)[mid]
        assert list(inbox(held)) == [mid]
    finally:
        await hospital.stop()
        await proxy.stop()
        await insurer.stop()


async def test_retry_after_is_honoured_and_not_retried_at_once(
    tmp_path: Path, records: list
) -> None:
    hospital_cfg, _insurer_cfg = make_workdir(tmp_path)
    port = free_port()
    point_partner_at(hospital_cfg, port)
    link_settings(
        hospital_cfg,
        retry_base_seconds=0.05,
        retry_cap_seconds=0.2,
        probe_cap_seconds=0.2,
        request_timeout_seconds=2.0,
    )
    seen: list[float] = []

    async def busy(request: web.Request) -> web.Response:
        await request.read()
        seen.append(asyncio.get_running_loop().time())
        return web.Response(status=503, headers={"Retry-After": "30"}, text="busy")

    app = web.Application()
    app.router.add_post("/fhir/$process-message", busy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    pki = tmp_path / "pki"
    ctx = server_context(pki / INSURER / "tls.pem", pki / INSURER / "tls.key", pki / "ca.pem")
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        [mid] = await submit_all(hospital, [records[7]])

        async def answered() -> bool:
            row = await hospital.controller.db.get_outbox(mid)
            return row is not None and row.last_answer == "HTTP 503"

        assert await wait_until(answered)
        asked_at = datetime.now(UTC)
        await asyncio.sleep(1.0)
        assert len(seen) == 1  # no quick retry, no probe before the partner's time
        row = await hospital.controller.db.get_outbox(mid)
        assert row.state == "queued"
        assert (row.next_attempt - asked_at).total_seconds() > 27
        circuit = hospital.dispatchers[LINK_OUT].circuit
        assert circuit.state == "open"
    finally:
        await hospital.stop()
        await runner.cleanup()


def test_retry_after_header_forms() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now=now) == 120.0
    assert retry_after_seconds("Sun, 01 Mar 2026 12:01:30 GMT", now=now) == 90.0
    assert retry_after_seconds("Sun, 01 Mar 2026 11:00:00 GMT", now=now) == 0.0
    assert retry_after_seconds("999999", now=now) == 3600.0
    assert retry_after_seconds("soon", now=now) is None
    assert retry_after_seconds(None, now=now) is None


async def test_stop_while_a_claim_is_in_flight_is_prompt_and_releases_it(
    tmp_path: Path, records: list
) -> None:
    """A partner that takes the request and never answers must not hold a stop for
    the request timeout; the claim goes back to the outbox, its fate unknown."""
    hospital_cfg, _insurer_cfg = make_workdir(tmp_path)
    proxy = FaultProxy(free_port())
    await proxy.start()
    await proxy.set_mode("blackhole")
    point_partner_at(hospital_cfg, proxy.port)
    link_settings(hospital_cfg, request_timeout_seconds=120.0)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        [mid] = await submit_all(hospital, [records[8]])

        async def in_flight() -> bool:
            return bool(proxy.accepted) and (await states_of(hospital, [mid]))[mid] == "sending"

        assert await wait_until(in_flight)
        dispatcher = hospital.dispatchers[LINK_OUT]
        # Far below the 120 s request timeout the old stop waited for.
        await asyncio.wait_for(dispatcher.stop(), timeout=10)
        row = await hospital.controller.db.get_outbox(mid)
        assert row.state == "queued" and row.fate_unknown and row.last_error == "stopped"
    finally:
        await hospital.stop()
        await proxy.stop()


async def test_a_cancelled_stop_stays_cancelled(tmp_path: Path) -> None:
    hospital_cfg, _insurer_cfg = make_workdir(tmp_path)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        dispatcher = hospital.dispatchers[LINK_OUT]
        stopping = asyncio.create_task(dispatcher.stop())
        await asyncio.sleep(0)  # stop() is now waiting for the loop task to end
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert stopping.cancelled()
    finally:
        await hospital.stop()
