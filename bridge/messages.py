"""FHIR message envelopes for the claim push (pure functions, no I/O).

A claim travels as a Bundle of type ``message``: ``MessageHeader`` first, then the
resources of the minimised collection. The bundle's ``identifier`` is the message
identity, which is also the idempotency key at the receiver.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from bridge.errors import MappingError, ParseError

EVENT_SYSTEM = "urn:ws-fhir-bridge:event"
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
MESSAGE_NAMESPACE = uuid.UUID("4d0c7a0e-6b53-5d1f-9a57-2b1e1f0e6a10")


def message_id_for(sender: str, link: str, source_key: str) -> str:
    """Deterministic message identity: the same claim from the same link keeps its id.

    Re-submitting a record therefore cannot create a second claim at the receiver.
    """
    return "urn:uuid:" + str(uuid.uuid5(MESSAGE_NAMESPACE, f"{sender}\x1f{link}\x1f{source_key}"))


def wrap_message(
    collection: dict[str, Any],
    *,
    message_id: str,
    event: str,
    sender: str,
    receiver: str,
    source_endpoint: str,
    destination_endpoint: str,
    now: datetime,
    focus_type: str = "Claim",
) -> dict[str, Any]:
    """Wrap the resources of a collection bundle into a message bundle."""
    entries = list(collection.get("entry") or [])
    focus = [
        {"reference": e["fullUrl"]}
        for e in entries
        if e.get("resource", {}).get("resourceType") == focus_type and "fullUrl" in e
    ]
    header_id = str(uuid.uuid5(MESSAGE_NAMESPACE, message_id + "#header"))
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": EVENT_SYSTEM, "code": event},
        "destination": [
            {
                "endpoint": destination_endpoint,
                "receiver": {"identifier": {"system": PARTNER_SYSTEM, "value": receiver}},
            }
        ],
        "sender": {"identifier": {"system": PARTNER_SYSTEM, "value": sender}},
        "source": {"endpoint": source_endpoint, "software": "ws-fhir-bridge"},
    }
    if focus:
        header["focus"] = focus
    return {
        "resourceType": "Bundle",
        "id": message_id.removeprefix("urn:uuid:"),
        "identifier": {"system": "urn:ietf:rfc:3986", "value": message_id},
        "type": "message",
        "timestamp": now.isoformat(timespec="seconds"),
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }


def message_identity(bundle: Any) -> tuple[str, dict[str, Any]]:
    """Check the envelope shape of a received message; return its id and header.

    Raises ParseError for a shape that is not a FHIR message at all.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ParseError("body is not a FHIR Bundle", location="Bundle.resourceType")
    if bundle.get("type") != "message":
        raise ParseError("Bundle.type must be 'message'", location="Bundle.type")
    ident = bundle.get("identifier")
    msg_id = ident.get("value") if isinstance(ident, dict) else None
    if not isinstance(msg_id, str) or not msg_id:
        raise ParseError("message has no identity", location="Bundle.identifier.value")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise ParseError("message has no entries", location="Bundle.entry")
    first = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "MessageHeader":
        raise ParseError("first entry must be a MessageHeader", location="Bundle.entry[0].resource")
    return msg_id, first


def header_event(header: dict[str, Any]) -> str:
    coding = header.get("eventCoding")
    if not isinstance(coding, dict) or coding.get("system") != EVENT_SYSTEM:
        raise MappingError("unsupported message event", location="MessageHeader.eventCoding")
    return str(coding.get("code"))


def collection_of(message: dict[str, Any]) -> dict[str, Any]:
    """The message's resources without the header, as a collection bundle."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [e for e in message.get("entry", [])[1:]],
    }
