"""A partner's pull rate is limited across every process of a shared store.

Two bridge processes of the hospital serve record pull from one PostgreSQL store (as
behind a load balancer), each on its own mutual-TLS listener. The platform spreads its
requests over both: together they admit no more than the link's burst, and the
refusals are 429 with ``Retry-After`` whichever process answers.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from pg_support import PGSchema, fresh_schema
from pull_support import PLATFORM, write_site

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService

BURST = 4


@pytest.fixture
def pg() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture
async def two_processes(tmp_path: Path, pg: PGSchema) -> AsyncIterator[list[BridgeService]]:
    first, _platform, _port = write_site(tmp_path, rate=0.001, burst=BURST)
    text = first.read_text(encoding="utf-8").replace(
        'path = "hospital-a/bridge.sqlite"',
        f'kind = "postgresql"\ndsn = "{pg.dsn}"\nschema = "{pg.schema}"', 1)
    first.write_text(text, encoding="utf-8")
    second = tmp_path / "hospital-2.toml"
    port = load_config(first).server.port
    second.write_text(text.replace(f"port = {port}\n", f"port = {free_port()}\n", 1),
                      encoding="utf-8")
    services = [BridgeService(Controller(load_config(cfg)), poll_interval=0.05)
                for cfg in (first, second)]
    for service in services:
        await service.start()
    try:
        yield services
    finally:
        for service in services:
            await service.stop()


async def _search(root: Path, service: BridgeService, who: str = PLATFORM) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.pem"))
    ctx.load_cert_chain(root / "pki" / who / "tls.pem", root / "pki" / who / "tls.key")
    url = f"https://127.0.0.1:{service.port}/fhir/Patient"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(url, params={"identifier": "urn:oid:2.16.156.10011.1.3|1"}) as resp,
    ):
        await resp.read()
        return resp.status, resp.headers.get("Retry-After", "")


async def test_the_rate_limit_is_the_partners_across_processes(
    tmp_path: Path, two_processes: list[BridgeService],
) -> None:
    answers = [await _search(tmp_path, two_processes[i % 2]) for i in range(3 * BURST)]
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == BURST, statuses
    assert statuses[:BURST] == [200] * BURST
    # Both processes refuse once the partner's bucket is empty, saying when to return.
    assert {status for status, _ in answers[BURST:]} == {429}
    assert all(int(after) >= 1 for _, after in answers[BURST:])
    throttled = [e.record for e in two_processes[0].controller.store.audit_entries()
                 if e.record.action == "pull.throttled"]
    assert throttled and all(r.partner == PLATFORM for r in throttled)
