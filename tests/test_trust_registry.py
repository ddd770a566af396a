"""Partner registry: mapping a verified peer certificate to a partner and its links."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bridge.errors import ConfigError, UnknownPartner
from bridge.trust.jws import Signer, sign_bundle, verify_bundle
from bridge.trust.pki import DevPKI, generate_ca, init_dev_pki, issue_certificate, load_certificate
from bridge.trust.registry import Partner, PartnerRegistry
from bridge.trust.tls import certificate_identity, fingerprint_sha256

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(
        tmp_path_factory.mktemp("pki"), ["hospital-a", "insurer-b", "platform-c"], now=NOW
    )


def der(pki: DevPKI, who: str) -> bytes:
    return load_certificate(pki.controllers[who].tls_cert).public_bytes(Encoding.DER)


def hospital(pki: DevPKI, **kw: object) -> Partner:
    args: dict[str, object] = {
        "id": "hospital-a",
        "name": "Hospital A",
        "base_url": "https://localhost:8443/fhir",
        "signing_certificates": (pki.controllers["hospital-a"].sign_cert,),
        "links": {"claims"},
    }
    args.update(kw)
    return Partner(**args)  # type: ignore[arg-type]


def test_identify_by_partner_uri_san(pki: DevPKI) -> None:
    reg = PartnerRegistry([hospital(pki)])
    assert reg.identify(der(pki, "hospital-a"), link="claims").id == "hospital-a"
    assert certificate_identity(der(pki, "hospital-a")).partner_id == "hospital-a"


def test_unregistered_partner_is_unknown(pki: DevPKI) -> None:
    reg = PartnerRegistry([hospital(pki)])
    with pytest.raises(UnknownPartner) as err:
        reg.identify(der(pki, "platform-c"))
    assert err.value.http_status == 401


def test_partner_without_the_link_is_refused(pki: DevPKI) -> None:
    reg = PartnerRegistry([hospital(pki)])
    with pytest.raises(UnknownPartner) as err:
        reg.identify(der(pki, "hospital-a"), link="records-pull")
    assert err.value.location == "link"


def test_pinned_fingerprint_must_match(pki: DevPKI) -> None:
    right = fingerprint_sha256(der(pki, "hospital-a"))
    reg = PartnerRegistry([hospital(pki, tls_fingerprints={right.upper()})])
    assert reg.identify(der(pki, "hospital-a")).id == "hospital-a"
    # A second certificate from the same CA naming hospital-a is not the pinned one.
    ca = load_certificate(pki.ca_cert)
    from bridge.trust.pki import load_private_key

    other, _ = issue_certificate(
        ca,
        load_private_key(pki.ca_key),
        "hospital-a",
        purpose="tls",
        now=NOW,
        partner_id="hospital-a",
    )  # type: ignore[arg-type]
    with pytest.raises(UnknownPartner):
        reg.identify(other.public_bytes(Encoding.DER))


def test_certificate_without_partner_uri(pki: DevPKI) -> None:
    ca, key = generate_ca("ca", now=NOW)
    plain, _ = issue_certificate(ca, key, "hospital-a", purpose="tls", now=NOW)
    plain_der = plain.public_bytes(Encoding.DER)
    with pytest.raises(UnknownPartner):
        PartnerRegistry([hospital(pki)]).identify(plain_der)
    by_fp = PartnerRegistry(
        [hospital(pki, tls_fingerprints={fingerprint_sha256(plain_der)})], identity="fingerprint"
    )
    assert by_fp.identify(plain_der).id == "hospital-a"


def test_fingerprint_mode_refuses_contradicting_san(pki: DevPKI) -> None:
    c_der = der(pki, "platform-c")
    reg = PartnerRegistry(
        [hospital(pki, tls_fingerprints={fingerprint_sha256(c_der)})], identity="fingerprint"
    )
    with pytest.raises(UnknownPartner):
        reg.identify(c_der)
    with pytest.raises(ConfigError):
        PartnerRegistry([hospital(pki)], identity="fingerprint")


def test_garbage_certificate_is_a_trust_error(pki: DevPKI) -> None:
    from bridge.errors import TrustError

    with pytest.raises(TrustError):
        PartnerRegistry([hospital(pki)]).identify(b"\x30\x03garbage")


def test_registry_keyring_verifies_the_partners_signatures(pki: DevPKI) -> None:
    reg = PartnerRegistry([hospital(pki)])
    files = pki.controllers["hospital-a"]
    bundle = {"resourceType": "Bundle", "type": "message", "identifier": {"value": "urn:uuid:1"}}
    signed = sign_bundle(
        bundle,
        Signer.from_files(files.sign_key, files.sign_cert),
        issuer="hospital-a",
        audience="insurer-b",
        message_id="urn:uuid:1",
        now=NOW,
    )
    peer = reg.identify(der(pki, "hospital-a"))
    assert (
        verify_bundle(
            signed, reg.keyring(), expected_issuer=peer.id, expected_audience="insurer-b", now=NOW
        ).issuer
        == "hospital-a"
    )


def test_duplicate_partner_ids_are_a_config_error(pki: DevPKI) -> None:
    with pytest.raises(ConfigError):
        PartnerRegistry([hospital(pki), hospital(pki)])


def test_core_trust_modules_stay_free_of_io_frameworks() -> None:
    # Only bridge.trust.tls may import ssl; nothing in the trust room imports asyncio or aiohttp.
    code = (
        "import sys\n"
        "import bridge.trust.jws, bridge.trust.receipts, bridge.trust.pki\n"
        "import bridge.trust.identity, bridge.trust.registry\n"
        "print(sorted({'asyncio', 'aiohttp', 'ssl'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
