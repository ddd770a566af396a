"""A controller that starts over a store of years reads its patient links, ID card
notes and consents page by page, and knows every one of them, whatever the page size."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.demo import INSURER, free_port, write_configs
from bridge.link import node
from bridge.link.node import Controller
from bridge.policy.engine import build_consent
from bridge.policy.identity import ID_CARD_SYSTEM
from bridge.trust.pki import init_dev_pki

MRN = "urn:oid:2.16.156.10011.1.13"
STAY = "urn:oid:2.16.156.10011.1.12"
NOW = datetime.now(UTC)


def person(i: int, stay: int) -> list[tuple[str, str]]:
    return [(ID_CARD_SYSTEM, f"11010119900307{i:03d}X"), (MRN, f"MRN{i:05d}"),
            (STAY, f"ZY{i:05d}-{stay}")]


def answers(c: Controller) -> list[tuple[bool, bool, list[str]]]:
    """Per person: are its identifiers one person, does its 病案号 beside the next
    person's ID card number make two people, and which consents its stays find."""
    out = []
    for i in range(7):
        stays = [person(i, s)[2] for s in range(3)]
        group = c.identity.of_identifiers([*person(i, 0)[:2], *stays])
        mrn = c.identity.of_identifiers([person(i, 0)[1]])
        other_card = c.identity.of_identifiers([person((i + 1) % 7, 0)[0]])
        found = sorted(r.id for r in c.consents.for_patient([stays[2]]))
        out.append((c.identity.one_person(group), c.identity.two_id_cards(mrn, other_card),
                    found))
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    init_dev_pki(tmp_path / "pki", ["hospital-a", INSURER], now=NOW)
    hospital, _ = write_configs(tmp_path, free_port(), free_port())

    async def fill() -> None:
        c = Controller(load_config(hospital))
        try:
            for i in range(7):
                for stay in range(3):
                    await c.link_patient(person(i, stay))
                if i % 2 == 0:  # consents under the ID card, found by any stay
                    await c.put_consent(build_consent(
                        consent_id=f"c-{i}", patient_system=ID_CARD_SYSTEM,
                        patient_value=person(i, 0)[0][1], recipient=INSURER,
                        purposes=["HPAYMT"], start=NOW - timedelta(days=1),
                        end=NOW + timedelta(days=30), hospital_partner_id="hospital-a"))
                    await c.put_consent(build_consent(  # amended: two versions
                        consent_id=f"c-{i}", patient_system=ID_CARD_SYSTEM,
                        patient_value=person(i, 0)[0][1], recipient=INSURER,
                        purposes=["HPAYMT"], start=NOW - timedelta(days=2),
                        end=NOW + timedelta(days=30), hospital_partner_id="hospital-a"))
        finally:
            await c.close()

    asyncio.run(fill())
    return hospital


@pytest.mark.parametrize("page", [1, 2, 5, 50_000])
def test_a_restarted_controller_knows_every_link_and_consent(
        config: Path, page: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "STARTUP_PAGE", page)

    async def read() -> list[tuple[bool, bool, list[str]]]:
        c = Controller(load_config(config))
        try:
            return answers(c)
        finally:
            await c.close()

    got = asyncio.run(read())
    assert got == [(True, True, [f"c-{i}"] if i % 2 == 0 else []) for i in range(7)]
