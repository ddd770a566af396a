"""Every certificate the controller uses is watched for expiry, from outside: ``bridge
serve`` with certificates beyond the TLS pair (a further signing key, the operator CA,
a hand-off destination's CA and client certificate) that expire within 30 days, read
through /readyz, the status page and ``bridge status``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from compliance_support import append
from ops_support import bridge, http, make_site, serve

from bridge.trust.pki import (
    certificate_pem,
    generate_ca,
    issue_certificate,
    load_certificate,
    load_private_key,
    private_key_pem,
)

SHORT = {
    "signing.keys[0]": 10,
    "operator-ca": 20,
    "handoff:claims-system:ca": 12,
    "handoff:claims-system:client": 25,
}


def _write(folder: Path, name: str, cert: object, key: object) -> tuple[Path, Path]:
    pem, secret = folder / f"{name}.pem", folder / f"{name}.key"
    pem.write_bytes(certificate_pem(cert))  # type: ignore[arg-type]
    secret.write_bytes(private_key_pem(key))  # type: ignore[arg-type]
    secret.chmod(0o600)
    return pem, secret


def short_lived(root: Path) -> None:
    """Certificates for the insurer that expire within 30 days, written into its config."""
    now = datetime.now(UTC)
    pki, own = root / "pki", root / "pki" / "insurer-b"
    ca, ca_key = load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key")
    sign, sign_key = issue_certificate(ca, ca_key, "insurer-b signing (Ed25519)",  # type: ignore[arg-type]
                                       purpose="signing", now=now, partner_id="insurer-b",
                                       key_algorithm="Ed25519", days=SHORT["signing.keys[0]"])
    _write(own, "sign-ed25519", sign, sign_key)
    operator_ca, operator_key = generate_ca("operators", now=now, days=SHORT["operator-ca"])
    _write(own, "operator-ca", operator_ca, operator_key)
    claims_ca, claims_ca_key = generate_ca("claims system", now=now,
                                           days=SHORT["handoff:claims-system:ca"])
    _write(own, "claims-ca", claims_ca, claims_ca_key)
    client, client_key = issue_certificate(ca, ca_key, "insurer-b to claims system",  # type: ignore[arg-type]
                                           purpose="tls", now=now,
                                           days=SHORT["handoff:claims-system:client"])
    _write(own, "claims-client", client, client_key)
    config = root / "insurer.toml"
    text = config.read_text(encoding="utf-8")
    text = text.replace("[operations]", '[operations]\noperator_ca = "pki/insurer-b/operator-ca.pem"',
                        1)
    config.write_text(text, encoding="utf-8")
    append(config, "\n[[signing.keys]]\n"
                   'cert = "pki/insurer-b/sign-ed25519.pem"\n'
                   'key = "pki/insurer-b/sign-ed25519.key"\n'
                   "\n[[handoff]]\n"
                   'id = "claims-system"\n'
                   'kind = "http"\n'
                   'url = "https://127.0.0.1:9/intake"\n'
                   'ca = "pki/insurer-b/claims-ca.pem"\n'
                   'client_cert = "pki/insurer-b/claims-client.pem"\n'
                   'client_key = "pki/insurer-b/claims-client.key"\n')


def test_every_certificate_the_controller_uses_is_reported_within_thirty_days(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    short_lived(tmp_path)
    insurer = serve(site.insurer)
    try:
        status, body = http(site.ops("insurer") + "/readyz")
        assert status == 503
        checks = {c["check"]: c for c in json.loads(body)["checks"]}
        for name, days in SHORT.items():
            check = checks[f"certificate:{name}"]
            assert check["ok"] is False and "within 30 days" in check["detail"], check
            assert days - 1 <= check["days_left"] <= days
        # The long-lived ones are still fine and still listed.
        for name in ("tls", "signing", "ca", "partner:hospital-a:signing"):
            assert checks[f"certificate:{name}"]["ok"] is True
        _status, page = http(site.ops("insurer") + "/")
        for name, days in SHORT.items():
            row = page.split(f"<tr data-certificate='{name}'>", 1)[1].split("</tr>", 1)[0]
            assert f"expires in {days - 1} days" in row or f"expires in {days} days" in row, row
    finally:
        insurer.stop()

    run = bridge("status", "--config", str(site.insurer), "--json")
    assert run.returncode == 1, run.stderr  # something needs attention
    report = json.loads(run.stdout)
    assert report["attention"] is True
    listed = {c["certificate"]: c for c in report["certificates"]}
    for name in SHORT:
        assert listed[name]["ok"] is False and "within 30 days" in listed[name]["detail"]
    assert listed["tls"]["ok"] is True
    text = bridge("status", "--config", str(site.insurer))
    for name, days in SHORT.items():
        line = next(x for x in text.stdout.splitlines() if f"certificate {name} (" in x)
        assert f"expires in {days - 1} days" in line, line
    assert "certificate tls (" not in text.stdout  # only what needs attention is printed
