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
from e2e_support import LINK_OUT, start_pair

from bridge.link.circuit import CircuitState
from bridge.link.dispatcher import BACKLOG_HIGH, INTAKE_HOLD, UNTAKEN_SECONDS, Dispatcher


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield pair.hospital.dispatchers[LINK_OUT]
    finally:
        await pair.insurer.stop()
        await pair.hospital.stop()


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
