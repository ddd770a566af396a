"""``bridge status``, ``bridge outbox list`` and ``bridge outbox requeue`` over a real store.

Dead letters are made the way the bridge makes them (a store transition with a reason
and the partner's last answer); the commands are run through the CLI entry point.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from e2e_support import consent_for, make_workdir

from bridge.cli import main
from bridge.compliance.operators import host_user
from bridge.config import load_config
from bridge.ledger import open_store
from bridge.ledger.audit import AuditRecord
from bridge.samples import inpatient_records

LINK = "claims-to-insurer-b"


@pytest.fixture
def hospital(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A hospital with eight claims queued, six of them then dead-lettered."""
    hospital_cfg, _ = make_workdir(tmp_path)
    records = inpatient_records(8, seed=77)
    for i, record in enumerate(records):
        consent_file = tmp_path / f"consent-{i}.json"
        consent_file.write_bytes(orjson.dumps(consent_for(record, consent_id=f"ob-{i}")))
        record_file = tmp_path / f"claim-{i}.json"
        record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
        assert main(["push", "--config", str(hospital_cfg), "--link", LINK, str(record_file)]) == 0
    config = load_config(hospital_cfg)
    now = datetime.now(UTC)
    with open_store(config.store) as store:
        rows = store.claim_due(LINK, now=now, limit=6)
        for row in rows:
            store.mark_dead(
                row.message_id,
                error="gave-up:transport-error",
                answer="HTTP 503",
                now=now,
                audit=AuditRecord(
                    time=now,
                    actor="hospital-a",
                    action="claim.dead",
                    subject=row.message_id,
                    outcome="failure",
                ),
            )
    capsys.readouterr()
    return hospital_cfg


def _dead_ids(config: Path) -> list[str]:
    with open_store(load_config(config).store) as store:
        return [r.message_id for r in store.list_outbox(LINK, state="dead")]


def test_status_lists_every_dead_claim_with_reason_answer_and_age(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--config", str(hospital)]) == 1
    out = capsys.readouterr().out
    dead_lines = [line for line in out.splitlines() if " dead (" in line]
    assert len(dead_lines) == 6  # every one, not the first five
    assert all("gave-up:transport-error; last answer HTTP 503" in line for line in dead_lines)
    assert all(re.search(r", \d+ s old: urn:uuid:", line) for line in dead_lines)
    assert "6 claims need an operator" in out and "all settled" not in out

    assert main(["status", "--config", str(hospital), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    [link] = [lk for lk in report["links"] if lk["id"] == LINK]
    assert [c["state"] for c in link["needs_attention"]] == ["dead"] * 6
    assert all(0 <= c["age_seconds"] < 3600 for c in link["needs_attention"])
    assert {c["last_answer"] for c in link["needs_attention"]} == {"HTTP 503"}


def test_outbox_list_filters_by_state_and_link(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["outbox", "list", "--config", str(hospital), "--state", "dead", "--json"]) == 0
    dead = json.loads(capsys.readouterr().out)
    assert [c["seq"] for c in dead] == [1, 2, 3, 4, 5, 6]
    assert {c["reason"] for c in dead} == {"gave-up:transport-error"}
    assert {c["last_answer"] for c in dead} == {"HTTP 503"}
    assert "payload" not in dead[0] and "receipt" not in dead[0]

    assert main(["outbox", "list", "--config", str(hospital), "--state", "queued"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [["7", "queued"], ["8", "queued"]]

    assert main(["outbox", "list", "--config", str(hospital), "--link", "no-such-link"]) == 2
    assert "--link no-such-link" in capsys.readouterr().err
    # The command without a subcommand still counts.
    assert main(["outbox", "--config", str(hospital)]) == 0
    assert "dead\t6" in capsys.readouterr().out


def test_requeue_by_id_state_and_since_is_audited_with_the_operator(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _dead_ids(hospital)
    assert main(["outbox", "requeue", "--config", str(hospital), "--id", dead[0]]) == 0
    capsys.readouterr()
    assert _dead_ids(hospital) == dead[1:]

    # A claim that is not dead is not requeued, and nothing is written.
    with open_store(load_config(hospital).store) as store:
        head = store.audit_head()
    assert main(["outbox", "requeue", "--config", str(hospital), "--id", dead[0]]) == 2
    assert "only dead or rejected claims" in capsys.readouterr().err
    with open_store(load_config(hospital).store) as store:
        assert store.audit_head() == head

    # --since after every dead letter picks none; before, all of them.
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert (
        main(["outbox", "requeue", "--config", str(hospital), "--state", "dead", "--since", future])
        == 0
    )
    assert "0 claims requeued" in capsys.readouterr().err
    assert (
        main(
            [
                "outbox",
                "requeue",
                "--config",
                str(hospital),
                "--state",
                "dead",
                "--since",
                "2000-01-01",
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert [r["message_id"] for r in answer["requeued"]] == dead[1:]
    assert _dead_ids(hospital) == []

    with open_store(load_config(hospital).store) as store:
        requeues = [e for e in store.audit_entries() if e.record.action == "claim.requeue"]
        rows = [store.get_outbox(m) for m in dead]
    assert [e.record.subject for e in requeues] == dead
    assert {e.record.operator for e in requeues} == {f"os:{host_user()}"}
    assert all(r is not None and r.state == "queued" and r.attempts == 0 for r in rows)
    # The give-up clock starts again at the requeue.
    assert all(r is not None and r.pending_since > r.created for r in rows)


def test_pushing_a_dead_claim_again_says_so_and_how_to_requeue(
    hospital: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _dead_ids(hospital)
    assert (
        main(["push", "--config", str(hospital), "--link", LINK, str(tmp_path / "claim-0.json")])
        == 1
    )
    out = capsys.readouterr().out
    assert f"{dead[0]} already in the outbox and dead (gave-up:transport-error)" in out
    assert f"bridge outbox requeue --id {dead[0]} puts it back" in out
    # A claim still waiting is only a suppressed duplicate.
    assert (
        main(["push", "--config", str(hospital), "--link", LINK, str(tmp_path / "claim-7.json")])
        == 0
    )
    assert "already queued (duplicate suppressed)" in capsys.readouterr().out


def test_requeue_needs_a_selection(hospital: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outbox", "requeue", "--config", str(hospital)]) == 2
    assert "--id ID" in capsys.readouterr().err
    assert main(["outbox", "requeue", "--config", str(hospital), "--id", "urn:uuid:nope"]) == 2
    assert "--id urn:uuid:nope" in capsys.readouterr().err
