"""Sequence numbers across a restore of the sender, from outside: ``bridge init``,
``bridge serve`` for each side, ``bridge push``, ``bridge store backup|restore`` and
``bridge sync status`` as an operator runs them (PROTOCOL §8a, P-SYNC-7, P-SYNC-8).

The hospital is restored from a backup taken before it sent claims 5 and 6, which the
insurer holds. Its next claims must not be numbered 5 and 6 again; when they are (the
restore could not ask the insurer), the insurer reports the numbers it received twice
and the hospital reports that its numbering and the insurer's disagree.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from compliance_support import another_claim, consenting_site, inbox_count
from ops_support import Serve, Site, bridge, serve, wait_for

from bridge.config import load_config

LINK = "claims-to-insurer-b"


def _push(site: Site, claim: Path) -> str:
    run = bridge("push", "--config", str(site.hospital), "--link", LINK, str(claim))
    assert run.returncode == 0, run.stderr
    return run.stdout.split()[0]


def _seq(site: Site, message_id: str) -> int:
    con = sqlite3.connect(load_config(site.hospital).store.path)
    try:
        [(seq,)] = con.execute("SELECT seq FROM outbox WHERE message_id=?", (message_id,))
    finally:
        con.close()
    return int(seq)


def _acked(site: Site) -> int:
    con = sqlite3.connect(load_config(site.hospital).store.path)
    try:
        [(n,)] = con.execute("SELECT COUNT(*) FROM outbox WHERE state='acked'")
    finally:
        con.close()
    return int(n)


def _status(config: Path) -> tuple[int, str, dict]:  # type: ignore[type-arg]
    text = bridge("sync", "status", "--config", str(config))
    as_json = bridge("sync", "status", "--config", str(config), "--json")
    assert text.returncode == as_json.returncode, (text.stdout, as_json.stdout)
    return text.returncode, text.stdout, json.loads(as_json.stdout)


def _claims_1_to_6_with_a_backup_after_4(tmp_path: Path) -> tuple[Site, Path, Serve]:
    """A site whose insurer holds claims 1-6 of the hospital, the hospital's backup
    taken (while serving) after claim 4, and the insurer still serving."""
    site = consenting_site(tmp_path)
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    backup = tmp_path / "backup"
    try:
        for n in range(1, 5):
            _push(site, another_claim(site, n))
        wait_for(lambda: _acked(site) == 4, what="claims 1-4 acknowledged")
        run = bridge("store", "backup", "--config", str(site.hospital), str(backup))
        assert run.returncode == 0, run.stderr
        for n in (5, 6):
            _push(site, another_claim(site, n))
        wait_for(lambda: _acked(site) == 6, what="claims 5 and 6 acknowledged")
        assert inbox_count(site.insurer) == 6
    finally:
        hospital.stop()
    return site, backup, insurer


@pytest.mark.battery
def test_a_sender_restored_from_a_backup_numbers_new_claims_after_what_the_partner_holds(
    tmp_path: Path,
) -> None:
    site, backup, insurer = _claims_1_to_6_with_a_backup_after_4(tmp_path)
    hospital = None
    try:
        restored = bridge("store", "restore", "--config", str(site.hospital), str(backup))
        assert restored.returncode == 0, restored.stderr
        # The restored outbox holds claims 1-4; the insurer confirms 1-6.
        assert "compared 4, resent 0" in restored.stdout

        hospital = serve(site.hospital)
        new = [_push(site, another_claim(site, n)) for n in range(7, 16)]
        wait_for(lambda: inbox_count(site.insurer) == 15, what="15 claims at the insurer")
        wait_for(lambda: _acked(site) == 13, what="the 9 new claims acknowledged")
    finally:
        if hospital is not None:
            hospital.stop()
        insurer.stop()

    # The insurer holds 15 claims, numbered 1-15 once each.
    code, out, report = _status(site.insurer)
    [stream] = report["inbound"]
    assert "received 15, up to seq 15, without a gap up to 15" in out, out
    assert (stream["received"], stream["highest"], stream["contiguous"]) == (15, 15, 15)
    assert stream["collisions"] == [] and stream["missing"] == 0
    assert code == 0, out

    # The hospital numbered its new claims after the 6 the insurer holds.
    assert [_seq(site, m) for m in new] == list(range(7, 16))
    code, out, report = _status(site.hospital)
    [link] = report["outbound"]
    assert (link["enqueued"], link["acked"]) == (15, 15)
    assert link["reused"] == [] and link["collisions"] == []
    assert link["partner_summary"]["partner_highest"] == 6
    assert code == 0, out
    assert "the partner holds up to seq 6" in restored.stdout


@pytest.mark.battery
def test_numbers_given_twice_are_reported_on_both_sides(tmp_path: Path) -> None:
    # The insurer is down while the hospital is restored: the restore cannot ask it what
    # it holds, and the hospital's next two claims take numbers 5 and 6 again.
    site, backup, insurer = _claims_1_to_6_with_a_backup_after_4(tmp_path)
    insurer.stop()
    restored = bridge("store", "restore", "--config", str(site.hospital), str(backup))
    assert restored.returncode == 0, restored.stderr
    assert "not reconciled" in restored.stdout

    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        again = [_push(site, another_claim(site, n)) for n in (7, 8)]
        assert [_seq(site, m) for m in again] == [5, 6]
        # Each is accepted on its own identity: no claim is lost.
        wait_for(lambda: inbox_count(site.insurer) == 8, what="both claims at the insurer")
        wait_for(lambda: _acked(site) == 6, what="both claims acknowledged")
    finally:
        hospital.stop()

    code, out, report = _status(site.insurer)
    [stream] = report["inbound"]
    # Eight claims arrived, under six numbers: 5 and 6 each came twice.
    assert stream["collisions"] == [5, 6] and stream["received"] == 8
    assert (stream["highest"], stream["contiguous"], stream["missing"]) == (6, 6, 0)
    assert f"stream {LINK}: received 8, up to seq 6" in out
    assert "COLLISION seq 5, 6 received under two message identities" in out
    assert "ZY2026" not in out  # numbers, never claim content
    assert code == 1, out

    # The hospital learns the insurer's numbers on its next reconciliation: it reports
    # the two numbers it gave again and numbers its next claim after the insurer's.
    run = bridge("sync", "reconcile", "--config", str(site.hospital), "--link", LINK)
    assert run.returncode == 0, run.stderr
    code, out, report = _status(site.hospital)
    [link] = report["outbound"]
    assert link["collisions"] == [[5, 6]]
    assert "the partner holds seq 5-6 under more than one message identity" in out
    assert code == 1, out
    hospital = serve(site.hospital)
    try:
        late = _push(site, another_claim(site, 9))
        assert _seq(site, late) == 7
        wait_for(lambda: inbox_count(site.insurer) == 9, what="the next claim at the insurer")
    finally:
        hospital.stop()
        insurer.stop()
