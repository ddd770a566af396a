"""Operators from outside: certificates made by ``bridge operators issue``, the
operations port of a ``bridge serve`` process over HTTPS, and commands run on the host."""

from __future__ import annotations

import http.client
import re
import ssl
import urllib.parse
from pathlib import Path

import pytest
from compliance_support import append, audit_entries, outbox_states, samples
from ops_support import Site, bridge, make_site, serve, wait_for

from bridge.compliance.operators import host_user

ME = host_user()


def _operators(config: Path, *, me_as: str) -> None:
    """Three people; the host user running the tests holds ``me_as``."""
    append(config, "\n".join([
        "", "[[operators]]", 'name = "vera"', 'role = "viewer"',
        "", "[[operators]]", 'name = "otto"', 'role = "operator"',
        "", "[[operators]]", 'name = "kim"', 'role = "key-admin"',
        "", "[[operators]]", 'name = "me"', f'role = "{me_as}"', f'os_users = ["{ME}"]', "",
    ]))


def _certificate_auth(config: Path, **settings: object) -> None:
    text = config.read_text(encoding="utf-8")
    extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
    config.write_text(text.replace("[operations]", "[operations]\n" + 'auth = "certificate"\n'
                                   + extra, 1), encoding="utf-8")


def _request(site: Site, who: str | None, method: str, path: str, body: str | None = None,
             ) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(site.root / "pki" / "ca.pem"))
    if who is not None:
        ops = site.root / "pki" / "operators"
        ctx.load_cert_chain(ops / f"{who}.pem", ops / f"{who}.key")
    conn = http.client.HTTPSConnection("localhost", site.ports["hospital-ops"], context=ctx,
                                       timeout=15)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8")
    finally:
        conn.close()


def _dead_letter(site: Site) -> str:
    """A claim to an insurer that is not running, dead after its attempts."""
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples(site) / "consent.json")).returncode == 0
    push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                  str(samples(site) / "claim-1.json"))
    assert push.returncode == 0, push.stderr
    hospital = serve(site.hospital)
    try:
        wait_for(lambda: outbox_states(site.hospital).get("dead") == 1, what="dead letter")
    finally:
        hospital.stop()
    return push.stdout.split()[0]


@pytest.mark.battery
@pytest.mark.control("T3", "T4", "T5", "T6", "T12")
def test_a_viewer_certificate_cannot_requeue_and_refusals_lock_an_address_out(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path, fast_retries=True)
    message_id = _dead_letter(site)
    _operators(site.hospital, me_as="key-admin")
    for name, role in (("vera", "viewer"), ("otto", "operator")):
        run = bridge("operators", "issue", "--config", str(site.hospital), name, "--role", role)
        assert run.returncode == 0, run.stderr
    _certificate_auth(site.hospital, max_failed_attempts=3, lockout_seconds=600)
    hospital = serve(site.hospital)
    try:
        assert "operations=https://" in hospital.ready
        status, page = _request(site, "vera", "GET", "/")
        assert status == 200 and message_id in page
        token = re.search(r"name='operator-token' content='([^']+)'", page)
        assert token is not None
        form = urllib.parse.urlencode({"message_id": message_id, "token": token.group(1)})

        status, _ = _request(site, "vera", "POST", "/requeue", form)
        assert status == 403
        assert outbox_states(site.hospital).get("dead") == 1

        status, _ = _request(site, "otto", "POST", "/requeue", form)
        assert status == 303
        wait_for(lambda: outbox_states(site.hospital).get("dead", 0) == 0, what="requeued")

        # No certificate: refused at HTTP, audited; the third refusal locks the address.
        assert _request(site, None, "GET", "/metrics")[0] == 401
        assert _request(site, None, "GET", "/")[0] == 401
        assert _request(site, "otto", "GET", "/")[0] == 429
        assert _request(site, None, "GET", "/healthz")[0] == 200
    finally:
        hospital.stop()

    requeue = audit_entries(site.hospital, "claim.requeue")
    assert [(e.record.subject, e.record.operator) for e in requeue] == [(message_id, "cert:otto")]
    denied = audit_entries(site.hospital, "operator.denied")
    assert [e.record.detail.split("@")[0] for e in denied] == [
        "operator-forbidden", "operator-forbidden", "operator-forbidden"]
    # The viewer's refused requeue names the viewer and the certificate it presented.
    assert denied[0].record.operator == "cert:vera"
    assert str(denied[0].record.digest).startswith("sha256:")
    assert "operators" in str(denied[0].record.detail)
    assert [e.record.operator for e in denied[1:]] == [None, None]
    assert len(audit_entries(site.hospital, "operator.lockout")) == 1
    issued = audit_entries(site.hospital, "operator.issue")
    assert [e.record.operator for e in issued] == [f"os:{ME}", f"os:{ME}"]


@pytest.mark.control("T3", "T5")
def test_a_partner_certificate_or_another_bridges_operator_is_not_an_operator(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    _operators(site.hospital, me_as="key-admin")
    _operators(site.insurer, me_as="key-admin")
    assert bridge("operators", "issue", "--config", str(site.insurer), "otto",
                  "--role", "operator", "--out", str(site.root / "insurer-ops")).returncode == 0
    _certificate_auth(site.hospital)
    hospital = serve(site.hospital)
    try:
        ops = site.root / "pki" / "operators"
        ops.mkdir(parents=True, exist_ok=True)
        # The insurer's otto holds a certificate from the same CA, for another bridge.
        for suffix in ("pem", "key"):
            (ops / f"insurer-otto.{suffix}").write_bytes(
                (site.root / "insurer-ops" / f"otto.{suffix}").read_bytes())
            (ops / f"partner.{suffix}").write_bytes(
                (site.root / "pki" / "insurer-b" / f"tls.{suffix}").read_bytes())
        assert _request(site, "insurer-otto", "GET", "/")[0] == 401
        assert _request(site, "partner", "GET", "/")[0] == 401
    finally:
        hospital.stop()
    details = [e.record.detail for e in audit_entries(site.hospital, "operator.denied")]
    assert len(details) == 2 and all(d.startswith("operator-forbidden@") for d in details)


@pytest.mark.control("T6")
def test_host_users_act_within_their_role_and_duties_stay_separate(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _operators(site.hospital, me_as="key-admin")
    push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                  str(samples(site) / "claim-1.json"))
    assert push.returncode == 2
    assert "operator-forbidden" in push.stderr and "data.import" in push.stderr
    listed = bridge("consent", "list", "--config", str(site.hospital))
    assert listed.returncode == 2 and "consent.read" in listed.stderr
    # Every role may view.
    assert bridge("compliance", "report", "--config", str(site.hospital)).returncode == 0

    # One host user holding key management and data import is refused at load.
    text = site.hospital.read_text(encoding="utf-8")
    site.hospital.write_text(text.replace('name = "otto"\nrole = "operator"\n',
                                          f'name = "otto"\nrole = "operator"\nos_users = ["{ME}"]\n'),
                             encoding="utf-8")
    run = bridge("status", "--config", str(site.hospital))
    assert run.returncode == 2
    assert "§11.7.4.2 a 5" in run.stderr and ME in run.stderr


@pytest.mark.control("T8", "T9")
def test_reads_of_personal_data_are_audited_naming_the_operator(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    _operators(site.hospital, me_as="consent-admin")
    consent = samples(site) / "consent.json"
    assert bridge("consent", "add", "--config", str(site.hospital), str(consent)).returncode == 0
    assert bridge("consent", "list", "--config", str(site.hospital)).returncode == 0
    assert bridge("consent", "show", "--config", str(site.hospital),
                  "sample-consent-1").returncode == 0
    disclosures = bridge("audit", "disclosures", "--config", str(site.hospital), "--patient",
                         "urn:oid:2.16.156.10011.1.3|330108197706081354")
    assert disclosures.returncode == 0, disclosures.stderr
    entries = audit_entries(site.hospital)
    actions = [(e.record.action, e.record.operator) for e in entries]
    assert actions == [("consent.put", f"os:{ME}"), ("consent.list", f"os:{ME}"),
                       ("consent.read", f"os:{ME}"), ("disclosures.read", f"os:{ME}")]
    read = entries[3].record
    assert read.patient is not None and read.patient.startswith("pp:")
    assert entries[2].record.subject == "consent:sample-consent-1"
    verify = bridge("audit", "verify", "--config", str(site.hospital))
    assert verify.returncode == 0, verify.stdout
