"""What ``bridge research report`` and ``release`` say and change, run as their own
processes over the end-to-end research batch (tests/test_e2e_research_release.py).

- A report changes nothing: a record it reads does not link identifiers, so a later
  batch is judged as if the report had not run.
- A release counts what it queued: a record repeated in the batch, or released before,
  is sent once and reported as already queued, never counted again.
- A batch none of which can be released exits 1.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from e2e_support import cli, consent_for, make_workdir
from test_e2e_research_release import KEY_HEX, LINK, RESEARCHER, batch, research_link

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller


def _site(root: Path) -> tuple[Path, list[dict[str, Any]], list[str]]:
    hospital_cfg, _ = make_workdir(root)
    (root / "research.key").write_text(KEY_HEX + "\n", encoding="ascii")
    hospital_cfg.write_text(hospital_cfg.read_text(encoding="utf-8") + research_link(
        'deid_key_file = "research.key"', free_port()), encoding="utf-8")
    persons, records, owners = batch()

    async def consents() -> None:
        controller = Controller(load_config(hospital_cfg))
        try:
            for person in persons:
                if person.consent:
                    first = records[owners.index(person.key)]
                    await controller.put_consent(consent_for(
                        first, consent_id=f"research-{person.key}", recipient=RESEARCHER,
                        purposes=("HRESCH",), sensitive=person.named))
        finally:
            await controller.close()

    asyncio.run(consents())
    return hospital_cfg, records, owners


def _run(config: Path, verb: str, records: list[dict[str, Any]], path: Path) -> Any:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    done = cli("research", verb, "--config", str(config), "--link", LINK, "--json", str(path))
    return done, (json.loads(done.stdout) if done.stdout.strip() else None)


def test_report_links_nothing_and_release_counts_what_it_queued(tmp_path: Path) -> None:
    config, records, owners = _site(tmp_path)
    # A report over a record of a0 whose medical-record number is new ...
    a0 = copy.deepcopy(records[owners.index("a0")])
    a0["elements"]["HDSD00.11.006"] = "NEW-MRN-0001"
    a0["elements"]["HDSD00.11.140"] = "ZY-NEW-0001"
    done, report = _run(config, "report", [*records, a0], tmp_path / "d2.json")
    assert done.returncode == 0, done.stderr
    # ... does not make that number a0's: b0's record naming it is judged on its own.
    b0 = copy.deepcopy(records[owners.index("b0")])
    b0["elements"]["HDSD00.11.006"] = "NEW-MRN-0001"
    b0["elements"]["HDSD00.11.140"] = "ZY-NEW-0002"
    done, report = _run(config, "report", [*records, b0], tmp_path / "d1.json")
    assert done.returncode == 0, done.stderr
    assert not [r for r in report["records_refused"]
                if r["record"] == len(records) and "Patient.identifier" in r["why"]], report

    # A release of the batch with two records repeated: each message queued once.
    repeated = [*records, records[0], records[5]]
    done, first = _run(config, "release", repeated, tmp_path / "batch.json")
    assert done.returncode == 0, done.stderr
    released = first["records_released"]
    assert len(first["messages_queued"]) + len(first["records_already_queued"]) == released
    assert len(set(first["messages_queued"])) == len(first["messages_queued"])
    assert len(first["records_already_queued"]) >= 1
    listed = cli("outbox", "list", "--config", str(config), "--link", LINK, "--json")
    assert len(json.loads(listed.stdout)) == len(first["messages_queued"])
    # The same release again queues nothing and says so.
    done, again = _run(config, "release", repeated, tmp_path / "batch.json")
    assert done.returncode == 0, done.stderr
    assert again["messages_queued"] == [] and len(again["records_already_queued"]) == released


def test_a_batch_that_releases_nothing_exits_1(tmp_path: Path) -> None:
    config, records, owners = _site(tmp_path)
    few = [records[owners.index(key)] for key in ("a0", "b0", "lone")]
    done, report = _run(config, "report", few, tmp_path / "few.json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["records_released"] == 0 and "nothing in the batch" in done.stderr
