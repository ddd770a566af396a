"""The hospital's dispatcher against a partner that offers batches and answers them
wrongly (PROTOCOL §6b, P-BAT-6).

The hospital is a real ``bridge serve`` process; the partner is the standard-library
mutual-TLS receiver of ``test_dispatch_batch`` (receipts made by the conformance kit's
envelope code), here answering its first batch requests with malformed
batch-responses: receipts in the wrong slots, a receipt of one message in every slot,
too few entries, a 200 entry without a receipt, entry statuses that are neither a
receipt nor a refusal, and an entry 500. No claim may be acknowledged without its own
verified receipt, and none may be refused or given up for such an answer.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from delivery_support import link_settings
from ops_support import serve
from reliability_support import enqueue, outbox_states, wait_settled
from test_dispatch_batch import ScriptedReceiver, settle_against, stored_receipts

from bridge.conformance.envelope import sign_message
from bridge.conformance.sender_role import make_receipt
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki

MODES = ("swap", "one-for-all", "short", "null", "201", "302", "100", "500", "fat", "fat",
         "swap")


class HostileReceiver(ScriptedReceiver):
    def __init__(self, pki: Path, port: int) -> None:
        super().__init__(pki, port, max_entries=4)
        self.batches = 0
        self.hostile_ids: set[str] = set()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if not (method == "POST" and path == "/fhir"):
            if method == "POST":
                message = json.loads(body)
                receipt = make_receipt(message, receiver="insurer-b", sender="hospital-a",
                                       key=self.key)
                return 200, json.dumps(receipt).encode()
            return super().handle(method, path, body)
        messages = [e["resource"] for e in json.loads(body)["entry"]]
        with self.lock:
            mode = MODES[self.batches] if self.batches < len(MODES) else "honest"
            self.batches += 1
            if mode != "honest":
                self.hostile_ids.update(m["identifier"]["value"] for m in messages)
        receipts = [make_receipt(m, receiver="insurer-b", sender="hospital-a", key=self.key)
                    for m in messages]
        entries: list[dict[str, Any]] = [
            {"response": {"status": "200 OK"}, "resource": r} for r in receipts]
        if mode == "swap":
            entries = entries[1:] + entries[:1]
        elif mode == "one-for-all":
            entries = [entries[0] for _ in entries]
            entries[0] = {"response": {"status": "500 Internal Server Error"},
                          "outcome": {"resourceType": "OperationOutcome", "issue": []}}
        elif mode == "short":
            entries = entries[:-1]
        elif mode == "null":
            entries = [{"response": {"status": "200 OK"}, "resource": None} for _ in entries]
        elif mode in ("201", "302", "100"):
            entries = [{"response": {"status": mode}, "resource": r} for r in receipts]
        elif mode == "fat":
            # A receipt that verifies (signed with the padding in it) but is larger than
            # a receipt may be (PROTOCOL P-HTTP-6: 1 MiB): only that bound refuses it.
            # One such entry: the answer as a whole stays within the batch's bound.
            fat = {k: v for k, v in receipts[0].items() if k != "signature"}
            fat["entry"] = [*fat["entry"], {"resource": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational",
                           "diagnostics": "x" * (1024 * 1024 + 1)}]}}]
            entries[0]["resource"] = sign_message(fat, self.key, iss="insurer-b",
                                                  aud="hospital-a")
        elif mode == "500":
            entries = [{"response": {"status": "500"},
                        "outcome": {"resourceType": "OperationOutcome", "issue": []}}
                       for _ in entries]
        return 200, json.dumps({"resourceType": "Bundle", "type": "batch-response",
                                "entry": entries}).encode()


async def test_malformed_batch_responses_never_ack_or_refuse(tmp_path: Path) -> None:
    receiver, ids, states, store = await settle_against(tmp_path, HostileReceiver, claims=8,
                                                        seed=5)
    assert {states[m] for m in ids} == {"acked"}, states
    assert receiver.hostile_ids
    assert {states[m] for m in ids} == {"acked"}, states
    receipts = stored_receipts(store)
    for message_id in ids:
        assert len(receipts[message_id]) <= 1024 * 1024
        text = bytes(receipts[message_id]).decode()
        # Each acknowledgement rests on the receipt of its own message.
        assert message_id in text
        assert not [other for other in ids if other != message_id and other in text]
    assert receiver.batches > len(MODES), receiver.batches


class NoReceiptReceiver(HostileReceiver):
    """Answers every message without a receipt: ``null`` or a 202 alone, a null
    resource or a ``201`` entry in a batch."""

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "POST" and path == "/fhir/$process-message":
            with self.lock:
                self.requests.append((path, []))
                odd = len(self.requests) % 2
            # A receipt-less 200, or a 202 (as an asynchronous FHIR server might).
            return (200, b"null") if odd else (202, b"")
        if method == "POST" and path == "/fhir":
            count = len(json.loads(body)["entry"])
            with self.lock:
                self.batches += 1
                odd = self.batches % 2
            entry = ({"response": {"status": "200 OK"}, "resource": None} if odd
                     else {"response": {"status": "201 Created"}, "resource": None})
            return 200, json.dumps({"resourceType": "Bundle", "type": "batch-response",
                                    "entry": [entry] * count}).encode()
        return super().handle(method, path, body)


async def test_an_answer_without_a_receipt_is_never_given_up(tmp_path: Path) -> None:
    """A 200 the partner sent may mean it holds the claim: however long it goes on, the
    claim is resent, never dead-lettered (its fate is unknown) nor refused."""
    pki = tmp_path / "pki"
    init_dev_pki(pki, ["hospital-a", "insurer-b"], now=datetime.now(UTC) - timedelta(days=1))
    port = free_port()
    hospital_cfg, _ = write_configs(tmp_path, free_port(), port)
    link_settings(hospital_cfg, retry_base_seconds=0.1, retry_cap_seconds=0.2,
                  probe_cap_seconds=0.2, give_up_after=0.5)
    ids = await enqueue(hospital_cfg, 5, seed=9)  # a batch of four and one alone
    receiver = NoReceiptReceiver(pki, port)
    receiver.start()
    hospital = await asyncio.to_thread(serve, hospital_cfg)
    try:
        store = tmp_path / "hospital-a" / "bridge.sqlite"
        for _ in range(50):
            await asyncio.sleep(0.2)
            if receiver.batches >= 4:
                break
        await asyncio.sleep(1.0)
        states = outbox_states(store)
    finally:
        await asyncio.to_thread(hospital.stop)
        receiver.stop()
    assert not {states[m] for m in ids} & {"dead", "rejected", "acked"}, states
    assert receiver.batches >= 4, receiver.batches
    singles = [p for p, _ in receiver.requests if p.endswith("$process-message")]
    assert len(singles) >= 2, receiver.requests


class WithdrawingReceiver(HostileReceiver):
    """Offers batches and answers the first one; then no longer offers them and has no
    batch route (a partner downgraded mid-run)."""

    def capability(self) -> dict[str, Any]:
        capability = super().capability()
        if self.batches:
            del capability["rest"][0]["interaction"], capability["rest"][0]["extension"]
        return capability

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "POST" and path == "/fhir":
            with self.lock:
                withdrawn = self.batches > 0
                self.batches += 1
            if withdrawn:
                return 404, b'{"resourceType":"OperationOutcome","issue":[]}'
            messages = [e["resource"] for e in json.loads(body)["entry"]]
            entries = [{"response": {"status": "200 OK"},
                        "resource": make_receipt(m, receiver="insurer-b", sender="hospital-a",
                                                 key=self.key)} for m in messages]
            with self.lock:
                self.requests.append((path, [m["identifier"]["value"] for m in messages]))
            return 200, json.dumps({"resourceType": "Bundle", "type": "batch-response",
                                    "entry": entries}).encode()
        if method == "POST":
            with self.lock:
                self.requests.append((path, [json.loads(body)["identifier"]["value"]]))
        return super().handle(method, path, body)


async def test_a_partner_that_stops_offering_batches_gets_one_by_one(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki, ["hospital-a", "insurer-b"], now=datetime.now(UTC) - timedelta(days=1))
    port = free_port()
    hospital_cfg, _ = write_configs(tmp_path, free_port(), port)
    link_settings(hospital_cfg, retry_base_seconds=0.1, retry_cap_seconds=0.2,
                  probe_cap_seconds=0.2, capability_ttl_seconds=0.5)
    first = await enqueue(hospital_cfg, 4, seed=11)
    receiver = WithdrawingReceiver(pki, port)
    receiver.start()
    hospital = await asyncio.to_thread(serve, hospital_cfg)
    try:
        store = tmp_path / "hospital-a" / "bridge.sqlite"
        await wait_settled(store, first, timeout=30)
        # More claims after the partner withdrew its offer.
        later = await enqueue(hospital_cfg, 8, seed=12, first=100)
        await wait_settled(store, later, timeout=60)
        states = outbox_states(store)
    finally:
        await asyncio.to_thread(hospital.stop)
        receiver.stop()
    assert {states[m] for m in first + later} == {"acked"}, states
    assert receiver.batches >= 1
    singles = [ids for path, ids in receiver.requests if path.endswith("$process-message")]
    assert {m for ids in singles for m in ids} >= set(later)
