"""The listener under attack from outside: values at the edges of what a partner may send,
requests that are not HTTP the router knows, certificates that name too much, and what
of all that reaches the audit trail, the answers and the logs.

Requests go over real sockets with real certificates (aiohttp, or raw TLS where the
request itself is malformed); the bridge runs in the test's event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pull_support import (
    HOSPITAL,
    PLATFORM,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
)
from test_mllp_listener import PLAIN, exchange, seg, start_bridge

from bridge.link.mllp import default_handler
from bridge.link.mllp_framer import frame


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await start_site(tmp_path)
    try:
        yield s
    finally:
        await s.stop()


def audit(site: PullSite, *actions: str) -> list[Any]:
    return [e.record for e in site.controller.store.audit_entries()
            if not actions or e.record.action in actions]


# --- values at the edges of the calendar ---------------------------------------------------


async def test_a_consent_from_the_beginning_of_time_is_recorded_not_failed(
    site: PullSite,
) -> None:
    records = person_records(1)
    consent = pull_consent(records[0], consent_id="always")
    consent["provision"]["period"] = {"start": "0001-01-01", "end": "9999-12-31"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(HOSPITAL))) as own,
        own.post(f"{site.base}/Consent", data=orjson.dumps(consent),
                 headers={"Content-Type": "application/fhir+json"}) as resp,
    ):
        assert resp.status == 201, await resp.text()
    assert audit(site, "request.failed") == []
    # And it permits: the platform reads the patient under it.
    await keep(site, records)
    system, value = id_card(records[0])
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(f"{site.base}/Patient", params={"identifier": f"{system}|{value}"}) as resp,
    ):
        page = orjson.loads(await resp.read())
    assert resp.status == 200 and page["total"] == 1


async def test_an_hl7_time_off_the_calendar_is_ae_naming_the_field(tmp_path: Path) -> None:
    bridge = await start_bridge(tmp_path, PLAIN)
    try:
        assert bridge.service.mllp is not None
        bridge.service.mllp.handler = default_handler()
        golden = (Path(__file__).parent / "golden" / "hl7v2" / "adt_a01-01.hl7").read_bytes()
        segments = golden.decode().split("\r")
        pid = next(i for i, s in enumerate(segments) if s.startswith("PID|"))
        pv1 = next(i for i, s in enumerate(segments) if s.startswith("PV1|"))
        fields = segments[pid].split("|")
        fields[7] = "99000101"
        segments[pid] = "|".join(fields)
        fields = segments[pv1].split("|")
        fields[44] = "99991231235900-1200"  # in China Standard Time: year 10000
        segments[pv1] = "|".join(fields)
        [ack] = await exchange(bridge.port, [frame("\r".join(segments).encode())], 1)
        assert seg(ack, "MSA")[1] == "AE"
        err = seg(ack, "ERR")
        assert err[2].startswith("PV1^1^44") and err[3].startswith("102^"), err
        assert bridge.store.hl7_count() == 0
    finally:
        await bridge.service.stop()
