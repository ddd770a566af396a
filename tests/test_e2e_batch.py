"""Several claims per request (PROTOCOL §6b), tested from outside.

The receiver is a real ``bridge serve`` process; the client is the conformance peer
(standard-library TLS and JOSE, written from PROTOCOL.md), which posts batch Bundles
by hand. The sender side runs two real ``bridge serve`` processes and reads what the
hospital did from its operations port (``/metrics``) and both stores (SQL).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from e2e_support import set_toml_keys
from ops_support import Serve, http, serve
from peer_support import call, tls_options
from reliability_support import enqueue, inbox_ids, outbox_states, wait_settled

from bridge.conformance import protocol as P
from bridge.conformance.peer import Peer, PeerConnection, SigningKey
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki

STREAM = "urn:ws-fhir-bridge:ext:bridge-stream"
SEQUENCE = "urn:ws-fhir-bridge:ext:bridge-sequence"


def _peer(root: Path, insurer_cfg: Path) -> Peer:
    pki = root / "pki"
    port = re.search(r"^port = (\d+)", insurer_cfg.read_text(), re.MULTILINE)
    assert port is not None
    return Peer(
        base_url=f"https://127.0.0.1:{port.group(1)}/fhir",
        partner_id="hospital-a",
        receiver_id="insurer-b",
        tls=tls_options(pki, "hospital-a"),
        signing_key=SigningKey.from_files(pki / "hospital-a" / "sign.key",
                                          pki / "hospital-a" / "sign.pem"),
        receiver_signing_certificate=x509.load_pem_x509_certificate(
            (pki / "insurer-b" / "sign.pem").read_bytes()),
    )


def _batch(messages: list[dict[str, Any]], *, first_seq: int | None = None) -> bytes:
    """A batch request as §6b writes it, built with the standard library."""
    entries = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"request": {"method": "POST", "url": "$process-message"},
                                 "resource": message}
        if first_seq is not None:
            entry["extension"] = [{"url": STREAM, "valueString": "claims-out"},
                                  {"url": SEQUENCE, "valueString": str(first_seq + i)}]
        entries.append(entry)
    return json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}).encode()


def _post_batch(peer: Peer, conn: PeerConnection, body: bytes) -> tuple[int, Any]:
    path = urlsplit(peer.base_url).path
    response = conn.request("POST", path, body, {"Content-Type": P.FHIR_JSON})
    return response.status, response.json()


def _statuses(answer: dict[str, Any]) -> list[int]:
    assert answer["resourceType"] == "Bundle" and answer["type"] == "batch-response"
    return [int(e["response"]["status"][:3]) for e in answer["entry"]]


def _code(entry: dict[str, Any]) -> str:
    return str(entry["response"]["outcome"]["issue"][0]["details"]["coding"][0]["code"])


def _insurer(root: Path, **server: Any) -> tuple[Path, Path]:
    init_dev_pki(root / "pki", ["hospital-a", "insurer-b", "clinic-x"],
                 now=datetime.now(UTC) - timedelta(days=1))
    hospital_cfg, insurer_cfg = write_configs(
        root, free_port(), free_port(), ops_ports=(free_port(), free_port()))
    if server:
        set_toml_keys(insurer_cfg, "server", server)
    return hospital_cfg, insurer_cfg


async def test_batch_entries_are_judged_one_by_one(tmp_path: Path) -> None:
    """Good entries get verifiable receipts; a forged entry, one whose sender is not the
    TLS peer and one reusing an identity with other content are refused alone; a
    repeated entry gets its original receipt; the bounds answer 413 naming them."""
    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=6, max_batch_bytes=400_000)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    try:
        peer = _peer(tmp_path, insurer_cfg)
        with await call(peer.connect) as conn:
            meta = (await call(peer.get, conn, "metadata")).json()
            rest = meta["rest"][0]
            assert {"code": "batch"}.items() <= rest["interaction"][0].items()
            offer = {s["url"]: s["valueUnsignedInt"] for e in rest["extension"]
                     if e["url"] == "urn:ws-fhir-bridge:ext:message-batch"
                     for s in e["extension"]}
            assert offer == {"maxEntries": 6, "maxBytes": 400_000}

            good = [peer.signed_claim() for _ in range(3)]
            forged = peer.signed_claim()
            forged["timestamp"] = "2020-01-01T00:00:00Z"  # changed after signing
            stranger = peer.signed_claim(sender="clinic-x")  # header names another sender
            reused = peer.signed_claim(identity=good[1]["identifier"]["value"])
            batch = [good[0], forged, good[1], stranger, good[2], reused]
            status, answer = await call(_post_batch, peer, conn, _batch(batch, first_seq=1))
            assert status == 200
            statuses = _statuses(answer)
            # The reused identity either waits for the first copy (409) or, once that
            # one is held, is refused for its other content (422).
            assert statuses[:5] == [200, 403, 200, 403, 200]
            assert statuses[5] in (409, 422)
            entries = answer["entry"]
            for i in (0, 2, 4):
                facts = peer.check_receipt(batch[i], entries[i]["resource"])
                assert facts is not None
            assert "signature" in _code(entries[1])
            assert _code(entries[3]) == "sender-mismatch"

            # Again: the held ones get their original receipts, the reused identity 422.
            fresh = peer.signed_claim()
            status, again = await call(
                _post_batch, peer, conn, _batch([good[0], reused, fresh], first_seq=4))
            assert status == 200
            assert _statuses(again) == [200, 422, 200]
            assert again["entry"][0]["resource"] == entries[0]["resource"]
            peer.check_receipt(fresh, again["entry"][2]["resource"])

            # Bounds: one entry too many, then too many bytes; both 413 naming the bound.
            status, over = await call(
                _post_batch, peer, conn, _batch([peer.signed_claim() for _ in range(7)]))
            assert status == 413
            assert "6" in over["issue"][0]["details"]["text"]
            assert over["issue"][0]["expression"] == ["Bundle.entry"]
        with await call(peer.connect) as conn:
            padding = [peer.signed_claim() for _ in range(2)]
            big = _batch(padding).replace(b'"type": "batch"',
                                          b'"type": "batch", "id": "' + b"x" * 400_000 + b'"')
            status, over = await call(_post_batch, peer, conn, big)
            assert status == 413
            assert "400000" in over["issue"][0]["details"]["text"]
        held = set(inbox_ids(tmp_path / "insurer-b" / "bridge.sqlite"))
        wanted = {m["identifier"]["value"] for m in (*good, fresh)}
        assert held == wanted  # nothing forged, nothing of a refused batch
    finally:
        await asyncio.to_thread(insurer.stop)


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def _ops_url(config: Path) -> str:
    found = re.search(r"\[operations\]\nport = (\d+)", config.read_text())
    assert found
    return f"http://127.0.0.1:{found.group(1)}"


async def _push(root: Path, claims: int, **server: Any) -> tuple[float, float, Path, Path]:
    """Enqueue ``claims`` while the hospital is down, start both bridges, wait for the
    outbox to settle; the hospital's request and batch counters."""
    hospital_cfg, insurer_cfg = _insurer(root, **server)
    ids = await enqueue(hospital_cfg, claims, seed=7)
    insurer: Serve = await asyncio.to_thread(serve, insurer_cfg)
    hospital: Serve | None = None
    try:
        hospital = await asyncio.to_thread(serve, hospital_cfg)
        hospital_store = root / "hospital-a" / "bridge.sqlite"
        await wait_settled(hospital_store, ids, timeout=60)
        states = outbox_states(hospital_store)
        assert all(states[m] == "acked" for m in ids), states
        insurer_store = root / "insurer-b" / "bridge.sqlite"
        assert sorted(inbox_ids(insurer_store)) == sorted(ids)
        _, text = await call(http, _ops_url(hospital_cfg) + "/metrics")
        return (_metric(text, "bridge_link_requests_total"),
                _metric(text, "bridge_link_batched_claims_total"), hospital_store, insurer_store)
    finally:
        if hospital is not None:
            await asyncio.to_thread(hospital.stop)
        await asyncio.to_thread(insurer.stop)


def _sequences(store: Path) -> list[int]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in con.execute("SELECT seq FROM sync_inbound"))
    finally:
        con.close()


async def test_two_bridges_negotiate_batches(tmp_path: Path) -> None:
    """A backlog goes in a few batch requests, every claim acknowledged once with its
    place in the sequence recorded by the receiver."""
    requests, batched, _, insurer_store = await _push(tmp_path, 40)
    assert batched == 40
    assert requests <= 4
    assert _sequences(insurer_store) == list(range(1, 41))


async def test_partner_without_batches_gets_one_message_per_request(tmp_path: Path) -> None:
    """An insurer that offers no batches (its CapabilityStatement says nothing of them,
    and it has no batch route) receives every claim in a request of its own."""
    requests, batched, _, _ = await _push(tmp_path, 12, max_batch_entries=0)
    assert batched == 0
    assert requests >= 12

