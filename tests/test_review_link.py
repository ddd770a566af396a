"""Review findings on the link: delivery after a long wait, lease vs request time,
and audited refusals of signed messages the receiver cannot read a patient from."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import LINK_OUT, Pair, client_ssl, consent_for, start_pair

from bridge.samples import inpatient_records
from bridge.trust.jws import sign_bundle

FINAL = {"acked", "rejected", "refused", "dead"}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(4, seed=31)


async def _wait_final(pair: Pair, message_id: str, timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await pair.hospital.controller.db.get_outbox(message_id)
        if row is not None and row.state in FINAL:
            return row
        if loop.time() > deadline:
            raise AssertionError(f"not final in time; last state {row and row.state}")
        await asyncio.sleep(0.05)


async def _post(pair: Pair, body: bytes) -> tuple[int, dict[str, Any]]:
    ctx = client_ssl(pair.root, "hospital-a")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.post(
            f"{pair.insurer_url}/$process-message",
            data=body,
            headers={"Content-Type": "application/fhir+json"},
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_claim_queued_longer_than_the_replay_window_is_still_delivered(
    tmp_path: Path, records: list
) -> None:
    """A claim that waited in the outbox (partner down, backoff, a long queue) for more
    than the receiver's 5-minute window is delivered, not rejected as a replay: the
    signature's freshness is about the send, not about the enqueue."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        record = records[0]
        await hospital.put_consent(consent_for(record))
        real_clock = hospital.clock
        hospital.clock = lambda: real_clock() - timedelta(minutes=20)
        try:
            sub = await hospital.submit(record, LINK_OUT)
        finally:
            hospital.clock = real_clock
        await pair.hospital.start()
        pair.hospital.dispatchers[LINK_OUT].wake(sub.message_id)
        row = await _wait_final(pair, sub.message_id)
        assert row.state == "acked", row.last_error
        assert await pair.insurer.controller.db.inbox_lookup("hospital-a", sub.message_id)
    finally:
        await pair.stop()


async def test_a_send_slower_than_the_lease_is_not_claimed_a_second_time(
    tmp_path: Path, records: list
) -> None:
    """With a request timeout longer than the 30 s outbox lease, a send still waiting
    for the partner must not be claimed again and sent a second time in parallel."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        dispatcher = pair.hospital.dispatchers[LINK_OUT]
        dispatcher.link = dispatcher.link.model_copy(update={"request_timeout_seconds": 120.0})
        offset = timedelta(0)
        release = asyncio.Event()
        real_clock = hospital.clock
        hospital.clock = lambda: real_clock() + offset
        record = records[1]
        await hospital.put_consent(consent_for(record))
        sub = await hospital.submit(record, LINK_OUT)

        sends: list[bytes] = []
        real_post_once = dispatcher._post_once

        async def slow_post_once(payload: bytes, seq: int | None = None) -> bytes:
            sends.append(payload)
            await release.wait()  # the partner takes its time (within the request timeout)
            return await real_post_once(payload, seq)

        dispatcher._post_once = slow_post_once  # type: ignore[method-assign]
        await pair.hospital.start()
        dispatcher.wake(sub.message_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not sends and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert len(sends) == 1
        offset = timedelta(seconds=45)  # past the 30 s lease, inside the request timeout
        dispatcher.wake()
        await asyncio.sleep(0.5)
        assert len(sends) == 1, "the row was claimed and sent again while its send was running"
        release.set()
        row = await _wait_final(pair, sub.message_id)
        assert row.state == "acked"
        assert row.attempts == 1
    finally:
        release.set()
        await pair.stop()


def _resigned(hospital: Any, message: dict[str, Any]) -> bytes:
    return orjson.dumps(
        sign_bundle(
            message,
            hospital.signer,
            issuer="hospital-a",
            audience="insurer-b",
            message_id=message["identifier"]["value"],
            now=datetime.now(UTC),
        )
    )


async def test_signed_messages_the_receiver_cannot_read_are_refused_and_audited(
    tmp_path: Path, records: list
) -> None:
    """A correctly signed message without a Patient, or with an entry that is not an
    object, gets a 4xx OperationOutcome (not a 500) and an audit entry for the refusal."""
    pair = await start_pair(tmp_path)
    try:
        hospital = pair.hospital.controller
        record = records[2]
        await hospital.put_consent(consent_for(record))
        signed, _ = hospital.prepare(record, LINK_OUT)
        base = copy.deepcopy(signed)
        base.pop("signature")

        no_patient = copy.deepcopy(base)
        no_patient["entry"] = [
            e for e in no_patient["entry"] if e["resource"]["resourceType"] != "Patient"
        ]
        odd_entry = copy.deepcopy(base)
        odd_entry["identifier"]["value"] = "urn:uuid:00000000-0000-4000-8000-000000000001"
        odd_entry["entry"].append("not an entry")

        insurer = pair.insurer.controller
        for message in (no_patient, odd_entry):
            before = len(await insurer.db.audit_entries())
            status, outcome = await _post(pair, _resigned(hospital, message))
            assert 400 <= status < 500, (status, outcome)
            assert outcome["resourceType"] == "OperationOutcome"
            after = await insurer.db.audit_entries(since_seq=before)
            assert [e.record.action for e in after] == ["message.reject"]
        assert await insurer.db.inbox_count() == 0
    finally:
        await pair.stop()
