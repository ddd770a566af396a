"""The signature algorithm is chosen per link, from outside: two ``bridge serve``
processes on real sockets, Ed25519 signing keys added to their configuration files as
an operator would, and a claim signed under an algorithm the receiver's link does not
name refused before anything is stored."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from compliance_support import (
    add_to_link,
    another_claim,
    append,
    audit_entries,
    inbox_count,
    outbox_states,
)
from ops_support import Site, bridge, make_site, serve, wait_for

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.link.node import Controller
from bridge.trust.pki import (
    certificate_pem,
    issue_certificate,
    load_certificate,
    load_private_key,
    private_key_pem,
)


def ed25519_key(site: Site, controller: str) -> None:
    """Issue ``controller`` an Ed25519 signing certificate from the site's CA."""
    pki = site.root / "pki"
    cert, key = issue_certificate(
        load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key"),  # type: ignore[arg-type]
        f"{controller} signing (Ed25519)", purpose="signing", now=datetime.now(UTC),
        partner_id=controller, key_algorithm="Ed25519")
    (pki / controller / "sign-ed25519.pem").write_bytes(certificate_pem(cert))
    path = pki / controller / "sign-ed25519.key"
    path.write_bytes(private_key_pem(key))
    path.chmod(0o600)


def add_signing_key(config: Path, controller: str) -> None:
    append(config, "\n[[signing.keys]]\n"
                   f'cert = "pki/{controller}/sign-ed25519.pem"\n'
                   f'key = "pki/{controller}/sign-ed25519.key"\n')


def trust_ed25519_of(config: Path, partner: str) -> None:
    text = config.read_text(encoding="utf-8")
    old = f'signing_certs = ["pki/{partner}/sign.pem"]'
    assert text.count(old) == 1
    config.write_text(text.replace(
        old, f'signing_certs = ["pki/{partner}/sign.pem", "pki/{partner}/sign-ed25519.pem"]'),
        encoding="utf-8")


def push(site: Site, claim: Path) -> str:
    run = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                 str(claim))
    assert run.returncode == 0, run.stderr
    return run.stdout.split()[0]


@pytest.mark.battery
@pytest.mark.control("T20")
def test_a_claim_signed_under_an_algorithm_the_link_does_not_name_is_refused(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    for controller in ("hospital-a", "insurer-b"):
        ed25519_key(site, controller)
    # The insurer's link takes Ed25519 only, though it also holds the hospital's ES256
    # certificate; it signs its receipts on that link with its own Ed25519 key.
    trust_ed25519_of(site.insurer, "hospital-a")
    add_signing_key(site.insurer, "insurer-b")
    add_to_link(site.insurer, 'signature_algorithm = "Ed25519"')
    trust_ed25519_of(site.hospital, "insurer-b")
    consent = bridge("consent", "add", "--config", str(site.hospital),
                     str(site.root / "hospital-a" / "samples" / "consent.json"))
    assert consent.returncode == 0, consent.stderr

    insurer = serve(site.insurer)
    try:
        # The hospital still signs with its [signing] key: ES256.
        hospital = serve(site.hospital)
        try:
            refused_id = push(site, another_claim(site, 1))
            wait_for(lambda: outbox_states(site.hospital).get("rejected") == 1,
                     what="the ES256 claim rejected by the insurer")
        finally:
            hospital.stop()
        assert inbox_count(site.insurer) == 0
        rejects = audit_entries(site.insurer, "message.reject")
        assert [e.record.detail for e in rejects] == [
            "signature-invalid@Bundle.signature.data#alg"]
        assert rejects[0].record.subject == refused_id

        # The hospital's link now chooses Ed25519: the next claim goes through, and the
        # insurer's Ed25519 receipt is the only kind the hospital now accepts from it.
        add_signing_key(site.hospital, "hospital-a")
        add_to_link(site.hospital, 'signature_algorithm = "Ed25519"')
        hospital = serve(site.hospital)
        try:
            push(site, another_claim(site, 2))
            wait_for(lambda: outbox_states(site.hospital).get("acked") == 1,
                     what="the Ed25519 claim delivered")
        finally:
            hospital.stop()
    finally:
        insurer.stop()
    assert inbox_count(site.insurer) == 1
    acked = audit_entries(site.hospital, "claim.ack")
    assert len(acked) == 1  # the receipt, signed under Ed25519, verified


@pytest.mark.control("T20")
def test_a_link_algorithm_without_a_key_or_a_partner_certificate_is_refused_at_start(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    ed25519_key(site, "hospital-a")
    add_to_link(site.insurer, 'signature_algorithm = "Ed25519"')
    with pytest.raises(ConfigError) as no_key:
        Controller(load_config(site.insurer))
    assert no_key.value.location == "links.claims-from-hospital-a.signature_algorithm"
    assert "no signing key for Ed25519" in no_key.value.message

    ed25519_key(site, "insurer-b")
    add_signing_key(site.insurer, "insurer-b")
    with pytest.raises(ConfigError) as no_cert:
        Controller(load_config(site.insurer))
    assert no_cert.value.location == "links.claims-from-hospital-a.signature_algorithm"
    assert "partner hospital-a has no Ed25519 signing certificate" in no_cert.value.message

    text = site.insurer.read_text(encoding="utf-8")
    site.insurer.write_text(text.replace('signature_algorithm = "Ed25519"',
                                         'signature_algorithm = "HS256"'), encoding="utf-8")
    check = bridge("serve", "--config", str(site.insurer))
    assert check.returncode != 0
    assert "links[0].signature_algorithm" in check.stderr
    assert "'HS256' is not a signature algorithm" in check.stderr
    assert "Traceback" not in check.stderr


@pytest.mark.control("T20")
def test_everything_sent_to_the_partner_is_signed_under_its_links_algorithm(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    for controller in ("hospital-a", "insurer-b"):
        ed25519_key(site, controller)
    trust_ed25519_of(site.insurer, "hospital-a")
    add_signing_key(site.insurer, "insurer-b")
    add_to_link(site.insurer, 'signature_algorithm = "Ed25519"')
    insurer = Controller(load_config(site.insurer))
    try:
        assert insurer.signer.algorithm == "ES256"  # [signing], for links that name none
        assert insurer.signer_for("claims-from-hospital-a").algorithm == "Ed25519"  # receipts
        assert insurer.signer_for_partner("hospital-a").algorithm == "Ed25519"  # sync answers
        assert insurer.keyring.accepted("hospital-a") == frozenset({"Ed25519"})
    finally:
        insurer.store.close()
    # The compliance report reads the choice from the live configuration.
    from bridge.compliance.report import build_report, evidence_from_tests

    report = build_report(load_config(site.insurer), evidence_from_tests([]))
    t20 = next(row for row in report["items"] if row["id"] == "T20")
    assert t20["status"] == "not met"  # no SM2: the stack cannot offer it
    assert "claims-from-hospital-a: Ed25519" in t20["why"]
