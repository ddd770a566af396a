"""Development PKI: files, permissions, and certificates both verifiers accept."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from bridge.errors import ConfigError
from bridge.trust.pki import (
    DOCUMENT_SIGNING,
    add_controller,
    generate_ca,
    init_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
)

NOW = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)


def test_dev_pki_layout_and_private_key_modes(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path / "certs", ["hospital-a", "insurer-b"], now=NOW)
    written = sorted(
        str(p.relative_to(pki.directory)) for p in pki.directory.rglob("*") if p.is_file()
    )
    assert written == [
        "ca.key",
        "ca.pem",
        "hospital-a/sign.key",
        "hospital-a/sign.pem",
        "hospital-a/tls.key",
        "hospital-a/tls.pem",
        "insurer-b/sign.key",
        "insurer-b/sign.pem",
        "insurer-b/tls.key",
        "insurer-b/tls.pem",
    ]
    for key in pki.directory.rglob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        load_private_key(key)


def test_existing_ca_is_not_replaced_without_force(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path, ["hospital-a"], now=NOW)
    before = pki.ca_cert.read_bytes()
    with pytest.raises(ConfigError) as err:
        init_dev_pki(tmp_path, ["hospital-a"], now=NOW)
    assert err.value.location == str(pki.ca_cert)
    assert pki.ca_cert.read_bytes() == before
    init_dev_pki(tmp_path, ["hospital-a"], now=NOW, force=True)
    assert pki.ca_cert.read_bytes() != before


def test_add_controller_refuses_overwrite_and_chains_to_existing_ca(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path, ["hospital-a"], now=NOW)
    files = add_controller(tmp_path, "platform-c", now=NOW)
    load_certificate(files.tls_cert).verify_directly_issued_by(load_certificate(pki.ca_cert))
    with pytest.raises(ConfigError):
        add_controller(tmp_path, "platform-c", now=NOW)


def test_bad_controller_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        init_dev_pki(tmp_path, ["../escape"], now=NOW)
    assert not (tmp_path / "ca.pem").exists()


def test_tls_certificate_passes_cryptography_server_and_client_verification(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path, ["hospital-a"], now=NOW)
    ca = load_certificate(pki.ca_cert)
    leaf = load_certificate(pki.controllers["hospital-a"].tls_cert)
    builder = PolicyBuilder().store(Store([ca])).time(NOW + timedelta(days=1))
    chain = builder.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    assert chain[-1] == ca
    ip_chain = builder.build_server_verifier(
        x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))
    ).verify(leaf, [])
    assert ip_chain[0] == leaf
    client = builder.build_client_verifier().verify(leaf, [])
    assert "urn:ws-fhir-bridge:partner:hospital-a" in [
        g.value for g in client.subjects or [] if isinstance(g, x509.UniformResourceIdentifier)
    ]


def test_signing_certificate_is_not_a_tls_certificate(tmp_path: Path) -> None:
    pki = init_dev_pki(tmp_path, ["hospital-a"], now=NOW)
    ca = load_certificate(pki.ca_cert)
    sign = load_certificate(pki.controllers["hospital-a"].sign_cert)
    sign.verify_directly_issued_by(ca)
    usage = sign.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    eku = sign.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [DOCUMENT_SIGNING]
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).time(NOW).build_client_verifier().verify(sign, [])


def test_expired_certificate_fails_verification() -> None:
    ca, ca_key = generate_ca("test CA", now=NOW - timedelta(days=400))
    leaf, _ = issue_certificate(
        ca, ca_key, "old", purpose="tls", now=NOW - timedelta(days=400), days=30, partner_id="old"
    )
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([ca])).time(NOW).build_server_verifier(
            x509.DNSName("localhost")
        ).verify(leaf, [])


def test_load_errors_name_the_file_not_the_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as err:
        load_certificate(missing)
    assert err.value.location == str(missing)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("SECRET-CONTENT-1234")
    with pytest.raises(ConfigError) as err2:
        load_private_key(garbage)
    assert err2.value.location == str(garbage)
    assert "SECRET-CONTENT" not in str(err2.value)
