"""The operations port and the log, from outside: ``bridge serve`` subprocesses made by
``bridge init``, read over HTTP and from their stderr as an operator and a log shipper
would."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ops_support import Site, bridge, form_token, http, make_site, serve, wait_for
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_config
from bridge.ledger import open_store


def _outbox(site: Site) -> dict[str, int]:
    run = bridge("outbox", "--config", str(site.hospital), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # type: ignore[no-any-return]


def _samples(site: Site) -> Path:
    return site.root / "hospital-a" / "samples"


def _patient_values(site: Site) -> list[str]:
    record = json.loads((_samples(site) / "claim-1.json").read_text(encoding="utf-8"))
    e = record["elements"]
    return [e["HDSD00.11.110"], e["HDSD00.11.048"]]  # name, resident ID number


def _events(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_json_log_lines_for_retry_dead_letter_requeue_delivery_and_refusals(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path, fast_retries=True)
    samples = _samples(site)
    assert bridge("consent", "add", "--config", str(site.hospital),
                  str(samples / "consent.json")).returncode == 0
    hospital = serve(site.hospital, "--log-format", "json", "--log-level", "info")
    insurer = None
    try:
        # The insurer is not running: the claim is retried, then dead-lettered.
        push = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                      str(samples / "claim-1.json"))
        assert push.returncode == 0, push.stderr
        message_id = push.stdout.split()[0]
        wait_for(lambda: _outbox(site)["dead"] == 1, what="dead letter")

        # A TLS client without a certificate is refused and the refusal logged.
        ctx = ssl.create_default_context(cafile=str(site.root / "pki" / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", site.ports["hospital"])) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            if not tls.recv(1):
                raise ConnectionError("closed")

        # The operator starts the insurer and requeues from the status page.
        insurer = serve(site.insurer)
        status, page = http(site.ops("hospital") + "/")
        assert status == 200 and message_id in page
        body = urllib.parse.urlencode({"message_id": message_id, "token": form_token(page)})
        status, page = http(site.ops("hospital") + "/requeue", data=body.encode())
        assert status == 200 and "requeued" in page
        wait_for(lambda: _outbox(site)["acked"] == 1, what="delivery after requeue")
        wait_for(
            lambda: any(e.get("event") == "delivery" for e in _events(hospital.log_lines())),
            what="delivery line",
        )
    finally:
        hospital.stop()
        if insurer is not None:
            insurer.stop()

    lines = hospital.log_lines()
    assert lines and all(line.startswith("{") for line in lines), lines[:3]
    events = _events(lines)
    by_name: dict[str, list[dict[str, object]]] = {}
    for e in events:
        if "event" in e:
            by_name.setdefault(str(e["event"]), []).append(e)
    for name in ("retry", "dead_letter", "requeue", "delivery"):
        assert by_name.get(name), f"no {name} line in {sorted(by_name)}"
        assert all(e["message_id"] == message_id for e in by_name[name])
        assert all(e["controller"] == "hospital-a" for e in by_name[name])
    assert by_name["dead_letter"][0]["level"] == "warning"
    assert by_name["retry"][0]["code"] == "transport-error"
    assert by_name["delivery"][0]["link"] == "claims-to-insurer-b"
    assert float(by_name["delivery"][0]["seconds"]) > 0  # type: ignore[arg-type]
    refusals = by_name.get("certificate_refusal", [])
    assert refusals and refusals[0]["peer"], by_name.keys()
    # Identities and codes only: nothing of the patient reaches the log.
    text = "\n".join(lines)
    for value in _patient_values(site):
        assert value not in text

    # The requeue is audited, naming the operator's status page.
    with open_store(load_config(site.hospital).store) as store:
        requeues = [e for e in store.audit_entries() if e.record.action == "claim.requeue"]
    assert [e.record.subject for e in requeues] == [message_id]
    assert "status page" in (requeues[0].record.detail or "")


def test_text_log_format_is_one_readable_line_per_event(tmp_path: Path) -> None:
    site = make_site(tmp_path, fast_retries=True)
    samples = _samples(site)
    bridge("consent", "add", "--config", str(site.hospital), str(samples / "consent.json"))
    hospital = serve(site.hospital, "--log-format", "text")
    try:
        bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
               str(samples / "claim-1.json"))
        wait_for(lambda: any(" dead_letter " in line for line in hospital.log_lines()),
                 what="dead letter line")
    finally:
        hospital.stop()
    line = next(line for line in hospital.log_lines() if " dead_letter " in line)
    assert line.split()[1] == "WARNING"
    assert "link=claims-to-insurer-b" in line and "code=transport-error" in line


def test_readyz_names_the_partner_that_cannot_be_reached(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    hospital = serve(site.hospital)
    insurer = None
    try:
        assert http(site.ops("hospital") + "/healthz")[0] == 200
        status, body = http(site.ops("hospital") + "/readyz")
        report = json.loads(body)
        assert status == 503 and report["ready"] is False
        failing = {c["check"] for c in report["checks"] if not c["ok"]}
        assert failing == {"partner:insurer-b"}
        insurer = serve(site.insurer)
        status, body = http(site.ops("hospital") + "/readyz")
        assert status == 200, body
        checks = {c["check"] for c in json.loads(body)["checks"]}
        assert {"store", "certificate:tls", "certificate:signing", "certificate:ca",
                "partner:insurer-b"} <= checks
    finally:
        hospital.stop()
        if insurer is not None:
            insurer.stop()


def test_readyz_fails_thirty_days_before_a_certificate_expires(tmp_path: Path) -> None:
    from bridge.trust.pki import init_dev_pki

    # Certificates issued 810 days ago for 825 days: 15 days left.
    init_dev_pki(tmp_path / "pki", ["hospital-a", "insurer-b", "platform-c"],
                 now=datetime.now(UTC) - timedelta(days=810))
    site = make_site(tmp_path)
    insurer = serve(site.insurer)
    try:
        status, body = http(site.ops("insurer") + "/readyz")
        report = json.loads(body)
        assert status == 503
        tls = next(c for c in report["checks"] if c["check"] == "certificate:tls")
        assert tls["ok"] is False and "within 30 days" in tls["detail"]
        assert 14 <= tls["days_left"] <= 16
        # /metrics says the same in numbers.
        _status, text = http(site.ops("insurer") + "/metrics")
        expiry = {
            s.labels["certificate"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "bridge_certificate_expiry_timestamp_seconds"
            for s in f.samples
        }
        left = expiry["tls"] - datetime.now(UTC).timestamp()
        assert 14 * 86400 < left < 16 * 86400
    finally:
        insurer.stop()


def test_requeue_is_refused_without_the_form_token_or_from_another_host(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    hospital = serve(site.hospital)
    try:
        url = site.ops("hospital") + "/requeue"
        body = urllib.parse.urlencode({"message_id": "urn:uuid:x", "token": "guess"}).encode()
        assert http(url, data=body)[0] == 403
        _s, page = http(site.ops("hospital") + "/")
        good = urllib.parse.urlencode({"message_id": "urn:uuid:x", "token": form_token(page)})
        # A page served from another name (DNS rebinding) does not get to post.
        status, _ = http(url, data=good.encode(), headers={"Host": "evil.example:80"})
        assert status == 403
        # The right token and host: an unknown message is reported on the page.
        status, page = http(url, data=good.encode())
        assert status == 200 and "Requeue refused: unknown-message" in page
    finally:
        hospital.stop()


def test_a_requeue_form_that_cannot_be_read_is_refused_naming_the_form(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    hospital = serve(site.hospital)
    try:
        url = site.ops("hospital") + "/requeue"
        _s, page = http(site.ops("hospital") + "/")
        token = form_token(page).encode()
        boundary = "b0undary"
        multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        file_field = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"message_id\"; "
                      f"filename=\"m.txt\"\r\n\r\nurn:uuid:x\r\n--{boundary}--\r\n").encode()
        for body, headers in [
            (b"message_id=urn%3Auuid%3Ax&token=" + token + b"&note=\xff\xfe", {}),
            (b"\xff", {}),
            (file_field, multipart),
            (b"no boundary here", multipart),
        ]:
            status, answer = http(url, data=body, headers=headers)
            assert status == 400, (status, answer)
            assert answer.startswith("the requeue form is not read"), answer
        # The page still answers, and a form that can be read still is.
        good = urllib.parse.urlencode({"message_id": "urn:uuid:x", "token": token.decode()})
        status, page = http(url, data=good.encode())
        assert status == 200 and "Requeue refused: unknown-message" in page
        assert not [line for line in hospital.log_lines() if "Traceback" in line]
    finally:
        hospital.stop()


def test_the_operations_port_stays_on_loopback_unless_allowed(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    text = site.hospital.read_text(encoding="utf-8")
    site.hospital.write_text(
        text.replace('[operations]                      # /healthz /readyz /metrics and the'
                     ' status page\nhost = "127.0.0.1"',
                     '[operations]\nhost = "0.0.0.0"'),
        encoding="utf-8",
    )
    run = bridge("serve", "--config", str(site.hospital))
    assert run.returncode == 2
    assert "operations.host" in run.stderr and "allow_remote" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
