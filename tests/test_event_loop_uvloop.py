"""``bridge serve`` on uvloop (``BRIDGE_EVENT_LOOP=uvloop``), tested from outside: the
TLS listener completes TLS 1.2 and TLS 1.3 handshakes with a client certificate, reads
the peer's certificate for the partner check, and still counts connections that close
before their handshake. (uvloop reads a new connection at once, and answers one gone
before its first byte differently from the standard library's loop.)"""

from __future__ import annotations

import socket
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ops_support import serve
from peer_support import tls_options

from bridge.conformance.peer import Peer, SigningKey
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki


def test_serve_on_uvloop_handshakes_and_counts_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_EVENT_LOOP", "uvloop")
    pki = tmp_path / "pki"
    init_dev_pki(pki, ["hospital-a", "insurer-b", "clinic-x"],
                 now=datetime.now(UTC) - timedelta(days=1))
    port = free_port()
    _, insurer_cfg = write_configs(tmp_path, free_port(), port)
    insurer = serve(insurer_cfg)
    try:
        assert "event loop: uvloop" in insurer.log.read_text()
        for version in ("1.2", "1.3"):
            peer = Peer(
                base_url=f"https://127.0.0.1:{port}/fhir", partner_id="hospital-a",
                receiver_id="insurer-b",
                tls=tls_options(pki, "hospital-a", min_version=version, max_version=version),
                signing_key=SigningKey.from_files(pki / "hospital-a" / "sign.key",
                                                  pki / "hospital-a" / "sign.pem"),
            )
            with peer.connect() as conn:
                assert conn.version == f"TLSv{version}"
                answer = peer.get(conn, "metadata")
                # The certificate was read: a partner without an inbound link here
                # is named in what it may do (process-message is offered).
                assert answer.status == 200
                assert "process-message" in answer.body.decode()
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)):
                pass
        time.sleep(0.5)
    finally:
        insurer.stop()  # flushes the handshake counts into the audit log
    con = sqlite3.connect(tmp_path / "insurer-b" / "bridge.sqlite")
    try:
        details = [r[0] for r in con.execute(
            "SELECT detail FROM audit WHERE action = 'tls.incomplete'")]
    finally:
        con.close()
    dropped = sum(int(part.split("=")[1]) for d in details for part in d.split()
                  if part.startswith("dropped="))
    assert dropped == 5, details
