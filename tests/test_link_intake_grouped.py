"""Submissions arriving together read the store together (one trip for their patient
links, consent changes and outbox rows); each must still get exactly the answer it
would get alone: the consents as the store holds them when it decides, and its own
failure only."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir, set_toml_keys

from bridge.config import load_config
from bridge.errors import ConsentDenied
from bridge.link.node import Controller
from bridge.samples import inpatient_records


async def _change_consent_elsewhere(controller: Controller, consent: dict[str, Any]) -> None:
    """Put a consent into the shared store as another bridge process would (this
    controller hears of it only through the store's change feed)."""
    system, value = patient_id_of(consent)
    await controller.db.put_consent(
        consent_id=consent["id"], patient_keys=[f"{system}|{value}"], status=consent["status"],
        resource=orjson.dumps(consent), now=controller.clock(),
        audit=controller.audit("consent.put", subject=consent["id"], detail="other-process"),
    )


def patient_id_of(consent: dict[str, Any]) -> tuple[str, str]:
    ident = consent["patient"]["identifier"]
    return ident["system"], ident["value"]


async def test_concurrent_submissions_see_every_page_of_consent_changes(tmp_path: Path) -> None:
    """More consent changes than one read returns wait in the store, the last of them
    revoking the consents of two records submitted at once: both submissions take in
    every change before deciding, and both are refused, as each would be alone."""
    hospital_cfg, _ = make_workdir(tmp_path)
    controller = Controller(load_config(hospital_cfg))
    records = inpatient_records(3, seed=61)
    try:
        for i, record in enumerate(records[:2]):
            await controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        # A full page of changes about someone else, then the two revocations after it.
        other = consent_for(records[2], consent_id="c-other")
        for _ in range(1000):
            await _change_consent_elsewhere(controller, other)
        for i, record in enumerate(records[:2]):
            await _change_consent_elsewhere(
                controller, consent_for(record, consent_id=f"c-{i}", status="inactive"))
        answers = await asyncio.gather(
            *(controller.submit(record, LINK_OUT) for record in records[:2]),
            return_exceptions=True)
        assert [type(a) for a in answers] == [ConsentDenied, ConsentDenied], answers
    finally:
        await controller.close()


async def test_one_unreadable_outbox_row_fails_only_its_own_submission(tmp_path: Path) -> None:
    """A record submitted again whose stored claim cannot be opened (a damaged sealed
    row) fails; a different record submitted at the same moment is queued as it would
    be alone."""
    hospital_cfg, _ = make_workdir(tmp_path)
    kek = tmp_path / "h.kek"
    kek.write_bytes(secrets.token_bytes(32))
    set_toml_keys(hospital_cfg, "store", {"data_key_file": str(kek)})
    controller = Controller(load_config(hospital_cfg))
    damaged, fine = inpatient_records(2, seed=62)
    try:
        for i, record in enumerate((damaged, fine)):
            await controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        first = await controller.submit(damaged, LINK_OUT)
        assert first.created
        with sqlite3.connect(controller.config.store.path) as conn:
            (blob,) = conn.execute("SELECT payload FROM outbox_payload WHERE message_id=?",
                                   (first.message_id,)).fetchone()
            flipped = bytearray(blob)
            flipped[-1] ^= 0x01
            conn.execute("UPDATE outbox_payload SET payload=? WHERE message_id=?",
                         (bytes(flipped), first.message_id))
        with pytest.raises(Exception):  # noqa: B017 - whatever the store says of the damage
            await controller.db.get_outbox(first.message_id)
        again, other = await asyncio.gather(
            controller.submit(damaged, LINK_OUT), controller.submit(fine, LINK_OUT),
            return_exceptions=True)
        assert isinstance(again, Exception)
        assert not isinstance(other, BaseException), other
        assert other.created
        row = await controller.db.get_outbox(other.message_id)
        assert row is not None and row.state == "queued"
    finally:
        await controller.close()
