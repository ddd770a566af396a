"""The batch form of PROTOCOL §6b as plain data: what a receiver reads from a batch
request, what a sender reads from a batch-response and a CapabilityStatement."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from bridge.batch import (
    BatchOffer,
    batch_capability,
    batch_offer,
    encode_batch,
    encode_batch_response,
    read_batch,
    read_batch_response,
)
from bridge.errors import ParseError, PayloadTooLarge


def test_a_batch_request_round_trips_with_each_message_byte_for_byte() -> None:
    messages = [b'{"resourceType":"Bundle","type":"message","id":"a"}',
                b'{"resourceType":"Bundle","type":"message","id":"b"}']
    body = encode_batch([(messages[0], "claims-out", 7), (messages[1], None, None)])
    assert messages[0] in body and messages[1] in body
    entries = read_batch(orjson.loads(body), max_entries=2)
    assert [e.message["id"] for e in entries] == ["a", "b"]
    assert entries[0].headers == {"Bridge-Stream": "claims-out", "Bridge-Sequence": "7"}
    assert entries[1].headers == {} and all(e.error is None for e in entries)


@pytest.mark.parametrize(("body", "where"), [
    ({"resourceType": "Parameters"}, "Bundle.resourceType"),
    ({"resourceType": "Bundle", "type": "transaction", "entry": [{}]}, "Bundle.type"),
    ({"resourceType": "Bundle", "type": "batch", "entry": []}, "Bundle.entry"),
])
def test_what_is_not_a_batch_is_refused_whole_naming_where(body: object, where: str) -> None:
    with pytest.raises(ParseError) as caught:
        read_batch(body, max_entries=4)
    assert caught.value.location == where and caught.value.http_status == 400


def test_more_entries_than_offered_is_413_naming_the_bound() -> None:
    body = orjson.loads(encode_batch([(b"{}", None, None)] * 3))
    with pytest.raises(PayloadTooLarge) as caught:
        read_batch(body, max_entries=2)
    assert caught.value.location == "Bundle.entry" and "2" in caught.value.message


def test_a_malformed_entry_is_that_entry_s_error_only() -> None:
    good = {"request": {"method": "POST", "url": "$process-message"}, "resource": {"a": 1}}
    body = {"resourceType": "Bundle", "type": "batch", "entry": [
        good,
        {"request": {"method": "PUT", "url": "$process-message"}, "resource": {}},
        {"request": {"method": "POST", "url": "$process-message"}},
        {**good, "extension": [{"url": "urn:ws-fhir-bridge:ext:bridge-sequence",
                                "valueInteger": 3}]},
        "not an object",
    ]}
    entries = read_batch(body, max_entries=10)
    assert entries[0].error is None
    assert [e.error.location for e in entries[1:] if e.error] == [
        "Bundle.entry[1].request", "Bundle.entry[2].resource", "Bundle.entry[3].extension",
        "Bundle.entry[4]"]


def test_a_batch_response_answers_each_entry_in_order() -> None:
    body = encode_batch_response([(200, b'{"resourceType":"Bundle","id":"r"}'),
                                  (403, b'{"resourceType":"OperationOutcome"}')])
    parsed = orjson.loads(body)
    assert [e["response"]["status"] for e in parsed["entry"]] == ["200 OK", "403 Forbidden"]
    assert read_batch_response(parsed, 2) == [
        (200, {"resourceType": "Bundle", "id": "r"}), (403, {"resourceType": "OperationOutcome"})]
    with pytest.raises(ParseError):
        read_batch_response(parsed, 3)  # an entry left unanswered


def test_the_offer_is_read_only_when_complete() -> None:
    statement = {"resourceType": "CapabilityStatement", "rest": [{
        "mode": "server", "interaction": [{"code": "batch"}],
        "extension": [batch_capability(16, 1_000_000)]}]}
    assert batch_offer(statement) == BatchOffer(16, 1_000_000)
    no_interaction = {**statement, "rest": [{**statement["rest"][0], "interaction": []}]}
    assert batch_offer(no_interaction) is None
    assert batch_offer({"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}]}) is None
    assert batch_offer({"resourceType": "OperationOutcome"}) is None
    one = {**statement, "rest": [{**statement["rest"][0], "extension": [batch_capability(1, 9)]}]}
    assert batch_offer(one) is None  # one message per request is no batch


def test_the_batch_form_imports_no_networking() -> None:
    code = ("import sys, bridge.batch; "
            "print(sorted(m for m in ('aiohttp', 'ssl', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
