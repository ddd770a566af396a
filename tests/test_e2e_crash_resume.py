"""After ``kill -9``, a restarted bridge sends at once what the killed one was sending.

A claim being sent is leased to its sender for as long as a send can take (here more
than a minute and a half), so that nobody else sends it meanwhile. Every process
serving a SQLite store holds a shared lock on a file beside it, which the operating
system drops when a process dies; a restarted ``bridge serve`` that gets it exclusively
first is the only one sending, so what is left ``sending`` goes again at once, with its
fate unknown, instead of when its lease runs out. A process that starts while another
sends from the same file leaves what is ``sending`` to its lease: it may be that one's.

The kill is of a real ``bridge serve`` process, the hospital's claims going through the
fault proxy of tests/delivery_support.py; what happened is read from the stores with
SQL. The lock's rules are checked with stores opened side by side (a lock belongs to
an open file, as it would to a process), and a restart beside a process that is
handing a claim over with two bridge services on one store.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from handoff_support import ClaimEndpoint, wait_for
from reliability_support import (
    _rows,
    enqueue,
    make_site,
    outbox_states,
    receptions,
    start,
    stop,
    wait_settled,
)
from test_handoff_worker import accept, controller_with_senders

from bridge.config import load_config
from bridge.demo import free_port
from bridge.errors import StoreError
from bridge.ledger.audit import format_time
from bridge.ledger.sqlite import SQLiteStore
from bridge.link.node import Controller
from bridge.link.service import BridgeService

#: A send may take the request timeout on each of the quick retries: the lease is
#: longer than (20 + 1) x 3 + 30 seconds.
REQUEST_TIMEOUT = 20.0


async def _until_sending(store: Path, ids: list[str], timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = outbox_states(store)
        sending = {m for m in ids if states.get(m) == "sending"}
        if sending:
            return sending
        await asyncio.sleep(0.1)
    raise AssertionError(f"no claim went to sending: {outbox_states(store)}")


async def test_claims_a_killed_bridge_was_sending_go_again_at_once(tmp_path: Path) -> None:
    site = await make_site(tmp_path, request_timeout_seconds=REQUEST_TIMEOUT,
                           retry_base_seconds=0.2, probe_cap_seconds=1.0)
    insurer = await start(site.insurer_cfg)
    try:
        ids = await enqueue(site.hospital_cfg, 3, seed=23)
        # The insurer accepts connections and never answers: the hospital's sends hang.
        await site.proxy.set_mode("blackhole")
        hospital = await start(site.hospital_cfg)
        in_flight = await _until_sending(site.hospital_store, ids)
        hospital.proc.kill()
        hospital.proc.wait()
        await site.proxy.set_mode("pass")
        hospital = await start(site.hospital_cfg)
        try:
            # Waited for well short of the killed process's leases (over 90 seconds).
            await wait_settled(site.hospital_store, ids, timeout=30)
        finally:
            await stop(hospital)
    finally:
        await stop(insurer)
        await site.proxy.stop()
    assert {outbox_states(site.hospital_store)[m] for m in ids} == {"acked"}
    # Those in flight at the kill may have reached the insurer: their fate is unknown,
    # and the insurer holds each claim once all the same.
    unknown = {m for m, flag in _rows(site.hospital_store,
                                      "SELECT message_id, fate_unknown FROM outbox") if flag}
    assert in_flight <= unknown
    counts = receptions(site.insurer_store)
    assert all(counts.get(m) == 1 for m in ids), counts


def test_what_was_left_is_taken_up_only_by_a_process_starting_alone(tmp_path: Path) -> None:
    # Each open store stands for a process (a flock belongs to its open file).
    path = tmp_path / "bridge.sqlite"
    calls: list[str] = []

    def take_up(who: str) -> Callable[[], str]:
        return lambda: calls.append(who) or who

    first = SQLiteStore(path)
    assert first.hold_dispatch(take_up("first")) == "first"  # alone: it takes up
    assert first.hold_dispatch(take_up("first again")) is None  # once per store
    second = SQLiteStore(path)
    assert second.hold_dispatch(take_up("second")) is None  # the first still sends
    first.close()
    # The first started again while the second sends: what is `sending` may be the
    # second's, and is left to its lease.
    again = SQLiteStore(path)
    assert again.hold_dispatch(take_up("first restarted")) is None
    again.close()
    second.close()
    with SQLiteStore(path) as last:  # no one else left: it takes up
        assert last.hold_dispatch(take_up("last")) == "last"
    assert calls == ["first", "last"]


def test_a_process_taking_up_what_was_left_holds_off_one_starting_meanwhile(
        tmp_path: Path) -> None:
    # While one takes up what was left (exclusively), another starting then neither
    # takes it up too nor starts sending before it is done.
    path = tmp_path / "bridge.sqlite"
    order: list[str] = []
    with SQLiteStore(path) as first, SQLiteStore(path) as second:
        started = threading.Event()

        def slow() -> str:
            started.set()
            time.sleep(0.5)
            order.append("first took up")
            return "first"

        taking = threading.Thread(target=lambda: order.append(str(first.hold_dispatch(slow))))
        taking.start()
        started.wait(5)
        assert second.hold_dispatch(lambda: "second") is None
        order.append("second may send")
        taking.join(5)
    assert order.index("first took up") < order.index("second may send")
    assert "first" in order


def _handoffs(store: Path) -> list[tuple[str, str, str | None]]:
    return [(str(m), str(s), lease) for m, s, lease in _rows(
        store, "SELECT message_id, state, lease_until FROM handoff")]


async def test_a_restart_while_another_process_sends_leaves_its_hand_off_alone(
        tmp_path: Path) -> None:
    # Two bridge services on one SQLite store (two processes behind a load balancer):
    # A stops, B hands a claim over to a slow claim system, A starts again. A is not
    # alone as it starts, so B's hand-off keeps its lease and the claim system gets the
    # claim once.
    endpoint = ClaimEndpoint(free_port(), delay=3.0)
    await endpoint.start()
    made = controller_with_senders(tmp_path, http_url=endpoint.url)
    config = Path(str(made.config.source))
    await made.close()
    # A hand-over may take 10 seconds (the claim system answers in 3): its lease is 25.
    text = config.read_text(encoding="utf-8")
    assert "timeout_seconds = 2\n" in text
    config.write_text(text.replace("timeout_seconds = 2\n", "timeout_seconds = 10\n"),
                      encoding="utf-8")
    first = Controller(load_config(config))
    store = first.config.store.path
    a = BridgeService(first, poll_interval=0.05)
    await a.start(serve=False)
    b = BridgeService(Controller(load_config(config)), poll_interval=0.05)
    await b.start(serve=False)
    a2: BridgeService | None = None
    try:
        await a.stop()
        message_id = accept(b.controller, "hospital-a", 1)
        await wait_for(lambda: [h for h in _handoffs(store) if h[1] == "sending"], 10,
                       "B handing the claim over")
        leased = _handoffs(store)
        a2 = BridgeService(Controller(load_config(config)), poll_interval=0.05)
        await a2.start(serve=False)
        assert _handoffs(store) == leased  # B's lease stands
        await wait_for(lambda: [h for h in _handoffs(store) if h[1] == "delivered"], 15,
                       "the hand-off delivered")
        await asyncio.sleep(1.0)  # time for a second delivery, were one under way
    finally:
        if a2 is not None:
            await a2.stop()
        await b.stop()
        await endpoint.stop()
    assert [m for _, m, _ in endpoint.got.raw].count(message_id) == 1


async def test_hand_offs_a_stopped_process_was_making_go_again_at_once(tmp_path: Path) -> None:
    # The hand-off of a received claim to the insurer's claim system, as a process
    # killed in the middle of it leaves the row: `sending`, leased for another hour.
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    c = controller_with_senders(tmp_path, http_url=endpoint.url)
    message_id = accept(c, "hospital-a", 1)
    store = c.config.store.path
    con = sqlite3.connect(store)
    try:
        with con:
            changed = con.execute(
                "UPDATE handoff SET state='sending', attempts=1, lease_until=?"
                " WHERE message_id=?",
                (format_time(datetime.now(UTC) + timedelta(hours=1)), message_id)).rowcount
    finally:
        con.close()
    assert changed == 1
    service = BridgeService(c, poll_interval=0.05)
    await service.start(serve=False)
    try:
        await wait_for(lambda: [h for h in _handoffs(store) if h[1] == "delivered"], 15,
                       "the hand-off delivered")
    finally:
        await service.stop()
        await endpoint.stop()
    assert [m for _, m, _ in endpoint.got.raw].count(message_id) == 1


async def test_workers_started_on_their_own_mark_the_store_as_sent_from(tmp_path: Path) -> None:
    # Code embedding the bridge may start hand-off workers (or a link's dispatcher)
    # without BridgeService: they take the shared mark before leasing anything, so a
    # bridge starting beside them does not take their hand-offs for a dead process's.
    from bridge.link.handoff import HandoffService

    c = controller_with_senders(tmp_path, http_url=f"http://127.0.0.1:{free_port()}/claims")
    workers = HandoffService(c, poll_interval=0.05)
    await workers.start()
    try:
        with SQLiteStore(c.config.store.path) as beside:
            assert beside.hold_dispatch(lambda: "taken up") is None
    finally:
        await workers.stop()
        await c.close()


def test_a_process_stuck_holding_the_lock_alone_is_named_not_waited_for_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process holds the lock exclusively and never lets go (stopped while it
    # took up what was left): a starting one fails, naming the lock file, after a
    # bounded wait, and is not marked; once the other lets go, it starts.
    import fcntl

    from bridge.ledger import sqlite as store_module

    monkeypatch.setattr(store_module, "DISPATCH_LOCK_WAIT", 0.3)
    path = tmp_path / "bridge.sqlite"
    with SQLiteStore(path) as store:
        stuck = os.open(f"{path}.dispatch", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(stuck, fcntl.LOCK_EX)
        try:
            with pytest.raises(StoreError) as err:
                store.hold_dispatch()
            assert err.value.location == str(path.resolve()) + ".dispatch"
        finally:
            os.close(stuck)
        assert store.hold_dispatch(lambda: "taken up") == "taken up"
