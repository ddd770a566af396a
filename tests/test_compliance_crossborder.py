"""Transfers abroad from outside: partner jurisdictions and approvals in the
configuration, ``bridge push`` and ``bridge serve`` as an operator runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from compliance_support import another_claim, audit_entries, outbox_states, samples
from ops_support import bridge, make_site


def _abroad(config: Path, approval: str = "") -> None:
    text = config.read_text(encoding="utf-8")
    marker = 'signing_certs = ["pki/insurer-b/sign.pem"]\n'
    assert text.count(marker) == 1
    config.write_text(text.replace(marker, marker + 'jurisdiction = "HK"\n' + approval),
                      encoding="utf-8")


def _approval(cap: int, *, authority: str = "committee", expires: str = "2099-12-31") -> str:
    return ("[partners.cross_border]\n"
            'reference = "DSC-2026-07"\n'
            f'authority = "{authority}"\n'
            f"item_cap = {cap}\n"
            f"expires = {expires}\n")


@pytest.mark.control("U11", "U12")
def test_a_partner_outside_the_mainland_without_an_approval_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _abroad(site.hospital)
    for command in (["serve"], ["push", "--link", "claims-to-insurer-b",
                                str(samples(site) / "claim-1.json")]):
        run = bridge(*command[:1], "--config", str(site.hospital), *command[1:])
        assert run.returncode == 2, run.stderr
        assert "partners.insurer-b.cross_border" in run.stderr
        assert "outside the mainland" in run.stderr


@pytest.mark.control("U11")
def test_a_committee_approval_covers_at_most_250_items(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _abroad(site.hospital, _approval(251))
    run = bridge("serve", "--config", str(site.hospital))
    assert run.returncode == 2
    assert "item_cap" in run.stderr and "250" in run.stderr


@pytest.mark.control("U11")
def test_items_abroad_are_counted_audited_and_stopped_at_the_cap(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _abroad(site.hospital, _approval(2))
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    claims = [samples(site) / "claim-1.json", another_claim(site, 2), another_claim(site, 3)]
    runs = [bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                   str(claim)) for claim in claims]
    assert [r.returncode for r in runs[:2]] == [0, 0], [r.stderr for r in runs]
    # The same claim again is one item, not two.
    again = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                   str(claims[0]))
    assert again.returncode == 0 and "already queued" in again.stdout
    assert runs[2].returncode == 2
    assert "DSC-2026-07" in runs[2].stderr
    assert "partners.insurer-b.cross_border.item_cap" in runs[2].stderr
    assert outbox_states(site.hospital).get("queued") == 2
    counted = audit_entries(site.hospital, "crossborder.item")
    assert [e.record.detail for e in counted] == [
        "approval=DSC-2026-07 jurisdiction=HK items=1/2",
        "approval=DSC-2026-07 jurisdiction=HK items=2/2",
    ]
    refused = audit_entries(site.hospital, "claim.refused")
    assert len(refused) == 1 and "cross-border-refused" in str(refused[0].record.detail)


@pytest.mark.control("U11")
def test_nothing_is_queued_abroad_once_the_approval_has_expired(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _abroad(site.hospital, _approval(10, expires="2025-06-30"))
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    run = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                 str(samples(site) / "claim-1.json"))
    assert run.returncode == 2
    assert "approval DSC-2026-07 has expired" in run.stderr
    assert outbox_states(site.hospital).get("queued", 0) == 0
