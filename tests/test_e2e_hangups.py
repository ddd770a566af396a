"""Partners that hang up in the middle of a request body, against a real ``bridge serve``
process on uvloop and on the standard library's loop.

A client may send a request head and part of its body and then close the connection,
at any moment relative to the TLS handshake and to the receiver starting on the
request. Such a request holds nothing: the bridge stops promptly (well within the body
timeout, here 30 s), nothing is audited or stored for it, and it keeps serving. A slow
client that is still connected keeps its whole body timeout. The operations port over
HTTPS, behind the same TLS listener, holds nothing for an operator's client that leaves
mid-form either.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from compliance_support import audit_entries
from e2e_support import client_ssl
from leaving_support import WAYS, leave
from ops_support import Serve, bridge, make_site, serve
from peer_support import call
from reliability_support import inbox_ids
from test_compliance_operators import _certificate_auth, _operators
from test_e2e_batch import _insurer, _peer

_HANG_UPS_PER_KIND = 4
_PAUSES = (0.0, 0.05)


def _head(length: int) -> bytes:
    return (b"POST /fhir/$process-message HTTP/1.1\r\nHost: insurer-b\r\n"
            b"Content-Type: application/fhir+json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def _hang_up(port: int, ctx: ssl.SSLContext, way: str, pause: float,
             start: threading.Barrier) -> None:
    """Send a head announcing 1000 bytes and 11 of them, ``pause`` seconds after the
    handshake (0: at once, racing the receiver taking the connection over), then go
    away ``way``: a close without TLS close_notify, one with it, or a TCP reset."""
    start.wait()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    time.sleep(pause)
    tls.sendall(_head(1000) + b'{"resource')
    leave(tls, way)


def _hang_ups(port: int, pki: Path) -> None:
    ctx = client_ssl(pki.parent, "hospital-a")
    clients = [(way, pause) for way in WAYS for pause in _PAUSES
               for _ in range(_HANG_UPS_PER_KIND)]
    start = threading.Barrier(len(clients))
    threads = [threading.Thread(target=_hang_up, args=(port, ctx, way, pause, start))
               for way, pause in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _stop_seconds(insurer: Serve) -> float:
    """Seconds from SIGTERM to the process's exit (killed after 60 s)."""
    started = time.monotonic()
    insurer.proc.terminate()
    try:
        insurer.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        insurer.proc.kill()
        insurer.proc.wait()
    return time.monotonic() - started


def _audit_actions(store: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return con.execute("SELECT action, subject FROM audit ORDER BY seq").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_clients_hanging_up_mid_body_hold_nothing_and_leave_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    monkeypatch.setenv("BRIDGE_EVENT_LOOP", loop)
    _, insurer_cfg = _insurer(tmp_path, body_timeout_seconds=30)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    peer = _peer(tmp_path, insurer_cfg)
    try:
        before = _audit_actions(store)
        await call(_hang_ups, peer.port, tmp_path / "pki")
        # The listener still serves the same partner.
        with await call(peer.connect) as conn:
            assert (await call(peer.get, conn, "metadata")).status == 200
        await asyncio.sleep(0.5)
        assert insurer.proc.poll() is None
    finally:
        took = await asyncio.to_thread(_stop_seconds, insurer)
    # Stopping waits for requests in hand; none is held by a client that went away
    # (each would otherwise hold its handler for the 30 s body timeout).
    assert took < 10, f"bridge serve took {took:.1f} s to stop"
    assert insurer.proc.returncode == 0
    # Nothing recorded about them: no refusal, timeout or failure, no inbox row.
    new = _audit_actions(store)[len(before):]
    assert new == [], new
    assert inbox_ids(store) == []
    assert _troubled(insurer.log_lines()) == []


def _troubled(log: list[str]) -> list[str]:
    """Log lines at warning level or above, or carrying a traceback (the text format
    writes an exception as ``[Type at frame < frame]``, never as ``Traceback``)."""
    return [line for line in log
            if re.match(r"\S+ (WARNING|ERROR|CRITICAL) ", line) or "Traceback" in line]


def _send_whole_and_leave(port: int, ctx: ssl.SSLContext, body: bytes, way: str,
                          start: threading.Barrier) -> None:
    """Send one complete request at once after the handshake and go away ``way``
    without reading the answer."""
    start.wait()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    tls.sendall(_head(len(body)) + body)
    leave(tls, way)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_whole_claim_sent_before_leaving_is_taken_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """A sender that sends a complete claim and leaves without reading the receipt has
    no receipt, and sends the claim again (PROTOCOL P-SND-5). Each first copy is stored
    whole or not at all, without an error in the bridge's log; the copies sent again
    are answered with verifiable receipts, and every claim is stored once."""
    monkeypatch.setenv("BRIDGE_EVENT_LOOP", loop)
    _, insurer_cfg = _insurer(tmp_path, body_timeout_seconds=30)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    peer = _peer(tmp_path, insurer_cfg)
    ctx = client_ssl(tmp_path, "hospital-a")
    ways = [way for way in WAYS for _ in range(_HANG_UPS_PER_KIND)]
    messages = [peer.signed_claim() for _ in ways]
    bodies = [json.dumps(m, ensure_ascii=False).encode("utf-8") for m in messages]

    def leave_all() -> None:
        start = threading.Barrier(len(ways))
        threads = [threading.Thread(target=_send_whole_and_leave,
                                    args=(peer.port, ctx, body, way, start))
                   for body, way in zip(bodies, ways, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        await call(leave_all)
        await asyncio.sleep(0.5)
        assert insurer.proc.poll() is None
        with await call(peer.connect) as conn:
            for message in messages:
                answer = await call(peer.post_message, conn, message)
                assert answer.response.status == 200, answer.outcome
                assert answer.receipt is not None, answer.receipt_error
    finally:
        took = await asyncio.to_thread(_stop_seconds, insurer)
    assert took < 10, f"bridge serve took {took:.1f} s to stop"
    assert insurer.proc.returncode == 0
    identities = sorted(m["identifier"]["value"] for m in messages)
    assert sorted(inbox_ids(store)) == identities
    assert _troubled(insurer.log_lines()) == []


def _read_status(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_slow_client_still_connected_keeps_its_whole_body_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """While others hang up around it, a connected client that pauses mid-body is
    answered on its whole body when it arrives within the timeout, and one that never
    finishes is answered 408 no sooner than the timeout."""
    monkeypatch.setenv("BRIDGE_EVENT_LOOP", loop)
    timeout = 2.0
    _, insurer_cfg = _insurer(tmp_path, body_timeout_seconds=timeout)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    peer = _peer(tmp_path, insurer_cfg)
    ctx = client_ssl(tmp_path, "hospital-a")
    message = peer.signed_claim()
    body = json.dumps(message, ensure_ascii=False).encode("utf-8")

    def slow(finish: bool) -> tuple[int, bytes, float]:
        with (socket.create_connection(("127.0.0.1", peer.port), timeout=20) as sock,
              ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls):
            started = time.monotonic()
            tls.sendall(_head(len(body)) + body[:100])
            if finish:
                time.sleep(timeout / 2)
                tls.sendall(body[100:])
            status, answer = _read_status(tls)
            return status, answer, time.monotonic() - started

    try:
        finished, stalled, _ = await asyncio.gather(
            call(slow, True), call(slow, False), call(_hang_ups, peer.port, tmp_path / "pki"))
    finally:
        await asyncio.to_thread(insurer.stop)
    status, answer, _ = finished
    assert status == 200, answer
    assert peer.check_receipt(message, json.loads(answer)).outcome == "ok"
    status, answer, waited = stalled
    assert status == 408, answer
    assert waited >= timeout * 0.95


def _operator_hang_up(port: int, ctx: ssl.SSLContext, pause: float,
                      start: threading.Barrier) -> None:
    start.wait()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    time.sleep(pause)
    tls.sendall(b"POST /requeue HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 500\r\n\r\nmessage_id=")
    tls.close()


def test_operators_hanging_up_mid_form_hold_nothing_on_the_operations_port(
    tmp_path: Path,
) -> None:
    """The operations port over HTTPS (operator certificates) goes through the same TLS
    listener: an operator's client that leaves mid-form holds no handler (the form has no
    body timeout of its own), and is no refused attempt counting towards a lockout."""
    site = make_site(tmp_path)
    _operators(site.hospital, me_as="key-admin")
    run = bridge("operators", "issue", "--config", str(site.hospital), "otto",
                 "--role", "operator")
    assert run.returncode == 0, run.stderr
    _certificate_auth(site.hospital)
    hospital = serve(site.hospital)
    ctx = ssl.create_default_context(cafile=str(site.root / "pki" / "ca.pem"))
    ops = site.root / "pki" / "operators"
    ctx.load_cert_chain(ops / "otto.pem", ops / "otto.key")
    clients = [pause for pause in _PAUSES for _ in range(6)]
    start = threading.Barrier(len(clients))
    threads = [threading.Thread(target=_operator_hang_up,
                                args=(site.ports["hospital-ops"], ctx, pause, start))
               for pause in clients]
    try:
        before = len(audit_entries(site.hospital))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
        assert hospital.proc.poll() is None
    finally:
        took = _stop_seconds(hospital)
    assert took < 10, f"bridge serve took {took:.1f} s to stop"
    new = [(e.record.action, e.record.detail) for e in audit_entries(site.hospital)[before:]]
    assert [a for a in new if a[0].startswith("operator.")] == [], new
