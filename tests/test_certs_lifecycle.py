"""Certificate lifecycle from the operator's side: issue with SANs, inspect, revoke with a
CRL that a running ``bridge serve`` loads on SIGHUP, rotate TLS and signing keys (both
signing keys verify while partners list both), and the expiry warning of
``bridge status``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from e2e_support import set_toml_keys

from bridge.conformance.envelope import SigningKey
from bridge.conformance.peer import ConnectionClosed, Peer, TLSOptions, TLSRefused, _context
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki

ROOT = Path(__file__).resolve().parents[1]


def bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, check=False,
                          text=True, cwd=cwd, timeout=60)


def test_issue_with_sans_and_inspect(tmp_path: Path) -> None:
    assert bridge("certs", "init", "pki", "--controllers", "insurer-b", cwd=tmp_path).returncode == 0
    done = bridge("certs", "issue", "pki", "clinic-y", "--dns", "clinic.example",
                  "--ip", "10.0.0.5", "--days", "90", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tls = json.loads(bridge("certs", "inspect", "pki/clinic-y/tls.pem", "--json",
                            cwd=tmp_path).stdout)[0]
    assert tls["partners"] == ["clinic-y"]
    assert tls["dns"] == ["clinic.example"] and tls["ip"] == ["10.0.0.5"]
    assert 88 <= tls["days_left"] <= 90 and not tls["expires_soon"]
    signing = json.loads(bridge("certs", "inspect", "pki/clinic-y/sign.pem", "--json",
                                cwd=tmp_path).stdout)[0]
    assert "content_commitment" in signing["key_usage"] and signing["dns"] == []
    again = bridge("certs", "issue", "pki", "clinic-y", cwd=tmp_path)
    assert again.returncode == 2 and "pki/clinic-y/tls.pem" in again.stderr
    missing = bridge("certs", "issue", "nowhere", "clinic-y", cwd=tmp_path)
    assert missing.returncode != 0 and "nowhere/ca.pem" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``bridge serve`` (the insurer) with a CRL, as its own process."""
    init_dev_pki(tmp_path / "pki", ["hospital-a", "insurer-b"],
                 now=datetime.now(UTC) - timedelta(days=1))
    assert bridge("certs", "crl", "pki", cwd=tmp_path).returncode == 0
    _, insurer_cfg = write_configs(tmp_path, free_port(), free_port())
    set_toml_keys(insurer_cfg, "tls", {"crl": "pki/crl.pem"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        port = re.search(r"port=(\d+)", proc.stdout.readline())
        assert port
        yield {"root": tmp_path, "port": int(port.group(1)), "proc": proc}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _peer(root: Path, port: int, **tls: Any) -> Peer:
    pki = root / "pki"
    options: dict[str, Any] = {
        "ca": pki / "ca.pem", "cert": pki / "hospital-a" / "tls.pem",
        "key": pki / "hospital-a" / "tls.key", "server_name": "127.0.0.1",
        "expected_server_partner": "insurer-b", "timeout": 5.0,
    }
    options.update(tls)
    return Peer(
        base_url=f"https://127.0.0.1:{port}/fhir", partner_id="hospital-a",
        receiver_id="insurer-b", tls=TLSOptions(**options),
        signing_key=SigningKey.from_files(pki / "hospital-a" / "sign.key",
                                          pki / "hospital-a" / "sign.pem"),
    )


def _status(peer: Peer) -> str:
    try:
        with peer.connect() as conn:
            return str(peer.get(conn, "metadata").status)
    except (TLSRefused, ConnectionClosed) as exc:
        return f"refused {exc}"


def _until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_revocation_and_rotation_take_effect_on_sighup(served: dict[str, Any]) -> None:
    root, port, proc = served["root"], served["port"], served["proc"]
    peer = _peer(root, port, min_version="1.2", max_version="1.2")
    assert _status(peer) == "200"
    open_conn = peer.connect()
    assert peer.get(open_conn, "metadata").status == 200
    first_server_cert = open_conn.server_certificate
    assert first_server_cert is not None

    done = bridge("certs", "revoke", "pki", "pki/hospital-a/tls.pem", cwd=root)
    assert done.returncode == 0, done.stderr
    assert _status(peer) == "200"  # not before the bridge is told
    os.kill(proc.pid, signal.SIGHUP)
    assert _until(lambda: _status(peer).startswith("refused")), "revoked certificate served"
    # A connection opened before the revocation is refused on its next request.
    response = peer.get(open_conn, "metadata")
    assert response.status == 401 and response.outcome is not None
    assert response.outcome.code == "certificate-rejected"
    open_conn.close()

    # A new TLS certificate for the hospital works at once (it is not on the CRL).
    assert bridge("certs", "rotate", "pki", "hospital-a", "tls", cwd=root).returncode == 0
    _context.cache_clear()  # the peer keeps one OpenSSL context per set of options
    assert _status(peer) == "200"

    # The insurer's own TLS certificate, rotated: served after SIGHUP, without a restart.
    assert bridge("certs", "rotate", "pki", "insurer-b", "tls", cwd=root).returncode == 0
    os.kill(proc.pid, signal.SIGHUP)

    def serial() -> int | None:
        with peer.connect() as conn:
            cert = conn.server_certificate
        assert cert is not None
        changed = cert.serial_number != first_server_cert.serial_number
        return cert.serial_number if changed else None

    new_serial = _until(serial)
    assert new_serial == x509.load_pem_x509_certificate(
        (root / "pki" / "insurer-b" / "tls.pem").read_bytes()).serial_number
    assert proc.poll() is None


async def test_signing_rotation_overlap_both_keys_verify(tmp_path: Path) -> None:
    from e2e_support import start_pair
    from peer_support import call, make_peer

    pair = await start_pair(tmp_path, start_dispatch=False)
    await pair.stop()
    pki = tmp_path / "pki"
    old_key = SigningKey.from_files(pki / "hospital-a" / "sign.key", pki / "hospital-a" / "sign.pem")
    done = bridge("certs", "rotate", "pki", "hospital-a", "signing", cwd=tmp_path)
    assert done.returncode == 0 and "Overlap" in done.stdout
    previous = f"pki/hospital-a/sign.{old_key.certificate.serial_number:x}.pem"
    assert (tmp_path / previous).is_file()
    new_key = SigningKey.from_files(pki / "hospital-a" / "sign.key", pki / "hospital-a" / "sign.pem")
    assert new_key.kid != old_key.kid

    async def answers(signing_certs: list[str]) -> tuple[int, int]:
        cfg = tmp_path / "insurer.toml"
        text = cfg.read_text(encoding="utf-8")
        text = re.sub(r'signing_certs = \[[^\]]*"pki/hospital-a/[^\]]*\]',
                      "signing_certs = [" + ", ".join(f'"{p}"' for p in signing_certs) + "]",
                      text)
        cfg.write_text(text, encoding="utf-8")
        from bridge.config import load_config
        from bridge.link.node import Controller
        from bridge.link.service import BridgeService

        insurer = BridgeService(Controller(load_config(cfg)), poll_interval=0.05)
        await insurer.start()
        pair.insurer = insurer
        try:
            results = []
            for key in (old_key, new_key):
                peer = make_peer(pair)
                peer.signing_key = key
                answer = await call(peer.send, peer.signed_claim())
                results.append(answer.status)
            return results[0], results[1]
        finally:
            await insurer.stop()

    # During the overlap the insurer lists both certificates: both keys verify.
    assert await answers([previous, "pki/hospital-a/sign.pem"]) == (200, 200)
    # After it, only the new one: the old key's signatures are refused.
    assert await answers(["pki/hospital-a/sign.pem"]) == (403, 200)


def test_status_warns_30_days_before_a_certificate_expires(tmp_path: Path) -> None:
    init_dev_pki(tmp_path / "pki", ["hospital-a", "insurer-b"])
    _, insurer_cfg = write_configs(tmp_path, free_port(), free_port())
    from bridge.config import load_config
    from bridge.ledger import open_store

    with open_store(load_config(insurer_cfg).store):
        pass
    calm = bridge("status", "--config", str(insurer_cfg), "--json", cwd=tmp_path)
    assert calm.returncode == 0, calm.stdout + calm.stderr
    assert all(c["ok"] for c in json.loads(calm.stdout)["certificates"])
    assert bridge("certs", "issue", "pki", "insurer-b", "--tls-only", "--days", "20", "--force",
                  cwd=tmp_path).returncode == 0
    warned = bridge("status", "--config", str(insurer_cfg), cwd=tmp_path)
    assert warned.returncode == 1
    assert re.search(r"certificate tls \(.*insurer-b/tls.pem\): expires in (19|20) days",
                     warned.stdout), warned.stdout


async def test_outbound_connections_present_a_rotated_certificate_after_reload(
    tmp_path: Path,
) -> None:
    """The dispatcher's TLS certificate is rotated while a claim is being retried: after
    ``reload_certificates`` (what SIGHUP runs) the retries present the new one."""
    import asyncio

    from e2e_support import LINK_OUT, consent_for
    from peer_support import call

    from bridge.config import load_config
    from bridge.conformance.sender_role import KitReceiver, ReceiverConfig
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.samples import inpatient_records
    from bridge.trust.lifecycle import rotate

    init_dev_pki(tmp_path / "pki", ["hospital-a", "insurer-b"])
    port = free_port()
    hospital_cfg, _ = write_configs(tmp_path, free_port(), port)
    text = hospital_cfg.read_text(encoding="utf-8")
    hospital_cfg.write_text(text.replace(
        'purpose = "HPAYMT"\n', 'purpose = "HPAYMT"\nrequest_timeout_seconds = 1.0\n'
        "retry_base_seconds = 0.3\nretry_cap_seconds = 0.6\n", 1), encoding="utf-8")
    pki = tmp_path / "pki"
    receiver = KitReceiver(ReceiverConfig(
        cert=pki / "insurer-b" / "tls.pem", key=pki / "insurer-b" / "tls.key", ca=pki / "ca.pem",
        signing_key=pki / "insurer-b" / "sign.key", signing_cert=pki / "insurer-b" / "sign.pem",
        sender_signing_cert=pki / "hospital-a" / "sign.pem", port=port, stall=1.5,
    ))
    receiver.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        record = inpatient_records(1, seed=8)[0]
        await hospital.controller.put_consent(consent_for(record))
        await hospital.submit(record, LINK_OUT)
        arrivals = receiver.observation.arrivals
        await call(_until, lambda: len(arrivals) >= 1)
        old = arrivals[0].fingerprint
        rotate(pki, "hospital-a", "tls", now=datetime.now(UTC))
        hospital.reload_certificates()
        seen = len(arrivals)
        await call(_until, lambda: len(arrivals) >= seen + 2, 15.0)
        await asyncio.sleep(0)
    finally:
        await hospital.stop()
        receiver.stop()
    new = x509.load_pem_x509_certificate((pki / "hospital-a" / "tls.pem").read_bytes())
    from cryptography.hazmat.primitives import serialization

    new_fp = hashlib.sha256(new.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert old != new_fp
    assert [a.fingerprint for a in arrivals[seen + 1:]] and all(
        a.fingerprint == new_fp for a in arrivals[seen + 1:]
    ), [(a.answer, a.fingerprint[:8]) for a in arrivals]
