"""Hand-off of received claims to the receiver's own systems: routes, states, envelope.

This module is pure (no I/O, no clock): which destinations take a claim, the
hand-off state machine as a table, when to give up, and the envelope the
destination receives. The queue lives in :mod:`bridge.ledger.handoff`; the worker
that drains it over HTTP or AMQP in :mod:`bridge.link.handoff`.

States (invariants the table enforces):

1. A hand-off is created ``queued`` in the same transaction as the inbox row it
   refers to, so a claim the sender holds a receipt for is always queued, and
   nothing is queued that was not stored.
2. Only a claim moves it to ``sending``; the claim is a lease. A ``sending`` row
   whose lease has expired (the worker died) may be claimed again: the destination
   may then receive it twice, which the message identity lets it recognise.
3. ``delivered`` is reached only from ``sending`` on the destination's positive
   answer (HTTP 2xx, a broker's publisher confirm).
4. ``dead`` is reached from ``sending`` when a failure happens after the give-up
   duration; it waits for an operator. ``requeue`` takes a ``dead`` (or, to hand a
   claim over again, a ``delivered``) row back to ``queued``, due at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

ENVELOPE_TYPE = "ws-fhir-bridge.handoff"
ENVELOPE_VERSION = 1


class HandoffState(StrEnum):
    """States of a hand-off row (the values are what the store writes)."""

    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


_Q, _S, _D, _X = (
    HandoffState.QUEUED,
    HandoffState.SENDING,
    HandoffState.DELIVERED,
    HandoffState.DEAD,
)

# (from, to) -> the event that causes it. Anything absent is forbidden.
TRANSITIONS: dict[tuple[HandoffState, HandoffState], str] = {
    (_Q, _S): "claim",
    (_S, _S): "reclaim after lease expiry",
    (_S, _D): "destination took it (2xx, publisher confirm)",
    (_S, _Q): "failure, retry later; or released unattempted",
    (_S, _X): "failure after the give-up duration",
    (_X, _Q): "operator requeue",
    (_D, _Q): "operator requeue (hand over again)",
}

WAITING: frozenset[HandoffState] = frozenset({_Q, _S})
REQUEUEABLE: frozenset[HandoffState] = frozenset({_X, _D})


def allowed(from_state: str, to_state: str) -> bool:
    """Whether ``from_state -> to_state`` is in :data:`TRANSITIONS`."""
    try:
        return (HandoffState(from_state), HandoffState(to_state)) in TRANSITIONS
    except ValueError:
        return False


@dataclass(frozen=True)
class Route:
    """Which claims one destination takes: from these senders, on these links (empty = all)."""

    destination: str
    senders: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()

    def takes(self, sender: str, link: str) -> bool:
        return (not self.senders or sender in self.senders) and (
            not self.links or link in self.links
        )


def routes(destinations: Iterable[Any]) -> tuple[Route, ...]:
    """Routes from configured destinations (anything with ``id``, ``senders``, ``links``)."""
    return tuple(
        Route(d.id, frozenset(d.senders), frozenset(d.links)) for d in destinations
    )


def destinations_for(all_routes: Iterable[Route], sender: str, link: str) -> list[str]:
    """The destinations that take a claim from ``sender`` on ``link``, in configured order."""
    return [r.destination for r in all_routes if r.takes(sender, link)]


def gives_up(due_since: datetime, now: datetime, give_up_after: float) -> bool:
    """Whether a failure at ``now`` of a hand-off due since ``due_since`` makes it dead."""
    return now - due_since >= timedelta(seconds=give_up_after)


def receipt_digest(receipt: bytes) -> str:
    """``sha256:<hex>`` of the receipt exactly as issued (the bytes the sender holds)."""
    return "sha256:" + hashlib.sha256(receipt).hexdigest()


@dataclass(frozen=True)
class EnvelopeFacts:
    """What the destination is told about one claim beside the message and receipt."""

    destination: str
    receiver: str
    sender: str
    link: str
    message_id: str
    sequence: int
    received: str  # fixed-width UTC ISO
    audit_seq: int
    message_digest: str
    receipt_digest: str

    def headers(self) -> dict[str, str]:
        """The same facts as HTTP headers (AMQP uses them lower-cased)."""
        return {
            "X-Bridge-Message-Id": self.message_id,
            "X-Bridge-Sender": self.sender,
            "X-Bridge-Receiver": self.receiver,
            "X-Bridge-Link": self.link,
            "X-Bridge-Destination": self.destination,
            "X-Bridge-Sequence": str(self.sequence),
            "X-Bridge-Audit-Seq": str(self.audit_seq),
            "X-Bridge-Message-Digest": self.message_digest,
            "X-Bridge-Receipt-Digest": self.receipt_digest,
            "Idempotency-Key": f"{self.sender} {self.message_id}",
        }


def _json_string(value: str) -> bytes:
    # Ids, digests and times only: JSON-escape them without importing a serialiser.
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out).encode("utf-8")


def build_envelope(facts: EnvelopeFacts, message: bytes, receipt: bytes) -> bytes:
    """The hand-off body: a JSON object with the facts, and the signed message and the
    receipt spliced in byte for byte as they were received and issued (not re-serialised,
    so the sender's signature and the receipt digest still check against them)."""
    members: Mapping[str, bytes] = {
        "envelope": _json_string(ENVELOPE_TYPE),
        "version": str(ENVELOPE_VERSION).encode(),
        "destination": _json_string(facts.destination),
        "receiver": _json_string(facts.receiver),
        "sender": _json_string(facts.sender),
        "link": _json_string(facts.link),
        "messageId": _json_string(facts.message_id),
        "sequence": str(int(facts.sequence)).encode(),
        "receivedAt": _json_string(facts.received),
        "auditSeq": str(int(facts.audit_seq)).encode(),
        "messageDigest": _json_string(facts.message_digest),
        "receiptDigest": _json_string(facts.receipt_digest),
        "message": bytes(message).strip(),
        "receipt": bytes(receipt).strip(),
    }
    return b"{" + b",".join(_json_string(k) + b":" + v for k, v in members.items()) + b"}"


__all__ = [
    "ENVELOPE_TYPE",
    "ENVELOPE_VERSION",
    "REQUEUEABLE",
    "TRANSITIONS",
    "WAITING",
    "EnvelopeFacts",
    "HandoffState",
    "Route",
    "allowed",
    "build_envelope",
    "destinations_for",
    "gives_up",
    "receipt_digest",
    "routes",
]
