"""Two insurer ``bridge serve`` processes on one PostgreSQL store, both handing off.

Both take hand-offs from the one queue; one of them is killed with SIGKILL while it
holds some. The claim system (a real HTTP endpoint) must see every claim, the first
arrival of each in acceptance order per sender, and nothing twice but what the killed
process had in flight.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import ClaimEndpoint, Serve, add_destinations, fast_hospital, wait_for
from pg_support import PGSchema, fresh_schema

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


class SeenBy(ClaimEndpoint):
    """The claim endpoint, noting which process handed each claim over (``?p=``)."""

    def __init__(self, port: int, *, delay: float) -> None:
        super().__init__(port, delay=delay)
        self.by: list[str] = []

    async def _post(self, request: web.Request) -> web.Response:
        self.by.append(request.query.get("p", "?"))
        return await super()._post(request)


def twin(config: Path, name: str) -> Path:
    """A second process of the same controller: its own port, the same store; it tells
    the endpoint who it is in the URL's query."""
    text = config.read_text(encoding="utf-8")
    text = re.sub(r"(\[server\]\nhost = \"127.0.0.1\"\nport = )\d+", rf"\g<1>{free_port()}",
                  text, count=1)
    text = text.replace("/claims?p=1", "/claims?p=2")
    path = config.with_name(name)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.battery  # two serve processes, a lease to expire after a kill -9
async def test_two_processes_on_one_store_hand_off_in_order(
    tmp_path: Path, pg_schema: PGSchema
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    text = insurer_cfg.read_text(encoding="utf-8").replace(
        "[store]\n",
        f'[store]\nkind = "postgresql"\ndsn = "{pg_schema.dsn}"\nschema = "{pg_schema.schema}"\n',
        1)
    insurer_cfg.write_text(text, encoding="utf-8")
    endpoint = SeenBy(free_port(), delay=0.2)
    await endpoint.start()
    add_destinations(insurer_cfg, http_url=endpoint.url + "?p=1", extra="batch = 4\n",
                     timeout=2)
    second_cfg = twin(insurer_cfg, "insurer-2.toml")
    first = Serve(insurer_cfg, tmp_path / "insurer-1.log")
    second = Serve(second_cfg, tmp_path / "insurer-2.log")
    await first.start()
    await second.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    records = inpatient_records(30, seed=83)
    try:
        ids: list[str] = []
        for i, record in enumerate(records):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)

        async def all_acked() -> bool:
            rows = [await hospital.controller.db.get_outbox(m) for m in ids]
            return all(r is not None and r.state == "acked" for r in rows)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await all_acked():
            assert loop.time() < deadline, "the insurer did not acknowledge every claim"
            await asyncio.sleep(0.05)
        # Every claim is accepted (the hospital holds its receipt); the process that
        # accepted them dies while it is handing them over, holding a leased batch
        # (the claim system answers slowly, so the stream is still going).
        while not endpoint.got.ids:
            assert loop.time() < deadline, "nothing reached the claim system"
            await asyncio.sleep(0.01)
        first.kill()
        handed_before = len(endpoint.got.ids)
        await wait_for(lambda: endpoint.got.ids == set(ids), 90,
                       "every claim at the claim system, from the surviving process")
    finally:
        await hospital.stop()
        first.stop()
        code = second.stop()
        await endpoint.stop()
    assert 0 < handed_before < len(ids), "the kill did not fall mid-stream"
    assert "2" in endpoint.by  # the survivor took over
    assert code == 0
    got = endpoint.got
    assert got.in_order_per_sender(), got.order
    accepted = await asyncio.to_thread(_acceptance_order, pg_schema)
    assert [m for _, m, _ in got.order] == accepted
    repeated = len(got.raw) - len(got.first)
    assert repeated <= 4, f"{repeated} repeated hand-offs: more than one batch in flight"
    for log in (tmp_path / "insurer-1.log", tmp_path / "insurer-2.log"):
        assert "Traceback" not in log.read_text(encoding="utf-8")


def _acceptance_order(schema: PGSchema) -> list[Any]:
    with schema.connect() as conn:
        return [r[0] for r in conn.execute("SELECT message_id FROM handoff ORDER BY seq")]
