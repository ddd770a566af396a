"""One patient's consent never covers another person's record.

A hospital's records link a patient's identifiers (resident ID card, medical-record
number, inpatient number, health card) so that a consent recorded under one is found by
any other. A record stating another resident ID card number beside an identifier that
already names a person (a medical-record number reused, a record keyed to the wrong
patient) would join two people, and the first one's consent would release the second
one's claim. A person holds one resident ID card number for life: such a record is
refused, naming the identifiers (never their values), and nothing is queued; the same
person's later stay, under a new inpatient number, still goes under the consent.

Driven from outside: ``bridge init``, ``bridge consent add``, ``bridge push``, ``bridge
consent explain`` and ``bridge outbox list``, each as its own process.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from e2e_support import cli, queued_count

ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"  # 居民身份证号 (WS/T 500)

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def id_number(first17: str) -> str:
    """A resident ID card number with its GB 11643 check character."""
    total = sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


@pytest.fixture
def hospital(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    samples = tmp_path / "hospital-a" / "samples"
    added = cli("consent", "add", "--config", str(config), str(samples / "consent.json"))
    assert added.returncode == 0, added.stderr
    record = json.loads((samples / "claim-1.json").read_text(encoding="utf-8"))
    consent = json.loads((samples / "consent.json").read_text(encoding="utf-8"))
    assert consent["patient"]["identifier"] == {
        "system": ID_CARD_SYSTEM, "value": record["elements"]["HDSD00.11.048"]}
    pushed = cli("push", "--config", str(config), "--link", "claims-to-insurer-b",
                 str(samples / "claim-1.json"))
    assert pushed.returncode == 0, pushed.stderr
    return config, record


def _write(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("linked_before_upgrade", [False, True])
def test_a_record_naming_another_id_card_beside_a_known_record_number_is_refused(
        hospital: tuple[Path, dict[str, Any]], tmp_path: Path,
        linked_before_upgrade: bool) -> None:
    config, record = hospital
    if linked_before_upgrade:
        # A store whose patients were linked before ID card numbers were noted apart:
        # the consent, registered under the ID card, still tells which one it is.
        db = sqlite3.connect(tmp_path / "hospital-a" / "bridge.sqlite")
        with db:
            db.execute("DELETE FROM patient_id_card")
        db.close()
    other = json.loads(json.dumps(record))
    elements = other["elements"]
    stranger = id_number("11010119850315123")
    assert stranger != elements["HDSD00.11.048"]
    # Another person: another ID card, name, birth date and stay; the medical-record
    # number (HDSD00.11.006) is the first patient's.
    elements["HDSD00.11.048"] = stranger
    elements["HDSD00.11.110"] = "李四"
    elements["HDSD00.11.140"] = "ZY-OTHER-0001"
    elements.pop("HDSD00.11.053", None)
    path = _write(tmp_path / "other-person.json", other)

    explained = cli("consent", "explain", "--config", str(config), "--link",
                    "claims-to-insurer-b", str(path))
    assert explained.returncode == 1, explained.stdout + explained.stderr
    assert "REFUSED: the patient's identifiers name two people" in explained.stdout
    assert stranger not in explained.stdout

    pushed = cli("push", "--config", str(config), "--link", "claims-to-insurer-b", str(path))
    assert pushed.returncode == 2, pushed.stdout + pushed.stderr
    assert "Patient.identifier" in pushed.stderr and ID_CARD_SYSTEM in pushed.stderr
    assert stranger not in pushed.stderr + pushed.stdout
    assert record["elements"]["HDSD00.11.006"] not in pushed.stderr
    assert "Traceback" not in pushed.stderr
    assert queued_count(config) == 1  # only the first patient's claim

    # Sent again, or with the inpatient number the refused record named: still refused.
    again = cli("push", "--config", str(config), "--link", "claims-to-insurer-b", str(path))
    assert again.returncode == 2 and queued_count(config) == 1


def test_the_same_persons_later_stay_still_goes(
        hospital: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    config, record = hospital
    later = json.loads(json.dumps(record))
    elements = later["elements"]
    elements["HDSD00.11.140"] = "ZY-LATER-0002"  # another stay: a new inpatient number
    for key in ("HDSD00.11.085", "HDSD00.11.019"):  # admission and discharge dates
        if key in elements:
            elements[key] = elements[key].replace("2026", "2025", 1)
    path = _write(tmp_path / "later-stay.json", later)
    pushed = cli("push", "--config", str(config), "--link", "claims-to-insurer-b", str(path))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert queued_count(config) == 2


def test_a_research_batch_reports_a_record_joining_two_people_as_refused(
        tmp_path: Path) -> None:
    # One record of the batch names another resident ID card number beside a consenting
    # patient's record number: it is refused in the report, the rest is reported.
    from e2e_support import consent_for, make_workdir
    from test_e2e_research_release import KEY_HEX, LINK, RESEARCHER, research_link

    from bridge.demo import free_port
    from bridge.samples import inpatient_records

    hospital_cfg, _ = make_workdir(tmp_path)
    (tmp_path / "research.key").write_text(KEY_HEX + "\n", encoding="ascii")
    hospital_cfg.write_text(hospital_cfg.read_text(encoding="utf-8") + research_link(
        'deid_key_file = "research.key"', free_port()), encoding="utf-8")
    first = inpatient_records(1, seed=83)[0]
    consent = consent_for(first, consent_id="research-1", recipient=RESEARCHER,
                          purposes=("HRESCH",))
    (tmp_path / "consent.json").write_text(json.dumps(consent, ensure_ascii=False),
                                           encoding="utf-8")
    assert cli("consent", "add", "--config", str(hospital_cfg),
               str(tmp_path / "consent.json")).returncode == 0
    other = json.loads(json.dumps(first))
    other["elements"]["HDSD00.11.048"] = id_number("11010119850315123")
    other["elements"]["HDSD00.11.140"] = "ZY-OTHER-0009"
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([first, other], ensure_ascii=False), encoding="utf-8")
    for verb in ("report", "release"):
        # One person is fewer than k: nothing is released (exit 1), and the report says
        # why of each record; the report judges the batch as the release does.
        done = cli("research", verb, "--config", str(hospital_cfg), "--link", LINK,
                   "--json", str(batch))
        assert done.returncode == 1, done.stdout + done.stderr
        refused = json.loads(done.stdout)["records_refused"]
        assert refused == [{"record": 1, "why": "mapping-error at Patient.identifier"}], verb
