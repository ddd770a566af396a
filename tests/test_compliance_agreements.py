"""Data-use agreements from outside: ``bridge serve`` and ``bridge push`` processes on
real sockets, agreements written into their configuration files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from compliance_support import (
    audit_entries,
    bind_agreement,
    inbox_count,
    instant,
    outbox_states,
    samples,
)
from ops_support import bridge, make_site, serve, wait_for


def _consent(site) -> None:  # type: ignore[no-untyped-def]
    run = bridge("consent", "add", "--config", str(site.hospital),
                 str(samples(site) / "consent.json"))
    assert run.returncode == 0, run.stderr


@pytest.mark.battery
@pytest.mark.control("U9", "D2")
def test_a_claim_queued_before_the_agreement_ended_is_not_sent_after(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    later = instant(3600)
    bind_agreement(site.hospital, "dua-claims", valid_to=later)
    bind_agreement(site.insurer, "dua-claims")
    _consent(site)
    push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                  str(samples(site) / "claim-1.json"))
    assert push.returncode == 0, push.stderr
    message_id = push.stdout.split()[0]
    # The agreement ends after the claim was queued and before the hospital sends it.
    text = site.hospital.read_text(encoding="utf-8")
    site.hospital.write_text(text.replace(f"valid_to = {later}", f"valid_to = {instant(1)}"),
                             encoding="utf-8")
    time.sleep(2)
    insurer = serve(site.insurer)
    try:
        hospital = serve(site.hospital)
        try:
            wait_for(lambda: outbox_states(site.hospital).get("refused") == 1,
                     what="the claim refused at dispatch")
        finally:
            hospital.stop()
    finally:
        insurer.stop()
    assert inbox_count(site.insurer) == 0
    refused = audit_entries(site.hospital, "claim.refused")
    assert [e.record.subject for e in refused] == [message_id]
    assert "agreement-refused" in str(refused[0].record.detail)
    assert "agreements.dua-claims.valid_to" in str(refused[0].record.detail)


@pytest.mark.control("U9")
def test_the_receiver_refuses_acceptance_once_its_own_agreement_has_ended(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    bind_agreement(site.hospital, "dua-claims")
    bind_agreement(site.insurer, "dua-insurer", valid_to="2025-01-31")
    _consent(site)
    insurer = serve(site.insurer)
    hospital = serve(site.hospital)
    try:
        push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                      str(samples(site) / "claim-1.json"))
        assert push.returncode == 0, push.stderr
        wait_for(lambda: outbox_states(site.hospital).get("rejected") == 1,
                 what="the claim rejected by the insurer")
    finally:
        hospital.stop()
        insurer.stop()
    assert inbox_count(site.insurer) == 0
    rejects = audit_entries(site.insurer, "message.reject")
    assert any(e.record.detail == "agreement-refused@agreements.dua-insurer.valid_to"
               for e in rejects), [e.record.detail for e in rejects]
    rejected = audit_entries(site.hospital, "claim.rejected")
    assert rejected and rejected[0].record.detail == "agreement-refused"


@pytest.mark.control("U9", "D2")
def test_nothing_is_queued_before_the_agreement_is_in_force(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    bind_agreement(site.hospital, "dua-next-year", valid_from="2099-01-01")
    _consent(site)
    push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                  str(samples(site) / "claim-1.json"))
    assert push.returncode == 2
    assert "agreement dua-next-year is not yet in force" in push.stderr
    assert "agreements.dua-next-year.valid_from" in push.stderr
    assert outbox_states(site.hospital).get("queued", 0) == 0
    refused = audit_entries(site.hospital, "claim.refused")
    assert len(refused) == 1 and "dua-next-year" in str(refused[0].record.detail)


@pytest.mark.control("U9")
def test_an_agreement_that_does_not_cover_the_link_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    bind_agreement(site.hospital, "dua-other", parties=("hospital-a", "platform-c"))
    run = bridge("serve", "--config", str(site.hospital))
    assert run.returncode == 2
    assert "agreements.dua-other.parties" in run.stderr and "insurer-b" in run.stderr
