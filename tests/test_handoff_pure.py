"""The pure part of the hand-off: routes, the state table, give-up, the envelope."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from bridge.handoff import (
    TRANSITIONS,
    EnvelopeFacts,
    HandoffState,
    Route,
    allowed,
    build_envelope,
    destinations_for,
    gives_up,
    receipt_digest,
)

FACTS = EnvelopeFacts(
    destination="claims", receiver="insurer-b", sender='odd"sender\\', link="in",
    message_id="urn:uuid:1", sequence=7, received="2026-12-01T08:00:00.000000+00:00",
    audit_seq=42, message_digest="sha256:ab", receipt_digest="sha256:cd",
)


def test_the_envelope_carries_message_and_receipt_byte_for_byte() -> None:
    message = b'{"resourceType":"Bundle","total":250.10,"x":"\\u4e2d"}'
    receipt = b'{"resourceType":"Bundle","type":"message"}'
    body = build_envelope(FACTS, message, receipt)
    doc = json.loads(body)
    assert doc["sender"] == 'odd"sender\\' and doc["sequence"] == 7 and doc["auditSeq"] == 42
    assert doc["envelope"] == "ws-fhir-bridge.handoff" and doc["version"] == 1
    # Spliced, not re-serialised: the number keeps its trailing zero.
    assert b'"message":' + message in body and b'"receipt":' + receipt in body
    assert receipt_digest(receipt) == "sha256:" + hashlib.sha256(receipt).hexdigest()


def test_headers_name_the_identity_a_consumer_deduplicates_on() -> None:
    h = FACTS.headers()
    assert h["Idempotency-Key"] == f"{FACTS.sender} urn:uuid:1"
    assert h["X-Bridge-Sequence"] == "7" and h["X-Bridge-Audit-Seq"] == "42"


def test_routes_take_senders_and_links_or_everything() -> None:
    routes = (Route("all"), Route("a-only", senders=frozenset({"a"})),
              Route("link-2", links=frozenset({"l2"})))
    assert destinations_for(routes, "a", "l1") == ["all", "a-only"]
    assert destinations_for(routes, "b", "l2") == ["all", "link-2"]


def test_the_state_table_has_no_way_out_of_delivered_but_an_operator() -> None:
    assert allowed("sending", "delivered") and not allowed("queued", "delivered")
    assert allowed("dead", "queued") and not allowed("dead", "sending")
    assert {t for (f, t) in TRANSITIONS if f == HandoffState.DELIVERED} == {HandoffState.QUEUED}
    assert not allowed("bogus", "queued")


def test_give_up_counts_from_when_the_claim_was_queued() -> None:
    t = datetime(2026, 12, 1, tzinfo=UTC)
    assert not gives_up(t, t + timedelta(seconds=59), 60)
    assert gives_up(t, t + timedelta(seconds=60), 60)


def test_the_pure_room_imports_no_io() -> None:
    code = ("import sys, bridge.handoff; "
            "print(sorted(m for m in ('asyncio', 'aiohttp', 'aio_pika', 'ssl', 'sqlite3',"
            " 'psycopg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
