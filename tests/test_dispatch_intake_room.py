"""The intake of one process waits a moment for its dispatcher when the dispatcher is
behind on a link whose partner answers, and never otherwise: a partner that is down or
slow holds nothing back, and nothing waits longer than the hold.

The rules are driven here through the dispatcher's own state (which claims were queued
and not yet taken, when it last took some, its circuit), with no partner needed; what
the rule buys, claims per second with both bridges on one host, is measured by
bench/claim_push.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from e2e_support import LINK_OUT, Pair, consent_for, start_pair

from bridge.link.circuit import CircuitState
from bridge.link.dispatcher import BACKLOG_HIGH, INTAKE_HOLD, UNTAKEN_SECONDS, Dispatcher
from bridge.samples import inpatient_records


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield pair
    finally:
        await pair.insurer.stop()
        await pair.hospital.stop()


@pytest.fixture
def dispatcher(pair: Pair) -> Dispatcher:
    return pair.hospital.dispatchers[LINK_OUT]


def _behind(d: Dispatcher, n: int = BACKLOG_HIGH) -> None:
    for i in range(n):
        d.wake(f"m-{i}", queued=True)
    d._took_at = asyncio.get_running_loop().time()  # it is taking claims


async def _waited(d: Dispatcher) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await d.room()
    return loop.time() - started


async def test_behind_the_intake_waits_until_claims_are_taken(dispatcher: Dispatcher) -> None:
    _behind(dispatcher)

    async def take_some() -> None:
        await asyncio.sleep(0.15)
        for i in range(8):
            dispatcher._untaken.pop(f"m-{i}")

    taker = asyncio.create_task(take_some())
    waited = await _waited(dispatcher)
    await taker
    assert 0.12 <= waited < INTAKE_HOLD


async def test_nothing_waits_longer_than_the_hold(dispatcher: Dispatcher) -> None:
    _behind(dispatcher)
    waited = await _waited(dispatcher)
    assert INTAKE_HOLD <= waited < INTAKE_HOLD + 0.3


async def test_below_the_mark_nothing_waits(dispatcher: Dispatcher) -> None:
    _behind(dispatcher, BACKLOG_HIGH - 1)
    assert await _waited(dispatcher) < 0.05


async def test_claims_found_queued_before_do_not_count(dispatcher: Dispatcher) -> None:
    _behind(dispatcher, BACKLOG_HIGH - 1)
    for i in range(50):  # submissions of claims already queued or sent: nothing new
        dispatcher.wake(f"again-{i}", queued=False)
    assert await _waited(dispatcher) < 0.05


@pytest.mark.parametrize("why", ["circuit-open", "paused", "not-taking", "aged"])
async def test_a_partner_down_or_a_dispatcher_not_taking_holds_nothing(
        dispatcher: Dispatcher, why: str) -> None:
    _behind(dispatcher)
    loop = asyncio.get_running_loop()
    if why == "circuit-open":
        dispatcher.circuit.state = CircuitState.OPEN
    elif why == "paused":
        dispatcher.paused_reason = "certificate fault"
    elif why == "not-taking":
        dispatcher._took_at = loop.time() - 1.5
    else:  # queued long ago (or taken by another process sharing the store)
        for mid in dispatcher._untaken:
            dispatcher._untaken[mid] = loop.time() - UNTAKEN_SECONDS - 1
    assert await _waited(dispatcher) < 0.05


async def test_a_submission_through_the_service_waits_while_behind_and_is_queued(
        pair: Pair, dispatcher: Dispatcher) -> None:
    """The service's submit path asks for room first; the claim is queued after the
    hold, and counts as waiting to be taken."""
    [record] = inpatient_records(1, seed=91)
    await pair.hospital.controller.put_consent(consent_for(record, consent_id="c-room"))
    _behind(dispatcher)
    loop = asyncio.get_running_loop()
    started = loop.time()
    submitted = await pair.hospital.submit(record, LINK_OUT)
    assert loop.time() - started >= INTAKE_HOLD
    assert submitted.created
    assert submitted.message_id in dispatcher._untaken
    # Once taken (as the dispatcher would), the same record submitted again is found
    # queued: it is not counted as waiting again.
    del dispatcher._untaken[submitted.message_id]
    again = await pair.hospital.submit(record, LINK_OUT)
    assert not again.created
    assert submitted.message_id not in dispatcher._untaken


async def test_the_service_stopping_releases_what_waits(tmp_path: Path) -> None:
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        dispatcher = pair.hospital.dispatchers[LINK_OUT]
        _behind(dispatcher)
        waiting = asyncio.create_task(_waited(dispatcher))
        await asyncio.sleep(0.05)
    finally:
        await pair.insurer.stop()
        await pair.hospital.stop()
    assert await waiting < INTAKE_HOLD


async def test_a_claim_taken_before_its_submission_returns_is_not_counted(
        tmp_path: Path) -> None:
    """With the partner answering, every claim submitted is taken and acknowledged, and
    none is left counted as waiting: a claim taken before its submission returned is
    known as taken."""
    pair = await start_pair(tmp_path)
    try:
        records = inpatient_records(40, seed=92)
        for i, record in enumerate(records):
            await pair.hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        submitted = await asyncio.gather(*(pair.hospital.submit(r, LINK_OUT) for r in records))
        ids = {s.message_id for s in submitted if s.created}
        dispatcher = pair.hospital.dispatchers[LINK_OUT]
        for _ in range(200):
            counts = pair.hospital.controller.store.outbox_counts(LINK_OUT)
            if counts["acked"] == len(ids):
                break
            await asyncio.sleep(0.05)
        assert counts["acked"] == len(ids)
        assert not ids & set(dispatcher._untaken)
        # Recorded late, after the dispatcher took it: still not counted.
        taken = next(iter(ids))
        dispatcher.wake(taken, queued=True)
        assert taken not in dispatcher._untaken
    finally:
        await pair.insurer.stop()
        await pair.hospital.stop()


async def test_on_a_store_several_processes_dispatch_from_nothing_is_counted(
        tmp_path: Path) -> None:
    """PostgreSQL: another process may take the claims queued here."""
    import re

    from e2e_support import make_workdir
    from pg_support import fresh_schema

    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService

    for schema in fresh_schema():
        hospital_cfg, _ = make_workdir(tmp_path)
        text, n = re.subn(r"\[store\]\npath = \"[^\"]*\"\n",
                          f'[store]\nkind = "postgresql"\ndsn = "{schema.dsn}"\n'
                          f'schema = "{schema.schema}"\n', hospital_cfg.read_text())
        assert n == 1
        hospital_cfg.write_text(text)
        service = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
        try:
            d = service.dispatchers[LINK_OUT]
            _behind(d, BACKLOG_HIGH * 2)
            assert not d._untaken
            assert await _waited(d) < 0.05
        finally:
            await service.controller.close()
