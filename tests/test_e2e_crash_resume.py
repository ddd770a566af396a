"""After ``kill -9``, a restarted bridge sends at once what the killed one was sending.

A claim being sent is leased to its sender for as long as a send can take (here more
than a minute and a half), so that nobody else sends it meanwhile. On the default
store (SQLite, one dispatching process) a restarted ``bridge serve`` holds the store's
dispatch lock, which the operating system took from the killed process: what that
process left ``sending`` goes again at once, with its fate unknown, instead of when
its lease runs out. While one store holds the lock, another (a second process on the
same file) does not get it, and so leaves the first one's claims alone.

Real ``bridge serve`` processes on both sides, the hospital's claims through the fault
proxy of tests/delivery_support.py; what happened is read from both stores with SQL.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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

from bridge.ledger.sqlite import SQLiteStore

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
        restarted = time.monotonic()
        hospital = await start(site.hospital_cfg)
        try:
            # Well before any of the killed process's leases could run out.
            await wait_settled(site.hospital_store, ids, timeout=30)
            took = time.monotonic() - restarted
        finally:
            await stop(hospital)
    finally:
        await stop(insurer)
        await site.proxy.stop()
    assert took < 60, took
    assert {outbox_states(site.hospital_store)[m] for m in ids} == {"acked"}
    # Those in flight at the kill may have reached the insurer: their fate is unknown,
    # and the insurer holds each claim once all the same.
    unknown = {m for m, flag in _rows(site.hospital_store,
                                      "SELECT message_id, fate_unknown FROM outbox") if flag}
    assert in_flight <= unknown
    counts = receptions(site.insurer_store)
    assert all(counts.get(m) == 1 for m in ids), counts


def test_the_dispatch_lock_is_held_by_one_open_store_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sqlite"
    with SQLiteStore(path) as first:
        assert first.hold_dispatch() is True
        assert first.hold_dispatch() is True  # idempotent
        with SQLiteStore(path) as second:
            # Another open store on the file (another process, or this one again)
            # does not get it while the first holds it.
            assert second.hold_dispatch() is False
    with SQLiteStore(path) as third:
        assert third.hold_dispatch() is True  # given back when the first closed
