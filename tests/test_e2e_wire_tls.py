"""TLS from outside: session resumption, per-request certificate validity, key-exchange
groups, slow headers, and how handshakes that fail are recorded.

The peer is pyOpenSSL (its own OpenSSL build), so versions, groups and stored sessions
are chosen exactly; the bridge runs in the test's event loop on a real socket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from e2e_support import Pair, set_toml_keys, start_pair
from peer_support import (
    audit_head,
    audit_of,
    call,
    issue_tls_certificate,
    make_peer,
    stored,
    wait_for_audit,
)

from bridge.config import load_config
from bridge.conformance.peer import ConnectionClosed, Peer, TLSRefused
from bridge.ledger.sqlite import SQLiteStore
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.trust.pki import (
    init_dev_pki,
    issue_crl,
    load_certificate,
    load_private_key,
)


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield p
    finally:
        await p.stop()


def _fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _short_lived_peer(pair: Pair, tmp_path: Path, seconds: float) -> tuple[Peer, x509.Certificate]:
    """The hospital's peer with a TLS certificate that expires ``seconds`` from now."""
    cert_file, key_file, cert = issue_tls_certificate(
        pair.root / "pki",
        tmp_path / "short",
        "hospital-a",
        issued_at=datetime.now(UTC) + timedelta(seconds=seconds),
        days=0,
    )
    return make_peer(pair, cert=cert_file, key=key_file, min_version="1.2", max_version="1.2"), cert


async def _sleep_past(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 1.2)


# --- resumption and per-request validity --------------------------------------------------


async def test_no_tls12_session_is_resumed(pair: Pair) -> None:
    peer = make_peer(pair, min_version="1.2", max_version="1.2")

    def twice() -> tuple[bool, bool, int]:
        with peer.connect() as first:
            assert peer.get(first, "metadata").status == 200
            session = first.session
        with peer.connect(session=session) as second:
            return first.session_reused, second.session_reused, peer.get(second, "metadata").status

    first_reused, second_reused, status = await call(twice)
    assert status == 200
    assert not first_reused
    assert not second_reused, "the server resumed a TLS 1.2 session (ticket or session id)"


async def test_resumed_session_after_the_certificate_expired_delivers_nothing(
    pair: Pair, tmp_path: Path
) -> None:
    peer, cert = _short_lived_peer(pair, tmp_path, seconds=3)
    with await call(peer.connect) as conn:
        assert (await call(peer.get, conn, "metadata")).status == 200
        session = conn.session
    await _sleep_past(cert.not_valid_after_utc)
    before = await audit_head(pair)
    message = peer.signed_claim()

    def resume_and_send() -> int | str:
        try:
            with peer.connect(session=session) as again:
                return peer.post_message(again, message).response.status
        except (TLSRefused, ConnectionClosed) as exc:
            return type(exc).__name__

    outcome = await call(resume_and_send)
    assert outcome != 200
    assert not await stored(pair, message["identifier"]["value"])
    refusals = await wait_for_audit(pair, "tls.refused", since=before)
    assert refusals, "the refused certificate must be audited"
    assert refusals[-1].record.detail == "certificate-expired"
    assert refusals[-1].record.digest == _fingerprint(cert)


async def test_a_connection_outliving_its_certificate_is_refused(
    pair: Pair, tmp_path: Path
) -> None:
    peer, cert = _short_lived_peer(pair, tmp_path, seconds=3)
    conn = await call(peer.connect)
    try:
        assert (await call(peer.get, conn, "metadata")).status == 200
        await _sleep_past(cert.not_valid_after_utc)
        before = await audit_head(pair)
        message = peer.signed_claim()
        answer = await call(peer.post_message, conn, message)
    finally:
        conn.close()
    assert (answer.status, answer.code) == (401, "certificate-rejected")
    assert answer.outcome and answer.outcome.expression == ("TLS.client-certificate",)
    assert answer.response.header("Connection") == "close"
    assert not await stored(pair, message["identifier"]["value"])
    rows = await audit_of(pair, "message.reject", since=before)
    assert rows and rows[-1].record.detail == "certificate-rejected@TLS.client-certificate"


# --- key-exchange groups ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "groups"),
    [
        ("1.3", "P-521"),
        ("1.3", "X448"),
        ("1.3", "ffdhe2048"),
        ("1.3", "P-521:X448:ffdhe2048:ffdhe3072"),
        ("1.2", "P-521"),
    ],
)
async def test_groups_outside_mozilla_intermediate_are_refused(
    pair: Pair, version: str, groups: str
) -> None:
    peer = make_peer(pair, min_version=version, max_version=version, groups=groups)

    def attempt() -> str:
        try:
            with peer.connect() as conn:
                return f"negotiated {conn.group} and answered {peer.get(conn, 'metadata').status}"
        except (TLSRefused, ConnectionClosed) as exc:
            return f"refused: {exc}"

    result = await call(attempt)
    assert result.startswith("refused"), result


_NAMES = {
    "P-256": {"prime256v1", "secp256r1", "P-256"},
    "P-384": {"secp384r1", "P-384"},
    "X25519": {"x25519", "X25519"},
}


@pytest.mark.parametrize(
    ("version", "offered", "expected"),
    [
        ("1.3", "X25519", "X25519"),
        ("1.3", "P-256", "P-256"),
        ("1.3", "P-384", "P-384"),
        ("1.2", "P-256", "P-256"),
        # An excluded group offered first is passed over for an allowed one.
        ("1.3", "P-521:X448:P-384", "P-384"),
        ("1.2", "P-521:P-256", "P-256"),
    ],
)
async def test_only_intermediate_groups_are_negotiated(
    pair: Pair, version: str, offered: str, expected: str
) -> None:
    peer = make_peer(pair, min_version=version, max_version=version, groups=offered)

    def attempt() -> tuple[str | None, int]:
        with peer.connect() as conn:
            return conn.group, peer.get(conn, "metadata").status

    negotiated, status = await call(attempt)
    assert status == 200
    assert negotiated in _NAMES[expected], negotiated


# --- slow requests -----------------------------------------------------------------------


async def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    pair = await start_pair(
        tmp_path, start_dispatch=False, insurer_config={"server": {"header_timeout_seconds": 1.0}}
    )
    try:
        peer = make_peer(pair)

        def trickle() -> tuple[bool, float]:
            started = time.monotonic()
            with peer.connect() as conn:
                conn.send_raw(b"POST /fhir/$process-message HTTP/1.1\r\nHost: x\r\n")
                for _ in range(40):  # one header byte every 0.1 s, never finishing
                    try:
                        conn.send_raw(b"X")
                    except (TLSRefused, ConnectionClosed):
                        return True, time.monotonic() - started
                    if conn.wait_closed(0.1):
                        return True, time.monotonic() - started
                return False, time.monotonic() - started

        closed, elapsed = await call(trickle)
        assert closed, "a request whose headers never complete kept its connection"
        assert elapsed < 3.0
        # A prompt request on a fresh connection is still served.
        with await call(peer.connect) as conn:
            assert (await call(peer.get, conn, "metadata")).status == 200
    finally:
        await pair.stop()


# --- how failed handshakes are recorded -------------------------------------------------


_CLIENT_HELLO_THEN_WAIT = r"""
import socket, ssl, sys, time
ctx = ssl.create_default_context()
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(outgoing.read())
print("sent", flush=True)
time.sleep(60)
"""


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def test_connections_that_stall_or_drop_are_counted_not_refused(tmp_path: Path) -> None:
    pair = await start_pair(
        tmp_path,
        start_dispatch=False,
        insurer_config={"server": {"handshake_timeout_seconds": 0.5}},
    )
    port = pair.insurer.port
    assert port is not None
    hello = _client_hello()
    try:
        def connect_and_go(n: int) -> None:
            for _ in range(n):
                with socket.create_connection(("127.0.0.1", port)):
                    pass

        def half_hello_then_stall(n: int) -> None:
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            for s in socks:
                s.sendall(hello[:20])
            time.sleep(1.5)  # past the handshake timeout
            for s in socks:
                s.close()

        await call(connect_and_go, 40)
        await call(half_hello_then_stall, 6)
        # A sender killed in the middle of its handshake.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT_HELLO_THEN_WAIT, str(port),
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip() == b"sent"
        await asyncio.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
        await asyncio.sleep(0.3)
        # The listener still serves.
        peer = make_peer(pair)
        with await call(peer.connect) as conn:
            assert (await call(peer.get, conn, "metadata")).status == 200
    finally:
        await pair.stop()
    with SQLiteStore(Path(pair.insurer.controller.config.store.path)) as store:
        entries = store.audit_entries()
        assert store.verify_audit().ok
    assert [e for e in entries if e.record.action == "tls.refused"] == []
    incomplete = [e.record for e in entries if e.record.action == "tls.incomplete"]
    assert 1 <= len(incomplete) <= 2, [r.detail for r in incomplete]
    counts: dict[str, int] = {}
    for record in incomplete:
        for part in (record.detail or "").split():
            key, _, value = part.partition("=")
            counts[key] = counts.get(key, 0) + int(value)
    assert counts.get("stalled") == 6
    assert counts.get("dropped") == 41


async def test_refused_certificates_are_recorded_with_reason_and_fingerprint(
    tmp_path: Path,
) -> None:
    root = tmp_path / "bridges"
    pair = await start_pair(root, start_dispatch=False)
    await pair.stop()
    pki = root / "pki"
    now = datetime.now(UTC)
    certs: dict[tuple[str, str], tuple[Path, Path, x509.Certificate]] = {}
    for version in ("1.2", "1.3"):
        out = tmp_path / f"certs-{version}"
        certs[version, "revoked"] = issue_tls_certificate(pki, out, "hospital-a", name="revoked")
        certs[version, "expired"] = issue_tls_certificate(
            pki, out, "hospital-a", issued_at=now - timedelta(days=400), name="expired"
        )
        certs[version, "early"] = issue_tls_certificate(
            pki, out, "hospital-a", issued_at=now + timedelta(days=2), name="early"
        )
        other = init_dev_pki(out / "other-ca", ["hospital-a"]).controllers["hospital-a"]
        certs[version, "other"] = (
            other.tls_cert,
            other.tls_key,
            x509.load_pem_x509_certificate(other.tls_cert.read_bytes()),
        )
    ca_cert, ca_key = load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key")
    revoked_serials = [certs[v, "revoked"][2].serial_number for v in ("1.2", "1.3")]
    crl = issue_crl(ca_cert, ca_key, revoked_serials, now=now)  # type: ignore[arg-type]
    (pki / "crl.pem").write_bytes(crl.public_bytes(Encoding.PEM))

    pair = await _restart_with_crl(root)
    try:
        for version in ("1.2", "1.3"):
            cases = [
                ("certificate-expired", "expired"),
                ("certificate-not-yet-valid", "early"),
                ("certificate-revoked", "revoked"),
                ("unknown-ca", "other"),
                ("no-certificate", None),
            ]
            for reason, which in cases:
                before = await audit_head(pair)
                if which is None:
                    files: dict[str, Any] = {"cert": None, "key": None}
                    expected = [(reason, None)] if version == "1.2" else []
                else:
                    cert_file, key_file, cert = certs[version, which]
                    files = {"cert": cert_file, "key": key_file}
                    expected = [(reason, _fingerprint(cert))]
                peer = make_peer(pair, min_version=version, max_version=version, **files)

                def attempt(peer: Peer = peer) -> str:
                    try:
                        with peer.connect() as conn:
                            return str(peer.get(conn, "metadata").status)
                    except (TLSRefused, ConnectionClosed) as exc:
                        return f"refused: {exc}"

                assert (await call(attempt)).startswith("refused"), (version, reason)
                rows = await wait_for_audit(
                    pair, "tls.refused", since=before, timeout=5.0 if expected else 0.5
                )
                assert [(r.record.detail, r.record.digest) for r in rows] == expected, (
                    version,
                    reason,
                )
    finally:
        await pair.stop()
    # The same refusal again within the window is counted, not written again.
    with SQLiteStore(Path(pair.insurer.controller.config.store.path)) as store:
        details = [e.record.detail for e in store.audit_entries() if e.record.action == "tls.refused"]
    assert "no-certificate repeated=1" in details


async def _restart_with_crl(root: Path) -> Pair:
    insurer_cfg = root / "insurer.toml"
    set_toml_keys(insurer_cfg, "tls", {"crl": "pki/crl.pem"})
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(root / "hospital.toml")), poll_interval=0.05)
    return Pair(root, root / "hospital.toml", insurer_cfg, hospital, insurer)

