"""A hostile or buggy partner against the batch form (PROTOCOL §6b), from outside.

The receiver is a real ``bridge serve`` process with the dev PKI; the client is the
conformance peer (standard-library TLS and JOSE, written from PROTOCOL.md) posting
batch Bundles built here by hand. What the receiver stored and audited is read from
its SQLite store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from ops_support import serve
from peer_support import call
from reliability_support import inbox_ids
from test_e2e_batch import _batch, _code, _insurer, _peer, _post_batch, _statuses

from bridge.conformance.envelope import sign_message
from bridge.conformance.peer import SigningKey

PROCESS = {"method": "POST", "url": "$process-message"}


def _audit(store: Path, subject: str | None = None) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT action, subject, detail FROM audit ORDER BY seq").fetchall()
    finally:
        con.close()
    return [r for r in rows if subject is None or r[1] == subject]


def _outcome(answer: Any) -> tuple[str, list[str]]:
    issue = answer["issue"][0]
    return issue["details"]["coding"][0]["code"], issue.get("expression", [])


async def test_entries_are_bound_to_the_tls_peer_and_this_receiver(tmp_path: Path) -> None:
    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=8, max_batch_bytes=2_000_000)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    try:
        peer = _peer(tmp_path, insurer_cfg)
        other_key = SigningKey.from_files(tmp_path / "pki" / "clinic-x" / "sign.key",
                                          tmp_path / "pki" / "clinic-x" / "sign.pem")
        good = peer.signed_claim()
        # Signed by another partner's key, under hospital-a's name.
        alien = peer.claim()
        alien = sign_message(alien, other_key, iss="hospital-a", aud="insurer-b")
        # Header and signature name clinic-x, sent over hospital-a's connection.
        as_clinic = sign_message(peer.claim(sender="clinic-x"), other_key,
                                 iss="clinic-x", aud="insurer-b")
        elsewhere = peer.signed_claim(receiver="insurer-z", sign={"aud": "insurer-z"})
        wrong_aud = peer.signed_claim(sign={"aud": "insurer-z"})
        stale = peer.signed_claim(sign={"iat": int(time.time()) - 7 * 24 * 3600})
        batch = [good, alien, as_clinic, elsewhere, wrong_aud, stale]
        with await call(peer.connect) as conn:
            status, answer = await call(_post_batch, peer, conn, _batch(batch))
        assert status == 200, answer
        statuses = _statuses(answer)
        assert statuses[0] == 200
        assert all(s == 403 for s in statuses[1:]), statuses
        for i, entry in enumerate(answer["entry"][1:], start=1):
            assert "outcome" in entry["response"], i
        assert inbox_ids(store) == [good["identifier"]["value"]]
        # Every refused entry is audited like a message refused alone.
        rejects = [a for a in _audit(store) if a[0] == "message.reject"]
        assert len(rejects) == 5, rejects
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]


async def test_one_identity_twice_in_a_batch(tmp_path: Path) -> None:
    """Two copies of one message in one batch: one stored copy, one reception audited;
    the same content gets the one receipt, other content under that identity 422."""
    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=8, max_batch_bytes=2_000_000)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    try:
        peer = _peer(tmp_path, insurer_cfg)
        same = peer.signed_claim()
        first = peer.signed_claim()
        other = peer.signed_claim(identity=first["identifier"]["value"])
        with await call(peer.connect) as conn:
            status, answer = await call(_post_batch, peer, conn, _batch([same, same, first, other]))
            assert status == 200, answer
            statuses = _statuses(answer)
            assert statuses == [200, 200, 200, 422], statuses
            assert answer["entry"][0]["resource"] == answer["entry"][1]["resource"]
            assert _code(answer["entry"][3]) == "conflict" or "conflict" in _code(answer["entry"][3])
            # Replayed in a later batch: the original receipt, nothing stored again.
            status, again = await call(_post_batch, peer, conn, _batch([same]))
            assert _statuses(again) == [200]
            assert again["entry"][0]["resource"] == answer["entry"][0]["resource"]
        assert sorted(inbox_ids(store)) == sorted(
            [same["identifier"]["value"], first["identifier"]["value"]])
        # Audited as if posted one after the other: one reception, then a duplicate
        # (and another for the later replay); the other content refused as a conflict.
        actions = [a[0] for a in _audit(store, same["identifier"]["value"])]
        assert actions == ["message.receive", "message.duplicate", "message.duplicate"], actions
        conflict = [(a[0], a[2]) for a in _audit(store, first["identifier"]["value"])]
        assert conflict[0][0] == "message.receive"
        assert [a for a, _ in conflict[1:]] == ["message.reject"], conflict
        assert "conflict" in conflict[1][1] or "Bundle.identifier" in conflict[1][1], conflict
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]


async def test_malformed_batches_are_refused_whole_naming_where(tmp_path: Path) -> None:
    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=4, max_batch_bytes=3_000_000,
                              max_body_bytes=200_000)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    try:
        peer = _peer(tmp_path, insurer_cfg)
        msg = peer.signed_claim()
        ok_entry = {"request": PROCESS, "resource": msg}

        def bundle(**fields: Any) -> bytes:
            return json.dumps({"resourceType": "Bundle", **fields}).encode()

        cases: list[tuple[bytes, int, str]] = [
            (bundle(type="transaction", entry=[ok_entry]), 400, "Bundle.type"),
            (bundle(type="message", entry=[ok_entry]), 400, "Bundle.type"),
            (bundle(type="batch", entry=[]), 400, "Bundle.entry"),
            (bundle(type="batch"), 400, "Bundle.entry"),
            (bundle(type="batch", entry={"a": 1}), 400, "Bundle.entry"),
            (b'{"resourceType":"Bundle","type":"batch","type":"batch","entry":[]}', 400, ""),
            (b'{"resourceType":"Bundle","type":"batch","entry":' + b"[" * 5000 + b"]" * 5000
             + b"}", 400, ""),
            (b'[1,2]', 400, ""),
            (b'\xff\xfe', 400, ""),
        ]
        for body, want, where in cases:
            with await call(peer.connect) as conn:
                status, answer = await call(_post_batch, peer, conn, body)
            assert status == want, (body[:80], status, answer)
            assert answer["resourceType"] == "OperationOutcome"
            if where:
                assert _outcome(answer)[1] == [where], (body[:80], answer)
        # Entries that are not a $process-message POST are refused alone, naming them.
        entries = [
            {"request": {"method": "PUT", "url": "$process-message"}, "resource": msg},
            {"request": {"method": "POST", "url": "Claim"}, "resource": msg},
            {"request": {"method": "POST", "url": "$process-message"}},
            {"fullUrl": "urn:uuid:1", "request": PROCESS, "resource": msg,
             "response": {"status": "200 OK"}},
        ]
        with await call(peer.connect) as conn:
            status, answer = await call(
                _post_batch, peer, conn, bundle(type="batch", entry=entries))
        assert status == 200, answer
        statuses = _statuses(answer)
        assert statuses[:3] == [400, 400, 400], statuses
        assert _outcome(answer["entry"][0]["response"]["outcome"])[1] == ["Bundle.entry[0].request"]
        assert _outcome(answer["entry"][2]["response"]["outcome"])[1] == ["Bundle.entry[2].resource"]
        # A single entry larger than a message alone may be: 413 for it alone.
        big = peer.claim()
        big["meta"] = {"tag": [{"code": "x" * 300_000}]}
        big = peer.sign(big)
        good = peer.signed_claim()
        with await call(peer.connect) as conn:
            status, answer = await call(_post_batch, peer, conn, _batch([big, good]))
        assert status == 200, answer
        assert _statuses(answer)[0] == 413
        assert _outcome(answer["entry"][0]["response"]["outcome"])[1] == ["Bundle.entry[0].resource"]
        assert _statuses(answer)[1] == 200
        # A chunked body (no Content-Length) past maxBytes: 413 naming the bound,
        # the connection closed without reading the rest.
        with await call(peer.connect) as conn:
            head = (b"POST /fhir HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json"
                    b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 65536
            framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
            start = b'{"resourceType":"Bundle","type":"batch","id":"'
            with contextlib.suppress(Exception):  # the receiver may stop reading
                await call(conn.send_raw, head + b"%x\r\n" % len(start) + start + b"\r\n"
                           + framed * 60)
            response = await call(conn.read_response)
            assert response.status == 413
            assert "3000000" in response.json()["issue"][0]["details"]["text"]
        assert set(inbox_ids(store)) <= {msg["identifier"]["value"], good["identifier"]["value"]}
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]


def _inbox(store: Path) -> dict[str, bytes]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        return {m: bytes(r) for m, r in con.execute("SELECT message_id, receipt FROM inbox")}
    finally:
        con.close()


@pytest.mark.parametrize("when", ["while-reading", "after-commit"])
async def test_receiver_killed_mid_batch_keeps_each_entry_whole(tmp_path: Path, when: str) -> None:
    """kill -9 while a batch is being processed: every entry is then either held with
    its receipt (which a resend gets back, unchanged) or absent; none is received
    twice, and the audit trail still verifies."""
    import signal

    from bridge.ledger.sqlite import SQLiteStore

    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=200, max_batch_bytes=16_000_000)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    peer = _peer(tmp_path, insurer_cfg)
    batch = [peer.signed_claim() for _ in range(200)]
    body = _batch(batch, first_seq=1)
    try:
        def send() -> None:
            # The receiver is killed under it: any failure of the request is expected.
            with contextlib.suppress(Exception), peer.connect() as conn:
                _post_batch(peer, conn, body)

        sender = asyncio.ensure_future(asyncio.to_thread(send))
        held: dict[str, bytes] = {}
        for _ in range(400 if when == "after-commit" else 0):
            await asyncio.sleep(0.01)
            try:
                held = _inbox(store)
            except sqlite3.OperationalError:
                continue
            if held:
                break
        if when == "while-reading":
            await asyncio.sleep(0.05)
        insurer.proc.send_signal(signal.SIGKILL)
        insurer.proc.wait()
        await sender
    finally:
        await asyncio.to_thread(insurer.stop)
    before = _inbox(store)
    if when == "after-commit":
        assert before, "nothing was stored before the kill"
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    try:
        with await call(peer.connect) as conn:
            status, answer = await call(_post_batch, peer, conn, body)
    finally:
        await asyncio.to_thread(insurer.stop)
    assert status == 200, answer
    assert _statuses(answer) == [200] * len(batch)
    for message, entry in zip(batch, answer["entry"], strict=True):
        identity = message["identifier"]["value"]
        peer.check_receipt(message, entry["resource"])
        if identity in before:
            assert json.loads(before[identity]) == entry["resource"]
    after = _inbox(store)
    assert sorted(after) == sorted(m["identifier"]["value"] for m in batch)
    received: dict[str, int] = {}
    for action, subject, _ in _audit(store):
        if action == "message.receive":
            received[subject] = received.get(subject, 0) + 1
    assert set(received.values()) == {1}
    with SQLiteStore(store) as s:
        assert s.verify_audit().ok


async def test_batches_from_callers_without_a_link_or_in_the_wrong_form(tmp_path: Path) -> None:
    """Refused as a whole with an OperationOutcome: a certificate of no partner, this
    controller's own certificate, another media type, a content coding, a body that
    stalls; and a receiver that does not offer batches has no batch route."""
    import dataclasses

    from peer_support import tls_options

    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=4, body_timeout_seconds=1.0)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    try:
        peer = _peer(tmp_path, insurer_cfg)
        body = _batch([peer.signed_claim()])
        for who in ("clinic-x", "insurer-b"):
            stranger = dataclasses.replace(peer, tls=tls_options(tmp_path / "pki", who))
            try:
                with await call(stranger.connect) as conn:
                    status, answer = await call(_post_batch, stranger, conn, body)
            except Exception as exc:  # noqa: BLE001 - refused at the handshake is fine too
                status, answer = 0, {"refused": type(exc).__name__}
            assert status in (0, 401), (who, status, answer)
            if status:
                assert answer["resourceType"] == "OperationOutcome"
        with await call(peer.connect) as conn:
            path = "/fhir"
            response = await call(conn.request, "POST", path, body,
                                  {"Content-Type": "text/plain"})
            assert response.status == 415
            assert response.json()["resourceType"] == "OperationOutcome"
        with await call(peer.connect) as conn:
            response = await call(conn.request, "POST", path, body,
                                  {"Content-Type": "application/fhir+json",
                                   "Content-Encoding": "gzip"})
            assert response.status == 415
        with await call(peer.connect) as conn:
            # Announces a body and sends half of it.
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            await call(conn.send_raw, head + body[: len(body) // 2])
            response = await call(conn.read_response)
            assert response.status == 408
            assert response.json()["resourceType"] == "OperationOutcome"
    finally:
        await asyncio.to_thread(insurer.stop)
    assert inbox_ids(store) == []
    assert not [line for line in insurer.log_lines() if "Traceback" in line]

    off = tmp_path / "off"
    _, insurer_cfg = _insurer(off, max_batch_entries=0)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    try:
        peer = _peer(off, insurer_cfg)
        with await call(peer.connect) as conn:
            meta = (await call(peer.get, conn, "metadata")).json()
            assert "interaction" not in meta["rest"][0]
            status, answer = await call(_post_batch, peer, conn, _batch([peer.signed_claim()]))
        assert status in (404, 405), status
        assert answer["resourceType"] == "OperationOutcome"
    finally:
        await asyncio.to_thread(insurer.stop)
    assert inbox_ids(off / "insurer-b" / "bridge.sqlite") == []


def _deep(levels: int) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "urn:example:deep", "valueString": "v"}
    for _ in range(levels):
        extension = {"url": "urn:example:deep", "extension": [extension]}
    return extension


async def test_nesting_of_a_message_is_judged_as_alone(tmp_path: Path) -> None:
    """The batch wraps each message three levels deeper: a message nested as deep as a
    message alone may be is processed as it would be alone, beside its neighbours; one
    nested deeper makes the batch body break I-JSON's bound (400 naming where)."""
    _, insurer_cfg = _insurer(tmp_path, max_batch_entries=4)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"

    def deep_claim(levels: int) -> dict[str, Any]:
        claim = peer.claim()
        claim["meta"] = {"extension": [_deep(levels)]}
        return peer.sign(claim)

    try:
        peer = _peer(tmp_path, insurer_cfg)
        with await call(peer.connect) as conn:
            # The deepest nesting a message alone is taken with.
            levels = 10
            while (await call(peer.post_message, conn, deep_claim(levels + 1))).status == 200:
                levels += 1
            assert (await call(peer.post_message, conn, deep_claim(levels + 1))).status == 400
            deepest, too_deep, good = deep_claim(levels), deep_claim(levels + 1), peer.signed_claim()
            status, answer = await call(_post_batch, peer, conn, _batch([good, deepest]))
            assert status == 200, answer
            assert _statuses(answer) == [200, 200], answer
            status, answer = await call(_post_batch, peer, conn, _batch([too_deep]))
        assert status == 400, answer
        assert _outcome(answer)[1][0].startswith("$.entry[0].resource.meta"), answer
        held = set(inbox_ids(store))
        assert {good["identifier"]["value"], deepest["identifier"]["value"]} <= held
        assert too_deep["identifier"]["value"] not in held
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]
