"""Identity binding, envelope and signature rules, tested from outside with the peer.

A registered partner that signs correctly as itself must still not be able to store a
message that names someone else as its sender, is addressed to a third party, carries
another event, or has an identity that is not a canonical ``urn:uuid``; JWS headers
beyond PROTOCOL §5.2 are refused; ``GET /metadata`` needs a registered partner; and
no request, however malformed, gets an unaudited 5xx.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from e2e_support import Pair, start_pair
from peer_support import audit_head, audit_of, call, make_peer, stored

from bridge.conformance.envelope import JWSOptions
from bridge.conformance.peer import Answer, Peer


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
def peer(pair: Pair) -> Peer:
    return make_peer(pair)


async def _refused(pair: Pair, answer: Answer, message: dict[str, Any], since: int) -> list[Any]:
    """The answer is a refusal, nothing was stored, and the refusal was audited."""
    assert answer.outcome is not None, answer.response.body[:200]
    identity = message.get("identifier", {}).get("value")
    if isinstance(identity, str):
        assert not await stored(pair, identity)
    rejects = await audit_of(pair, "message.reject", since=since)
    assert rejects, "the refusal must be audited"
    return rejects


# --- MessageHeader bound to the TLS peer and to this receiver ---------------------------


async def test_sender_naming_another_partner_is_refused(pair: Pair, peer: Peer) -> None:
    before = await audit_head(pair)
    message = peer.claim()
    message["entry"][0]["resource"]["sender"]["identifier"]["value"] = "clinic-x"
    answer = await call(peer.send, peer.sign(message))
    assert (answer.status, answer.code) == (403, "sender-mismatch")
    assert answer.outcome and answer.outcome.expression == ("Bundle.entry[0].resource.sender",)
    await _refused(pair, answer, message, before)


async def test_message_addressed_to_a_third_partner_is_refused(pair: Pair, peer: Peer) -> None:
    before = await audit_head(pair)
    message = peer.claim(receiver="clinic-x")
    answer = await call(peer.send, peer.sign(message))
    assert (answer.status, answer.code) == (403, "wrong-receiver")
    assert answer.outcome and answer.outcome.expression == (
        "Bundle.entry[0].resource.destination[0].receiver",
    )
    await _refused(pair, answer, message, before)


@pytest.mark.parametrize("event", ["receipt", "claim-cancel"])
async def test_events_other_than_claim_submit_are_refused(
    pair: Pair, peer: Peer, event: str
) -> None:
    before = await audit_head(pair)
    message = peer.claim(event=event)
    answer = await call(peer.send, peer.sign(message))
    assert (answer.status, answer.code) == (400, "unsupported-event")
    assert answer.receipt is None
    await _refused(pair, answer, message, before)


@pytest.mark.parametrize(
    "identity",
    [
        "urn:uuid:not-a-uuid-0000-0000-0000-000000000000",
        "urn:oid:1.2.156.112604.1.1",
        "urn:uuid:6f1c2b9e-1b5c 4d2a-9a57-2b1e1f0e6a10",
        "urn:uuid:6F1C2B9E-1B5C-4D2A-9A57-2B1E1F0E6A10",  # not the canonical lower case
        "urn:uuid:6f1c2b9e1b5c4d2a9a572b1e1f0e6a10",  # no hyphens
        "urn:uuid:6f1c2b9e-1b5c-4d2a-1a57-2b1e1f0e6a10",  # not the RFC 4122 variant
        "6f1c2b9e-1b5c-4d2a-9a57-2b1e1f0e6a10",  # no urn:uuid: prefix
    ],
)
async def test_identity_must_be_a_canonical_urn_uuid(
    pair: Pair, peer: Peer, identity: str
) -> None:
    before = await audit_head(pair)
    message = peer.claim(identity=identity)
    answer = await call(peer.send, peer.sign(message))
    assert (answer.status, answer.code) == (400, "parse-error")
    assert answer.outcome and answer.outcome.expression == ("Bundle.identifier.value",)
    await _refused(pair, answer, message, before)


# --- JWS headers ---------------------------------------------------------------------------


async def test_rfc7797_unencoded_payload_is_refused(pair: Pair, peer: Peer) -> None:
    before = await audit_head(pair)
    message = peer.claim()
    signed = peer.sign(
        message, options=JWSOptions(extra_headers={"crit": ["b64"], "b64": False}, b64=False)
    )
    answer = await call(peer.send, signed)
    assert (answer.status, answer.code) == (403, "signature-invalid")
    assert answer.outcome and answer.outcome.expression == ("Bundle.signature.data#b64",)
    await _refused(pair, answer, message, before)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"crit": ["exp"], "exp": 4102444800}, "crit"),
        ({"typ": "JOSE"}, "typ"),
        ({"x5c": ["MIIB"]}, "x5c"),
        ({"jku": "https://keys.example/jwks"}, "jku"),
        ({"b64": True}, "b64"),
    ],
)
async def test_headers_beyond_section_5_are_refused_by_name(
    pair: Pair, peer: Peer, extra: dict[str, Any], named: str
) -> None:
    before = await audit_head(pair)
    message = peer.claim()
    answer = await call(peer.send, peer.sign(message, options=JWSOptions(extra_headers=extra)))
    assert (answer.status, answer.code) == (403, "signature-invalid")
    assert answer.outcome and answer.outcome.expression == (f"Bundle.signature.data#{named}",)
    await _refused(pair, answer, message, before)


async def test_missing_or_mistyped_section_5_headers_are_refused(pair: Pair, peer: Peer) -> None:
    for options, named in [
        (JWSOptions(omit=("msgid",)), "msgid"),
        (JWSOptions(overrides={"iat": "1700000000"}), "iat"),
        (JWSOptions(overrides={"iat": True}), "iat"),
        (JWSOptions(overrides={"aud": ["insurer-b"]}), "aud"),
    ]:
        answer = await call(peer.send, peer.sign(peer.claim(), options=options))
        assert (answer.status, answer.code) == (403, "signature-invalid"), named
        assert answer.outcome and answer.outcome.expression == (f"Bundle.signature.data#{named}",)


# --- 409 only after the signature, and audited ------------------------------------------


async def test_in_progress_answers_come_after_the_signature_and_are_audited(
    pair: Pair, peer: Peer
) -> None:
    before = await audit_head(pair)
    message = peer.claim()
    signed = peer.sign(message)
    tampered = copy.deepcopy(signed)
    tampered["entry"][5]["resource"]["total"]["value"] = 99999.0
    bodies = [signed] * 12 + [tampered] * 8
    connections = [await call(peer.connect) for _ in bodies]
    start = threading.Barrier(len(bodies))

    def send(i: int) -> Answer:
        start.wait()
        return peer.post_message(connections[i], bodies[i])

    try:
        answers = await call(_all, [lambda i=i: send(i) for i in range(len(bodies))])
    finally:
        for conn in connections:
            conn.close()
    valid, forged = answers[:12], answers[12:]
    # A forged copy is refused for what it is, never told to come back later.
    assert {(a.status, a.code) for a in forged} == {(403, "signature-invalid")}
    assert all(a.status in (200, 409) for a in valid), [(a.status, a.code) for a in valid]
    receipts = {a.response.body for a in valid if a.status == 200}
    assert len(receipts) == 1  # one claim, one receipt however often it was sent
    refused_409 = sum(1 for a in valid if a.status == 409)
    assert refused_409 > 0, "the concurrent copies did not overlap; the test proves nothing"
    rows = await audit_of(pair, "message.in-progress", since=before)
    assert rows, "409 answers must be audited"
    # Rate-limited: while one copy is processed (it is answered 200), the copies refused
    # meanwhile make at most two entries, the first one and one with the count. On a
    # loaded machine later copies may find the first done and be processed in turn.
    processed = sum(1 for a in valid if a.status == 200)
    assert len(rows) <= 2 * processed and len(rows) <= refused_409
    counted = sum(int(_detail_field(r.record.detail, "count")) for r in rows)
    assert counted == refused_409
    assert await pair.insurer.controller.db.inbox_count() == 1


def _all(calls: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _detail_field(detail: str | None, name: str) -> str:
    for part in (detail or "").split():
        key, _, value = part.partition("=")
        if key == name:
            return value
    raise AssertionError(f"{name} not in audit detail {detail!r}")


# --- metadata ----------------------------------------------------------------------------


async def test_metadata_needs_a_registered_partner(pair: Pair) -> None:
    before = await audit_head(pair)
    stranger = make_peer(pair, "clinic-x")
    with await call(stranger.connect) as conn:
        response = await call(stranger.get, conn, "metadata")
    assert response.status == 401
    assert response.outcome and response.outcome.code == "unknown-partner"
    rows = await audit_of(pair, "message.reject", since=before)
    assert rows and rows[-1].record.subject == "metadata"
    partner = make_peer(pair)
    with await call(partner.connect) as conn:
        response = await call(partner.get, conn, "metadata")
    assert response.status == 200
    assert response.json()["resourceType"] == "CapabilityStatement"


# --- no request gets an unaudited 5xx ------------------------------------------------------


def _mutations(fresh: Any, rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Claims (each with its own identity) with one value somewhere replaced by an odd one."""
    odd: list[Any] = [
        None, "", " ", "urn:oid:1.2", 0, -1, 2**63, 1.5e308, 1e-300, True, [], {}, [None],
        {"resourceType": "Nonexistent"}, "\u0000", "\U0001f600" * 3, {"reference": "#x"},
        [{"resource": None}], "x" * 5000,
    ]
    out = []
    for _ in range(count):
        message = fresh()
        path = rng.choice(_paths(message)[1:])
        node = message
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = copy.deepcopy(rng.choice(odd))
        out.append(message)
    return out


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*path, i))
    return found


async def test_no_input_gets_a_5xx(pair: Pair, peer: Peer) -> None:
    """Senders retry 5xx (§7): a refusal that depends only on the request must be 4xx."""
    rng = random.Random(20261204)
    messages = _mutations(peer.claim, rng, 120)
    other_signature = peer.sign(peer.claim())["signature"]

    def run() -> list[tuple[int, str | None, int]]:
        seen = []
        conn = peer.connect()
        try:
            for i, message in enumerate(messages):
                # Half signed after mutation (the signature holds), half carrying the
                # signature of another message.
                signed = {**message, "signature": other_signature}
                if i % 2:
                    # A value RFC 8785 has no form for (2^63) cannot be signed at all.
                    with contextlib.suppress(rfc8785.CanonicalizationError):
                        signed = peer.sign(message)
                body = json.dumps(signed, ensure_ascii=False).encode()
                response = conn.request(
                    "POST",
                    peer.path("$process-message"),
                    body,
                    {"Content-Type": "application/fhir+json"},
                )
                outcome = response.outcome
                seen.append((response.status, outcome.code if outcome else None, i))
                if response.header("Connection") == "close":
                    conn.close()
                    conn = peer.connect()
        finally:
            conn.close()
        return seen

    seen = await call(run)
    assert all(status < 500 for status, _, _ in seen), [s for s in seen if s[0] >= 500]
    assert all(code is not None for status, code, _ in seen if status != 200)
    failures = await audit_of(pair, "request.failed")
    assert failures == []
