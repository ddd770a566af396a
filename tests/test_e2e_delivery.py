"""Delivery guarantees over real sockets: outages, rejections, crashes and resends.

A claim enqueued is delivered exactly once in effect, whatever happens to the
insurer's bridge or to the hospital's process in between.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records

FINAL = {"acked", "rejected", "refused", "dead"}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(12, seed=23)


def fast_retries(config_file: Path, *, give_up_after: str = "72h") -> None:
    """Make the hospital's link retry quickly so outages can be tested in seconds."""
    text = config_file.read_text(encoding="utf-8")
    text = text.replace(
        'purpose = "HPAYMT"\n',
        'purpose = "HPAYMT"\nretry_base_seconds = 0.05\nretry_cap_seconds = 0.2\n'
        f'probe_cap_seconds = 0.2\ngive_up_after = "{give_up_after}"\n'
        "request_timeout_seconds = 2\n",
        1,
    )
    config_file.write_text(text, encoding="utf-8")


async def wait_states(
    service: BridgeService, ids: list[str], timeout: float = 20.0
) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = {}
        for mid in ids:
            row = await service.controller.db.get_outbox(mid)
            states[mid] = row.state if row else "missing"
        if all(s in FINAL for s in states.values()) or loop.time() > deadline:
            return states
        await asyncio.sleep(0.05)


def inbox_ids(store: Path) -> list[str]:
    con = sqlite3.connect(store)
    try:
        return [r[0] for r in con.execute("SELECT message_id FROM inbox ORDER BY message_id")]
    finally:
        con.close()


async def test_claims_survive_an_insurer_outage(tmp_path: Path, records: list) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_retries(hospital_cfg)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    insurer: BridgeService | None = None
    try:
        ids = []
        for i, record in enumerate(records[:5]):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)
        await asyncio.sleep(0.5)  # the insurer is down: connection refused, retried
        rows = [await hospital.controller.db.get_outbox(m) for m in ids]
        assert all(r.state in ("queued", "sending") for r in rows)
        assert max(r.attempts for r in rows) >= 2
        assert hospital.dispatchers[LINK_OUT].stats.retried >= 2

        insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
        await insurer.start()
        states = await wait_states(hospital, ids)
        assert set(states.values()) == {"acked"}
        assert sorted(inbox_ids(Path(insurer.controller.config.store.path))) == sorted(ids)
    finally:
        await hospital.stop()
        if insurer is not None:
            await insurer.stop()


async def test_retries_end_in_dead_letter_and_requeue_delivers(
    tmp_path: Path, records: list
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_retries(hospital_cfg, give_up_after="1s")
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    insurer: BridgeService | None = None
    try:
        record = records[5]
        await hospital.controller.put_consent(consent_for(record))
        mid = (await hospital.submit(record, LINK_OUT)).message_id
        states = await wait_states(hospital, [mid])
        assert states[mid] == "dead"
        row = await hospital.controller.db.get_outbox(mid)
        assert row.last_error == "gave-up:transport-error"
        assert row.last_answer == "no answer: partner unreachable: ClientConnectorError"

        insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
        await insurer.start()
        await hospital.dispatchers[LINK_OUT].resend(mid)  # an operator resends the dead claim
        states = await wait_states(hospital, [mid])
        assert states[mid] == "acked"
        assert inbox_ids(Path(insurer.controller.config.store.path)) == [mid]
    finally:
        await hospital.stop()
        if insurer is not None:
            await insurer.stop()


async def test_definitive_rejection_is_not_retried(tmp_path: Path, records: list) -> None:
    """An insurer that does not accept this hospital's profile rejects with 403 once."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    # The insurer's inbound link uses its own, narrower profile file: no patient telecom.
    from bridge.resources import mappings_dir

    narrow = (mappings_dir() / "links" / "commercial-insurance.yaml").read_text(encoding="utf-8")
    (tmp_path / "narrow.yaml").write_text(_drop_patient_telecom(narrow), encoding="utf-8")
    text = insurer_cfg.read_text(encoding="utf-8").replace(
        'profile = "commercial-insurance"', 'profile = "narrow.yaml"'
    )
    insurer_cfg.write_text(text, encoding="utf-8")
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        record = next(r for r in records if r["elements"].get("HDSD00.11.026"))  # has a phone
        await hospital.controller.put_consent(consent_for(record))
        mid = (await hospital.submit(record, LINK_OUT)).message_id
        states = await wait_states(hospital, [mid])
        assert states[mid] == "rejected"
        row = await hospital.controller.db.get_outbox(mid)
        assert row.attempts == 1 and row.last_error == "profile-denied"
        assert inbox_ids(Path(insurer.controller.config.store.path)) == []
    finally:
        await hospital.stop()
        await insurer.stop()


def _drop_patient_telecom(profile_yaml: str) -> str:
    head, patient, rest = profile_yaml.partition("  Patient:\n")
    assert patient, "the commercial-insurance profile lists Patient elements"
    narrowed = re.sub(r"      - (\{path: )?telecom\b[^\n]*\n", "", rest, count=1)
    assert narrowed != rest
    return head + patient + narrowed


async def test_crash_while_sending_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, records: list
) -> None:
    """The hospital dies after sending but before recording the receipt; on restart the
    lease expires, the claim is sent again and the insurer answers with its original
    receipt: one claim at the insurer, one receipt at the hospital."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    try:
        hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
        record = records[7]
        await hospital.controller.put_consent(consent_for(record))
        mid = (await hospital.controller.submit(record, LINK_OUT)).message_id
        db = hospital.controller.db
        # Simulate the crash: take the row for sending, deliver it by hand, never ack it.
        from datetime import UTC, datetime, timedelta

        taken = await db.claim_due(LINK_OUT, now=datetime.now(UTC), lease=timedelta(seconds=0.2))
        assert [r.message_id for r in taken] == [mid]
        await hospital.start()
        first_receipt = await hospital.dispatchers[LINK_OUT]._post(taken[0].payload)
        await hospital.stop()  # "crash": the receipt was never recorded

        restarted = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
        await restarted.start()
        try:
            states = await wait_states(restarted, [mid])
            assert states[mid] == "acked"
            row = await restarted.controller.db.get_outbox(mid)
            assert row.receipt == first_receipt
            assert inbox_ids(Path(insurer.controller.config.store.path)) == [mid]
        finally:
            await restarted.stop()
    finally:
        await insurer.stop()
