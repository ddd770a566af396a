"""Hostile and broken TLS clients against a real ``bridge serve`` process, on uvloop
and on the standard library's loop: bytes that are not TLS, garbage after a ClientHello, a
reset mid-handshake, a ClientHello sent a byte at a time. Every such connection is
closed, the handshake timeout holds, the failures are in the audit trail, and the
listener keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ops_support import serve
from peer_support import call, issue_tls_certificate
from test_e2e_batch import _insurer, _peer
from test_e2e_batch_hostile import _audit

from bridge.conformance.peer import ConnectionClosed, TLSRefused
from bridge.trust.pki import init_dev_pki


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes (or resets) the connection within ``seconds``."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _attacks(port: int) -> dict[str, bool]:
    hello = _client_hello()
    closed: dict[str, bool] = {}

    def conn() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    with conn() as s:  # plain HTTP to a TLS port
        s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        closed["plaintext"] = _closed_within(s, 5)
    with conn() as s:  # garbage first
        s.sendall(b"\x00" * 64 + hello)
        closed["garbage-before"] = _closed_within(s, 5)
    with conn() as s:  # a ClientHello followed by garbage
        s.sendall(hello + b"\x17\x03\x03\x00\x10" + b"\xff" * 16 + b"junk" * 100)
        closed["garbage-after"] = _closed_within(s, 5)
    with conn() as s:  # a full ClientHello, then silence: the handshake times out
        s.sendall(hello)
        closed["silent-after-hello"] = _closed_within(s, 5)
    s = conn()  # reset in the middle of the ClientHello
    s.sendall(hello[: len(hello) // 2])
    time.sleep(0.05)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    closed["reset"] = True
    with conn() as s:  # slowloris: the ClientHello a byte every 0.1 s, for 3 s
        gone = False
        for byte in hello[:30]:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                gone = True
                break
            time.sleep(0.1)
        closed["slowloris"] = gone or _closed_within(s, 0.5)
    return closed


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_hostile_handshakes_are_closed_audited_and_the_listener_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    monkeypatch.setenv("BRIDGE_EVENT_LOOP", loop)
    _, insurer_cfg = _insurer(tmp_path, handshake_timeout_seconds=0.5)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    port = int(_peer(tmp_path, insurer_cfg).base_url.split(":")[2].split("/")[0])
    try:
        closed = await asyncio.to_thread(_attacks, port)
        assert all(closed.values()), closed
        peer = _peer(tmp_path, insurer_cfg)
        # Client certificates the handshake refuses: expired, and from another CA.
        expired, expired_key, _ = issue_tls_certificate(
            tmp_path / "pki", tmp_path / "expired", "hospital-a",
            issued_at=datetime.now(UTC) - timedelta(days=40), days=30)
        init_dev_pki(tmp_path / "other-pki", ["hospital-a"], now=datetime.now(UTC))
        other = tmp_path / "other-pki" / "hospital-a"
        for cert, key in ((expired, expired_key), (other / "tls.pem", other / "tls.key")):
            bad = dataclasses.replace(peer, tls=dataclasses.replace(peer.tls, cert=cert, key=key))
            with pytest.raises((TLSRefused, ConnectionClosed)), await call(bad.connect) as conn:
                await call(bad.get, conn, "metadata")
        with await call(peer.connect) as conn:
            assert (await call(peer.get, conn, "metadata")).status == 200
        assert insurer.proc.poll() is None
    finally:
        await asyncio.to_thread(insurer.stop)
    tls = [a for a in _audit(store) if a[0].startswith("tls.")]
    # Each connection is accounted for: the two that were not TLS and the garbage
    # after a ClientHello refused, the silent one and the slowloris stalled, the reset
    # one dropped.
    refused = [a[2] for a in tls if a[0] == "tls.refused"]
    assert sorted(refused) == sorted(
        ["not-tls", "not-tls repeated=1", "decryption-failed-or-bad-record-mac",
         "certificate-expired", "unknown-ca"]), tls
    counts: dict[str, int] = {}
    for action, _, detail in tls:
        if action == "tls.incomplete":
            for part in (detail or "").split():
                key, _, value = part.partition("=")
                counts[key] = counts.get(key, 0) + int(value)
    assert counts.get("stalled") == 2 and counts.get("dropped") == 1, tls
    log = insurer.log_lines()
    assert not [line for line in log if "Traceback" in line]
    assert [line for line in log if f"event loop: {loop}" in line], log[:5]
