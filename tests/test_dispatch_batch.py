"""The hospital's dispatcher sending batches (PROTOCOL §6b), against a scripted receiver.

The hospital is a real ``bridge serve`` process. The receiver is a standard-library
mutual-TLS server written from PROTOCOL.md (receipts made by the conformance kit's
envelope code, not the bridge's): it offers batches in its CapabilityStatement,
answers the first batch request as a whole with 503, then answers each message by a
script of its own, entry by entry. What the hospital decided is read from its store.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socketserver
import sqlite3
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from delivery_support import link_settings
from ops_support import serve
from reliability_support import enqueue, outbox_states, wait_settled

from bridge.conformance import protocol as P
from bridge.conformance.envelope import SigningKey
from bridge.conformance.sender_role import make_receipt
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki

#: What each message identity (in order of first arrival) is answered, arrival by arrival.
SCRIPTS = (("200",), ("422",), ("409", "200"), ("bad-receipt", "200"))


class ScriptedReceiver:
    def __init__(self, pki: Path, port: int, *, max_entries: int = 8) -> None:
        self.pki = pki
        self.port = port
        self.max_entries = max_entries
        self.key = SigningKey.from_files(pki / "insurer-b" / "sign.key",
                                         pki / "insurer-b" / "sign.pem")
        self.lock = threading.Lock()
        self.requests: list[tuple[str, list[str]]] = []  # (path, identities)
        self.identities: list[str] = []
        self.seen: dict[str, int] = {}  # answered arrivals per identity
        self.arrivals: dict[str, int] = {}  # every arrival, the 503 included

    def capability(self) -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "fhirVersion": "4.0.1", "format": [P.FHIR_JSON],
            "rest": [{
                "mode": "server",
                "interaction": [{"code": P.BATCH_INTERACTION}],
                "extension": [{"url": P.BATCH_EXTENSION, "extension": [
                    {"url": "maxEntries", "valueUnsignedInt": self.max_entries},
                    {"url": "maxBytes", "valueUnsignedInt": 4_000_000}]}],
            }],
        }

    def answer(self, message: dict[str, Any]) -> tuple[int, bytes]:
        identity = message["identifier"]["value"]
        with self.lock:
            if identity not in self.identities:
                self.identities.append(identity)
            script = SCRIPTS[self.identities.index(identity) % len(SCRIPTS)]
            nth = self.seen.get(identity, 0)
            self.seen[identity] = nth + 1
        step = script[min(nth, len(script) - 1)]
        if step in ("422", "409"):
            code = {"422": "fhir-invalid", "409": "message-in-progress"}[step]
            outcome = {"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "processing",
                "details": {"coding": [{"system": "urn:ws-fhir-bridge:error", "code": code}]}}]}
            return int(step), json.dumps(outcome).encode()
        receipt = make_receipt(message, receiver="insurer-b", sender="hospital-a", key=self.key)
        if step == "bad-receipt":
            receipt["timestamp"] = "2020-01-01T00:00:00Z"  # changed after signing
        return 200, json.dumps(receipt).encode()

    def _arrived(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            identity = message["identifier"]["value"]
            self.arrivals[identity] = self.arrivals.get(identity, 0) + 1

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "GET" and path == "/fhir/metadata":
            return 200, json.dumps(self.capability()).encode()
        if method == "POST" and path == "/fhir/$process-message":
            message = json.loads(body)
            with self.lock:
                self.requests.append((path, [message["identifier"]["value"]]))
                self._arrived([message])
            return self.answer(message)
        if method == "POST" and path == "/fhir":
            batch = json.loads(body)
            assert batch["type"] == "batch"
            messages = [e["resource"] for e in batch["entry"]]
            assert all(e["request"] == {"method": "POST", "url": "$process-message"}
                       for e in batch["entry"])
            with self.lock:
                self.requests.append((path, [m["identifier"]["value"] for m in messages]))
                self._arrived(messages)
                first = len(self.requests) == 1
            if first:  # the whole request fails: every message in it is retried
                return 503, b'{"resourceType":"OperationOutcome","issue":[]}'
            entries = []
            for message in messages:
                status, answer = self.answer(message)
                if status == 200:
                    entries.append({"response": {"status": "200 OK"},
                                    "resource": json.loads(answer)})
                else:
                    entries.append({"response": {"status": f"{status}",
                                                 "outcome": json.loads(answer)}})
            return 200, json.dumps({"resourceType": "Bundle", "type": "batch-response",
                                    "entry": entries}).encode()
        return 404, b'{"resourceType":"OperationOutcome","issue":[]}'

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, answer = receiver.handle(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", P.FHIR_JSON)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _serve

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki / "insurer-b" / "tls.pem", self.pki / "insurer-b" / "tls.key")
        ctx.load_verify_locations(self.pki / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True), addr

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def settle_against(
    tmp_path: Path, make_receiver: Any, *, claims: int, seed: int, timeout: float = 90,
) -> tuple[Any, list[str], dict[str, str], Path]:
    """Queue ``claims`` claims at a real hospital bridge, serve them to the receiver
    ``make_receiver(pki, port)`` makes, and wait until each is settled: the receiver,
    the claims' identities, their outbox states and the hospital's store."""
    pki = tmp_path / "pki"
    init_dev_pki(pki, ["hospital-a", "insurer-b"], now=datetime.now(UTC) - timedelta(days=1))
    port = free_port()
    hospital_cfg, _ = write_configs(tmp_path, free_port(), port)
    link_settings(hospital_cfg, retry_base_seconds=0.1, retry_cap_seconds=0.2,
                  probe_cap_seconds=0.2)
    ids = await enqueue(hospital_cfg, claims, seed=seed)
    receiver = make_receiver(pki, port)
    receiver.start()
    hospital = await asyncio.to_thread(serve, hospital_cfg)
    store = tmp_path / "hospital-a" / "bridge.sqlite"
    try:
        await wait_settled(store, ids, timeout=timeout)
        states = outbox_states(store)
    finally:
        await asyncio.to_thread(hospital.stop)
        receiver.stop()
    return receiver, ids, states, store


def stored_receipts(store: Path) -> dict[str, bytes]:
    """The receipt each outbox row of ``store`` holds, by message identity."""
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return {m: bytes(r) for m, r in con.execute("SELECT message_id, receipt FROM outbox")
                if r is not None}
    finally:
        con.close()


async def test_each_entry_settled_as_its_own_answer(tmp_path: Path) -> None:
    receiver, ids, states, _store = await settle_against(
        tmp_path, lambda pki, port: ScriptedReceiver(pki, port, max_entries=6),
        claims=8, seed=3, timeout=60)
    # The first request is a batch within the offer; it failed as a whole and every
    # message in it came again.
    first_path, first_ids = receiver.requests[0]
    assert first_path == "/fhir" and len(first_ids) == 6
    assert all(len(sent) <= 6 for _, sent in receiver.requests)
    assert all(receiver.arrivals[m] >= 2 for m in first_ids)
    by_order = {m: SCRIPTS[i % len(SCRIPTS)] for i, m in enumerate(receiver.identities)}
    for message_id in ids:
        script = by_order[message_id]
        if script == ("422",):
            assert states[message_id] == "rejected"
            # A definitive refusal is not sent again (its one arrival after the 503).
            assert receiver.arrivals[message_id] == (2 if message_id in first_ids else 1)
        else:
            assert states[message_id] == "acked", (message_id, script)
            # 409 and a receipt that does not verify: sent again until accepted.
            assert receiver.seen[message_id] >= len(script)
