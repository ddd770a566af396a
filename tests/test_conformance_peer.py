"""The conformance peer stays independent, and what it builds from PROTOCOL.md is what
the bridge accepts: RFC 8785 signatures, receipts checked by §6.2, version 1 evidence,
and an audit chain an outsider recomputes from §9 alone."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from e2e_support import Pair, start_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from peer_support import call, make_peer, stored

from bridge.conformance import protocol as P
from bridge.conformance.envelope import jcs, v1_canonical
from bridge.trust.jws import canonical_json, verify_bundle
from bridge.trust.receipts import RECEIPT_NAMESPACE, receipt_id

ROOT = Path(__file__).resolve().parents[1]


def test_the_peer_imports_nothing_of_the_bridge_outside_its_room() -> None:
    probe = (
        "import sys\n"
        "import bridge.conformance.peer\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('bridge'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    outside = [m for m in out if m != "bridge" and not m.startswith("bridge.conformance")]
    assert outside == []
    assert "bridge.conformance.peer" in out
    # Nor does it load the bridge's JOSE library or HTTP server.
    modules = subprocess.run(
        [sys.executable, "-c", probe.replace("m.startswith('bridge')", "True")],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout.split()
    assert not {"joserfc", "aiohttp", "bridge.link", "bridge.trust"} & set(modules)


def test_protocol_constants_are_the_documents() -> None:
    text = (ROOT / "conformance" / "PROTOCOL.md").read_text(encoding="utf-8")
    assert f"version {P.PROTOCOL_VERSION}" in text
    assert str(P.RECEIPT_NAMESPACE) in text
    assert P.RECEIPT_NAMESPACE == RECEIPT_NAMESPACE
    for name in P.JWS_HEADERS:
        assert f"`{name}`" in text
    assert P.receipt_identity("urn:uuid:0b7c7f04-6a53-4bd9-9c4e-3f3f0c6f1d2a", "insurer-b") == (
        receipt_id("urn:uuid:0b7c7f04-6a53-4bd9-9c4e-3f3f0c6f1d2a", "insurer-b")
    )


# --- canonical JSON ----------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_json)
def test_the_bridge_writes_exactly_rfc8785(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


def test_rfc8785_differs_from_version_1_where_the_protocol_says() -> None:
    value = {"net": 6600.0, "tiny": 1e-7, "big": 1e21, "zero": -0.0, "\U0001f600": 1, "\ue000": 2}
    assert jcs(value) == canonical_json(value)
    # Member names sort by UTF-16 code units: U+1F600 (D83D DE00) before U+E000.
    assert jcs(value) == (
        b'{"big":1e+21,"net":6600,"tiny":1e-7,"zero":0,"\xf0\x9f\x98\x80":1,"\xee\x80\x80":2}'
    )
    assert v1_canonical(value) != jcs(value)


# --- over the wire --------------------------------------------------------------------------


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield p
    finally:
        await p.stop()


async def test_rfc8785_claim_is_accepted_and_its_receipt_verifies(pair: Pair) -> None:
    peer = make_peer(pair)
    message = peer.signed_claim()  # carries 6600.0, whose forms differ
    answer = await call(peer.send, message)
    assert answer.status == 200, answer.outcome
    assert answer.receipt_error is None
    assert answer.receipt is not None and answer.receipt.outcome == "ok"
    assert answer.receipt.request_digest == "sha256:" + hashlib.sha256(
        jcs({k: v for k, v in message.items() if k != "signature"})
    ).hexdigest()
    # The same message again: the original receipt, byte for byte.
    again = await call(peer.send, message)
    assert again.response.body == answer.response.body


async def test_version_1_signatures_keep_verifying(pair: Pair) -> None:
    """A sender still on version 1 is served, and what it signed verifies years later."""
    peer = make_peer(pair)
    message = peer.signed_claim(sign={"canonical": v1_canonical})
    answer = await call(peer.send, message)
    assert answer.status == 200, answer.outcome
    assert answer.receipt is not None
    # The receipt names the digest of the form that was signed.
    assert answer.receipt.request_digest == "sha256:" + hashlib.sha256(
        v1_canonical({k: v for k, v in message.items() if k != "signature"})
    ).hexdigest()
    row = await pair.insurer.controller.db.inbox_lookup("hospital-a", message["identifier"]["value"])
    assert row is not None
    claims = verify_bundle(
        json.loads(row.payload),
        pair.insurer.controller.keyring,
        expected_issuer="hospital-a",
        expected_audience="insurer-b",
        now=datetime.now(UTC) + timedelta(days=400),
        check_time=False,
    )
    assert claims.payload_digest == answer.receipt.request_digest
    # Re-signed under version 1.1, the same content is the same message, not a conflict.
    resigned = peer.sign({k: v for k, v in message.items() if k != "signature"})
    again = await call(peer.send, resigned)
    assert again.status == 200 and again.response.body == answer.response.body


async def test_compressed_bodies_are_refused_not_inflated(pair: Pair) -> None:
    peer = make_peer(pair)
    message = peer.signed_claim()
    bomb = gzip.compress(b"[" * 10 + b" " * 50_000_000 + b"]" * 10)  # 50 MB of nothing
    raw = json.dumps(message).encode()
    with await call(peer.connect) as conn:
        for body in (gzip.compress(raw), bomb):
            answer = await call(
                peer.post_message, conn, body, headers={"Content-Encoding": "gzip"}
            )
            assert (answer.status, answer.code) == (415, "unsupported-media-type")
            assert answer.outcome and answer.outcome.expression == ("Content-Encoding",)
        # The connection is still good for a plain request.
        plain = await call(peer.post_message, conn, message)
        assert plain.status == 200
    assert await stored(pair, message["identifier"]["value"])


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"resourceType":"Bundle","type":"message","type":"collection"}', "body#type"),
        (b"[" * 70 + b"]" * 70, "$" + "[0]" * 64),
        (b'{"resourceType":"Bundle","n":9007199254740993}', "$.n"),
    ],
)
async def test_bodies_outside_i_json_are_400(pair: Pair, body: bytes, where: str) -> None:
    peer = make_peer(pair)
    answer = await call(peer.send, body)
    assert (answer.status, answer.code) == (400, "parse-error")
    assert answer.outcome and answer.outcome.expression == (where,)


async def test_slow_bodies_get_408(tmp_path: Path) -> None:
    pair = await start_pair(
        tmp_path, start_dispatch=False, insurer_config={"server": {"body_timeout_seconds": 1.0}}
    )
    try:
        peer = make_peer(pair)

        def half_a_body() -> Any:
            with peer.connect() as conn:
                conn.send_raw(
                    b"POST /fhir/$process-message HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{"
                )
                return conn.read_response()

        response = await call(half_a_body)
        assert response.status == 408
        assert response.outcome and response.outcome.code == "request-timeout"
        assert response.header("Connection") == "close"
    finally:
        await pair.stop()


# --- the audit chain, recomputed from PROTOCOL §9 alone ------------------------------------


def _recompute_chain(rows: list[sqlite3.Row]) -> list[str]:
    """§9.2, written from the document: SHA-256 hex of the RFC 8785 form of the entry."""
    hashes = []
    prev = "0" * 64
    for row in rows:
        entry = {
            "v": 1,
            "seq": row["seq"],
            "prev_hash": prev,
            "time": row["time"],
            "actor": row["actor"],
            "action": row["action"],
            "subject": row["subject"],
            "partner": row["partner"],
            "patient": row["patient"],
            "categories": json.loads(row["categories"]),
            "outcome": row["outcome"],
            "detail": row["detail"],
            "digest": row["digest"],
        }
        if row["operator"] is not None:  # present only when a person caused the entry
            entry["operator"] = row["operator"]
        digest = hashlib.sha256(rfc8785.dumps(entry)).hexdigest()
        hashes.append(digest)
        prev = digest
    return hashes


async def test_an_outsider_recomputes_the_audit_chain(pair: Pair) -> None:
    peer = make_peer(pair)
    answer = await call(peer.send, peer.signed_claim())
    assert answer.receipt is not None
    stranger = make_peer(pair, "clinic-x")
    await call(stranger.send, stranger.signed_claim())  # a refusal, audited
    await pair.insurer.controller.put_consent(
        {"resourceType": "Consent"} | _small_consent()
    )
    con = sqlite3.connect(pair.insurer.controller.config.store.path)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    finally:
        con.close()
    assert len(rows) >= 3
    assert _recompute_chain(rows) == [row["hash"] for row in rows]
    # The receipt names an entry of that chain, and its hash.
    entry = next(r for r in rows if r["seq"] == answer.receipt.audit_seq)
    assert entry["hash"] == answer.receipt.audit_hash


def _small_consent() -> dict[str, Any]:
    from e2e_support import consent_for

    from bridge.samples import inpatient_records

    consent = consent_for(inpatient_records(1, seed=5)[0])
    consent.pop("resourceType")
    return consent
