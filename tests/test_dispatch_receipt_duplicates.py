"""A receipt whose JSON names a member twice is not evidence (PROTOCOL §5, P-SIG-12), and
one that does not say ok is not delivery (P-RCP-5).

No signature covers ``Bundle.signature``; a receipt written with ``who`` twice, the
first carrying a ``display``, verifies under a parser that keeps the last of the two,
while its stored bytes, read by a parser that keeps the first, say something the
receiver never signed. The hospital is a real ``bridge serve`` process; the receiver is
the standard-library mutual-TLS server of tests/test_dispatch_batch.py (receipts made
by the conformance kit's envelope code), offering no batches. Its first answer to each
claim is such a receipt, its second an honest one: every claim must end acknowledged on
the honest receipt, and no stored receipt may carry the unsigned text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_dispatch_batch import ScriptedReceiver, settle_against, stored_receipts

from bridge.conformance.sender_role import make_receipt

UNSIGNED = "NOT SIGNED BY THE RECEIVER"


def twice_named_who(receipt: dict[str, Any]) -> bytes:
    """``receipt`` written with ``Bundle.signature.who`` twice: first with a display,
    then as signed."""
    signature = receipt["signature"]
    forged = {**signature["who"], "display": UNSIGNED}
    members = [f'"{k}":{json.dumps(v)}' for k, v in signature.items() if k != "who"]
    text = ",".join([f'"who":{json.dumps(forged)}', *members,
                     f'"who":{json.dumps(signature["who"])}'])
    rest = json.dumps({k: v for k, v in receipt.items() if k != "signature"})
    return (rest[:-1] + ',"signature":{' + text + "}}").encode()


class DuplicatingReceiver(ScriptedReceiver):
    def capability(self) -> dict[str, Any]:
        offer = super().capability()
        del offer["rest"][0]["extension"], offer["rest"][0]["interaction"]
        return offer

    def answer(self, message: dict[str, Any]) -> tuple[int, bytes]:
        identity = message["identifier"]["value"]
        with self.lock:
            nth = self.seen.get(identity, 0)
            self.seen[identity] = nth + 1
        receipt = make_receipt(message, receiver="insurer-b", sender="hospital-a", key=self.key)
        return 200, twice_named_who(receipt) if nth == 0 else json.dumps(receipt).encode()


def test_the_forged_bytes_read_as_the_signed_receipt_under_last_wins() -> None:
    # The premise: a last-wins parser (orjson, the standard library) reads the forged
    # bytes as the receipt as signed; a first-wins parser reads the unsigned display.
    receipt = {"resourceType": "Bundle", "signature": {
        "type": [{"system": "s", "code": "c"}], "when": "2026-01-01T00:00:00Z",
        "who": {"identifier": {"system": "p", "value": "insurer-b"}},
        "sigFormat": "application/jose", "data": "AA=="}}
    raw = twice_named_who(receipt)
    assert json.loads(raw) == receipt
    first_wins = json.loads(raw, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert first_wins["signature"]["who"]["display"] == UNSIGNED


async def test_a_receipt_naming_a_member_twice_is_not_acknowledged(tmp_path: Path) -> None:
    receiver, ids, states, store = await settle_against(tmp_path, DuplicatingReceiver,
                                                        claims=3, seed=7)
    assert {states[m] for m in ids} == {"acked"}, states
    # Each claim was answered twice: the forged receipt was refused, the honest one kept.
    assert all(receiver.seen[m] >= 2 for m in ids), receiver.seen
    receipts = stored_receipts(store)
    for message_id in ids:
        assert UNSIGNED.encode() not in receipts[message_id]
        assert receipts[message_id].count(b'"who"') == 1


class NotOkReceiver(DuplicatingReceiver):
    """Answers each claim first with a signed receipt saying ``fatal-error``, then with
    one saying ``transient-error``, then with an ``ok`` one."""

    def answer(self, message: dict[str, Any]) -> tuple[int, bytes]:
        identity = message["identifier"]["value"]
        with self.lock:
            nth = self.seen.get(identity, 0)
            self.seen[identity] = nth + 1
        outcome = ("fatal-error", "transient-error", "ok")[min(nth, 2)]
        receipt = make_receipt(message, receiver="insurer-b", sender="hospital-a",
                               key=self.key, outcome=outcome)
        return 200, json.dumps(receipt).encode()


async def test_a_signed_receipt_that_does_not_say_ok_is_not_delivery(tmp_path: Path) -> None:
    # PROTOCOL P-RCP-5: only a receipt saying ok acknowledges; the claim stays due and
    # is sent again with its identity until one does.
    receiver, ids, states, store = await settle_against(tmp_path, NotOkReceiver,
                                                        claims=3, seed=9)
    assert {states[m] for m in ids} == {"acked"}, states
    assert all(receiver.seen[m] == 3 for m in ids), receiver.seen
    receipts = stored_receipts(store)
    for message_id in ids:
        code = json.loads(receipts[message_id])["entry"][0]["resource"]["response"]["code"]
        assert code == "ok"
