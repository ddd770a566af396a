"""PostgreSQL, two hospital processes on one outbox: after one is killed with ``kill -9``,
the other sends at once what the killed one was sending.

A claim being sent is leased to its sender for as long as a send can take (here more
than a minute and a half). Each process holds a session advisory lock named after it
for as long as its connection lives; the server drops it with the session, and the
surviving process, finding the killed one's leases without their lock at two looks a
few seconds apart, ends them and takes the claims with their fate unknown.

Both hospital processes are real ``bridge serve`` processes; the insurer's answers go
through the fault proxy of tests/delivery_support.py; what happened is read from the
stores with SQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from pg_support import PGSchema, fresh_schema
from reliability_support import (
    _on_postgres,
    _second_sender,
    enqueue,
    make_site,
    pg_outbox_states,
    receptions,
    start,
    stop,
    wait_settled,
)

#: A send may take the request timeout on each of the quick retries: the lease is
#: longer than (20 + 1) x 3 + 30 seconds.
REQUEST_TIMEOUT = 20.0


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


def _sending(pg: PGSchema) -> dict[str, str]:
    with pg.connect() as conn:
        return dict(conn.execute(
            "SELECT message_id, claimed_by FROM outbox WHERE state='sending'").fetchall())


async def test_claims_a_killed_process_was_sending_go_with_the_other_at_once(
    tmp_path, pg_schema: PGSchema
) -> None:
    site = await make_site(tmp_path, request_timeout_seconds=REQUEST_TIMEOUT,
                           retry_base_seconds=0.2, probe_cap_seconds=1.0)
    _on_postgres(site.hospital_cfg, pg_schema)
    second_cfg = _second_sender(site.hospital_cfg)
    insurer = await start(site.insurer_cfg)
    hospitals = []
    try:
        ids = await enqueue(site.hospital_cfg, 4, seed=29)
        # The insurer accepts connections and never answers: the first process's sends
        # hang, holding every claim.
        await site.proxy.set_mode("blackhole")
        hospitals.append(await start(site.hospital_cfg))
        deadline = time.monotonic() + 30
        while set(_sending(pg_schema)) != set(ids):
            assert time.monotonic() < deadline, pg_outbox_states(pg_schema)
            await asyncio.sleep(0.1)
        in_flight = _sending(pg_schema)
        assert len(set(in_flight.values())) == 1, in_flight
        hospitals.append(await start(second_cfg))
        hospitals[0].proc.kill()
        hospitals[0].proc.wait()
        await site.proxy.set_mode("pass")
        # Waited for well short of the killed process's leases (over 90 seconds).
        await wait_settled(pg_schema, ids, timeout=40)
    finally:
        for process in hospitals:
            await stop(process)
        await stop(insurer)
        await site.proxy.stop()
    assert {pg_outbox_states(pg_schema)[m] for m in ids} == {"acked"}
    with pg_schema.connect() as conn:
        rows = {m: (f, c) for m, f, c in conn.execute(
            "SELECT message_id, fate_unknown, claimed_by FROM outbox").fetchall()}
    killed = next(iter(in_flight.values()))
    for m in ids:
        fate_unknown, by = rows[m]
        # Sent by the survivor, their fate unknown: they may have reached the insurer.
        assert fate_unknown == 1 and by != killed, rows
    counts = receptions(site.insurer_store)
    assert all(counts.get(m) == 1 for m in ids), counts
    survivor_log = hospitals[1].log.read_text(encoding="utf-8")
    assert f"left sending by worker {killed}, which is gone" in survivor_log
    assert "Traceback" not in survivor_log
