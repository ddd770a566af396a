"""A hospital corrects a claim it pushed: ``bridge push --replaces MESSAGE_ID``.

The changed record goes as a corrected claim of the first (Claim.related naming the
first claim's message identity, relationship prior, PROTOCOL "Corrected claims"), under
an identity of its own; a --replaces naming no claim of that link is a usage error and
queues nothing. Driven with the CLI, each command its own process; the queued claim is
read from the hospital's own store.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from e2e_support import cli, queued_count

from bridge.config import load_config
from bridge.ledger import open_store

LINK = "claims-to-insurer-b"
PRIOR = "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship"


def test_a_changed_record_pushed_with_replaces_is_a_corrected_claim(tmp_path: Path) -> None:
    assert cli("init", "hospital", str(tmp_path)).returncode == 0
    config = tmp_path / "hospital.toml"
    samples = tmp_path / "hospital-a" / "samples"
    assert cli("consent", "add", "--config", str(config), str(samples / "consent.json")
               ).returncode == 0
    first = cli("push", "--config", str(config), "--link", LINK, str(samples / "claim-1.json"))
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.split()[0]

    record = json.loads((samples / "claim-1.json").read_text(encoding="utf-8"))
    record["elements"]["HDSD00.11.142"] = "99999.00"  # the total, corrected
    changed = tmp_path / "corrected.json"
    changed.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")

    wrong = cli("push", "--config", str(config), "--link", LINK, "--replaces",
                "urn:uuid:00000000-0000-4000-8000-000000000000", str(changed))
    assert wrong.returncode == 2 and "--replaces" in wrong.stderr, wrong.stderr
    assert queued_count(config) == 1

    second = cli("push", "--config", str(config), "--link", LINK, "--replaces", first_id,
                 str(changed))
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.split()[0]
    assert second_id != first_id and queued_count(config) == 2
    with open_store(load_config(config).store) as store:
        row = store.get_outbox(second_id)
        assert row is not None
        payload = orjson.loads(row.payload)
    claim = next(e["resource"] for e in payload["entry"]
                 if e["resource"]["resourceType"] == "Claim")
    [related] = claim["related"]
    assert related["claim"]["identifier"]["value"] == first_id
    coding = related["relationship"]["coding"][0]
    assert (coding["system"], coding["code"]) == (PRIOR, "prior")
