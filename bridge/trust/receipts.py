"""Signed receipts: the receiver's signed word that it handled a message.

A receipt is a FHIR R4 ``Bundle`` of type ``message`` (a response message):

* ``Bundle.identifier.value`` = ``urn:uuid:<uuid5(RECEIPT_NAMESPACE, request message id
  + U+0000 + receiver)>``, so one request has exactly one receipt identity at a given
  receiver. ``RECEIPT_NAMESPACE`` is ``3d3b185e-0ea4-5090-8cf1-41374f3bbbe3``, itself
  uuid5 of the URL namespace and ``urn:ws-fhir-bridge:receipt`` (PROTOCOL §6.2).
* ``entry[0]`` is a ``MessageHeader`` with ``eventCoding`` ``urn:ws-fhir-bridge:event``
  ``receipt``; ``source.endpoint`` the receiver (its base URL, or its partner URN);
  ``destination[0].receiver`` and ``sender`` name the controllers by
  ``urn:ws-fhir-bridge:partner`` identifiers; ``response.identifier`` is the uuid of
  the request message id (R4 types it ``id``, so the ``urn:uuid:`` prefix is dropped)
  and ``response.code`` is ``ok``, ``transient-error`` or ``fatal-error``.
* ``MessageHeader.extension`` records what the receipt vouches for, with these URLs:

  ==========================================  ==============  ==============================
  url                                         value[x]        meaning
  ==========================================  ==============  ==============================
  urn:ws-fhir-bridge:ext:request-message-id   valueString     request Bundle.identifier.value
  urn:ws-fhir-bridge:ext:request-digest       valueString     digest() of the request payload
  urn:ws-fhir-bridge:ext:audit-seq            valueInteger    receiver's audit entry number
  urn:ws-fhir-bridge:ext:audit-hash           valueString     hash of that audit entry
  urn:ws-fhir-bridge:ext:audit-checkpoint     valueString     receiver's signed checkpoint of
                                                              its log ending at that entry
  urn:ws-fhir-bridge:ext:audit-proof          valueString     inclusion proof of the entry in
                                                              it (base64 hashes, space-separated)
  ==========================================  ==============  ==============================

  The last two make the receipt prove that the entry is in the receiver's log, not
  only name it: a later checkpoint of that log must extend this one (PROTOCOL §9.6).

* When there are issues, ``entry[1]`` is an ``OperationOutcome`` holding them and
  ``response.details`` refers to it.

The receipt is signed with :func:`~bridge.trust.jws.sign_bundle` by the receiver
(``iss``) for the original sender (``aud``). A duplicate request gets the *original*
receipt back, which may be older than the replay window: receipts are evidence, and
their freshness is not what matters, so senders verify them with ``check_time=False``.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bridge.errors import SignatureError, is_fhir_id
from bridge.ledger import merkle
from bridge.ledger.audit import leaf_from_hash
from bridge.trust.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from bridge.trust.jws import (
    PARTNER_SYSTEM,
    KeyRing,
    SignedClaims,
    Signer,
    SigningError,
    sign_bundle,
    verify_bundle,
)
from bridge.uuids import uuid5_text

Outcome = Literal["ok", "fatal-error", "transient-error"]
OUTCOMES: frozenset[str] = frozenset({"ok", "fatal-error", "transient-error"})

EVENT_SYSTEM = "urn:ws-fhir-bridge:event"
EXT_PREFIX = "urn:ws-fhir-bridge:ext:"
EXT_REQUEST_MESSAGE_ID = EXT_PREFIX + "request-message-id"
EXT_REQUEST_DIGEST = EXT_PREFIX + "request-digest"
EXT_AUDIT_SEQ = EXT_PREFIX + "audit-seq"
EXT_AUDIT_HASH = EXT_PREFIX + "audit-hash"
EXT_AUDIT_CHECKPOINT = EXT_PREFIX + "audit-checkpoint"
EXT_AUDIT_PROOF = EXT_PREFIX + "audit-proof"

#: Namespace of receipt identities (uuid5 of the URL-style name below).
RECEIPT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ws-fhir-bridge:receipt")

_INT32_MAX = 2**31 - 1
_MH = "Bundle.entry[0].resource"


def receipt_id(request_message_id: str, receiver: str) -> str:
    """The receipt identity (``urn:uuid:…``) for a request at ``receiver``."""
    return f"urn:uuid:{uuid5_text(RECEIPT_NAMESPACE, request_message_id + chr(0) + receiver)}"


def _response_identifier(request_message_id: str) -> str:
    bare = request_message_id.removeprefix("urn:uuid:")
    if not is_fhir_id(bare):
        raise SigningError(
            "request message id cannot be expressed as a FHIR id",
            location="MessageHeader.response.identifier",
        )
    return bare


def make_receipt(
    *,
    request_message_id: str,
    request_digest: str,
    outcome: Outcome,
    receiver: str,
    sender: str,
    audit_seq: int,
    audit_hash: str,
    signer: Signer,
    now: datetime,
    issues: list[dict[str, Any]] | None = None,
    source_endpoint: str | None = None,
    destination_endpoint: str | None = None,
    audit_checkpoint: str | None = None,
    audit_proof: Sequence[bytes] = (),
) -> dict[str, Any]:
    """Build and sign the receipt ``receiver`` returns to ``sender`` for one request.

    ``issues`` are OperationOutcome.issue dicts (locations only, no health data).
    ``source_endpoint``/``destination_endpoint`` default to the partner URNs.
    """
    if outcome not in OUTCOMES:
        raise SigningError("unknown receipt outcome", location="MessageHeader.response.code")
    if not 0 <= audit_seq <= _INT32_MAX:
        raise SigningError("audit sequence out of FHIR integer range", location=EXT_AUDIT_SEQ)
    own_id = receipt_id(request_message_id, receiver)
    bare = own_id.removeprefix("urn:uuid:")
    header_id = uuid5_text(RECEIPT_NAMESPACE, bare + chr(0) + "MessageHeader")
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "extension": [
            {"url": EXT_REQUEST_MESSAGE_ID, "valueString": request_message_id},
            {"url": EXT_REQUEST_DIGEST, "valueString": request_digest},
            {"url": EXT_AUDIT_SEQ, "valueInteger": audit_seq},
            {"url": EXT_AUDIT_HASH, "valueString": audit_hash},
        ],
        "eventCoding": {"system": EVENT_SYSTEM, "code": "receipt"},
        "destination": [
            {
                "endpoint": destination_endpoint or f"{PARTNER_SYSTEM}:{sender}",
                "receiver": {"identifier": {"system": PARTNER_SYSTEM, "value": sender}},
            }
        ],
        "sender": {"identifier": {"system": PARTNER_SYSTEM, "value": receiver}},
        "source": {"endpoint": source_endpoint or f"{PARTNER_SYSTEM}:{receiver}"},
        "response": {"identifier": _response_identifier(request_message_id), "code": outcome},
    }
    if audit_checkpoint is not None:
        header["extension"].append({"url": EXT_AUDIT_CHECKPOINT, "valueString": audit_checkpoint})
        # valueString may not be empty in FHIR: a tree of one entry has no proof to carry.
        if audit_proof:
            header["extension"].append({"url": EXT_AUDIT_PROOF, "valueString": " ".join(
                base64.b64encode(h).decode() for h in audit_proof)})
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}]
    if issues:
        outcome_id = uuid5_text(RECEIPT_NAMESPACE, bare + chr(0) + "OperationOutcome")
        entries.append(
            {
                "fullUrl": f"urn:uuid:{outcome_id}",
                "resource": {
                    "resourceType": "OperationOutcome",
                    "id": outcome_id,
                    "issue": list(issues),
                },
            }
        )
        header["response"]["details"] = {"reference": f"urn:uuid:{outcome_id}"}
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bare,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": own_id},
        "type": "message",
        "timestamp": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "entry": entries,
    }
    return sign_bundle(bundle, signer, issuer=receiver, audience=sender, message_id=own_id, now=now)


@dataclass(frozen=True)
class Receipt:
    """A verified receipt."""

    outcome: Outcome
    audit_seq: int
    audit_hash: str
    request_message_id: str
    request_digest: str
    receipt_id: str
    issues: tuple[dict[str, Any], ...]
    claims: SignedClaims
    #: The receiver's checkpoint that includes the audit entry, when the receipt has one.
    checkpoint: Checkpoint | None = None


def _bad(message: str, location: str) -> SignatureError:
    return SignatureError(message, location=location)


def verify_receipt(
    receipt: dict[str, Any],
    keyring: KeyRing,
    *,
    expected_issuer: str,
    expected_audience: str,
    request_message_id: str,
    request_digest: str | Collection[str] | None,
    now: datetime,
    window: timedelta = timedelta(minutes=5),
    check_time: bool = True,
) -> Receipt:
    """Verify a receipt's signature and that it answers the given request, or raise.

    ``expected_issuer`` is the receiver that should have signed it, and
    ``expected_audience`` ourselves. ``request_digest`` None skips the digest
    comparison (when the sender no longer holds it); several digests (the request under
    each accepted signed form, :func:`bridge.trust.jws.payload_digests`) accept any. Pass ``check_time=False`` for
    receipts returned to a resend or read back from storage.
    Raises :class:`SignatureError` or :class:`ReplayError`.
    """
    claims = verify_bundle(
        receipt,
        keyring,
        expected_issuer=expected_issuer,
        expected_audience=expected_audience,
        now=now,
        window=window,
        check_time=check_time,
    )
    if receipt.get("type") != "message":
        raise _bad("receipt must be a message bundle", "Bundle.type")
    if claims.message_id != receipt_id(request_message_id, expected_issuer):
        raise _bad("receipt identity does not belong to this request", "Bundle.identifier.value")
    entries = receipt.get("entry")
    header = (
        entries[0].get("resource")
        if isinstance(entries, list) and entries and isinstance(entries[0], dict)
        else None
    )
    if not isinstance(header, dict) or header.get("resourceType") != "MessageHeader":
        raise _bad("receipt does not start with a MessageHeader", _MH)
    event = header.get("eventCoding") or {}
    if event.get("system") != EVENT_SYSTEM or event.get("code") != "receipt":
        raise _bad("MessageHeader is not a receipt event", f"{_MH}.eventCoding")
    response = header.get("response") or {}
    outcome = response.get("code")
    if outcome not in OUTCOMES:
        raise _bad("unknown receipt outcome", f"{_MH}.response.code")
    if response.get("identifier") != request_message_id.removeprefix("urn:uuid:"):
        raise _bad("receipt answers another message", f"{_MH}.response.identifier")
    ext: dict[str, Any] = {}
    for item in header.get("extension") or []:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            value = item.get("valueString", item.get("valueInteger"))
            ext[item["url"]] = value
    if ext.get(EXT_REQUEST_MESSAGE_ID) != request_message_id:
        raise _bad("receipt answers another message", f"{_MH}.extension({EXT_REQUEST_MESSAGE_ID})")
    got_digest = ext.get(EXT_REQUEST_DIGEST)
    if not isinstance(got_digest, str):
        raise _bad("receipt lacks the request digest", f"{_MH}.extension({EXT_REQUEST_DIGEST})")
    expected = {request_digest} if isinstance(request_digest, str) else request_digest
    if expected is not None and got_digest not in expected:
        raise _bad("receipt covers different content", f"{_MH}.extension({EXT_REQUEST_DIGEST})")
    seq, audit_hash = ext.get(EXT_AUDIT_SEQ), ext.get(EXT_AUDIT_HASH)
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(audit_hash, str):
        raise _bad("receipt lacks the receiver's audit entry", f"{_MH}.extension({EXT_AUDIT_SEQ})")
    checkpoint = _included(ext, keyring, expected_issuer, seq, audit_hash)
    issues: tuple[dict[str, Any], ...] = ()
    for entry in entries[1:] if isinstance(entries, list) else ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            issues = tuple(resource.get("issue") or ())
    return Receipt(
        outcome=outcome,
        audit_seq=seq,
        audit_hash=audit_hash,
        request_message_id=request_message_id,
        request_digest=got_digest,
        receipt_id=claims.message_id,
        issues=issues,
        claims=claims,
        checkpoint=checkpoint,
    )


def _included(ext: dict[str, Any], keyring: KeyRing, issuer: str, seq: int,
              audit_hash: str) -> Checkpoint | None:
    """The receipt's checkpoint, checked to be signed by ``issuer`` and to include entry ``seq``."""
    note = ext.get(EXT_AUDIT_CHECKPOINT)
    if note is None:
        return None
    where = f"{_MH}.extension({EXT_AUDIT_CHECKPOINT})"
    if not isinstance(note, str):
        raise _bad("audit checkpoint must be a string", where)
    keys = [e.public_key for k in keyring.kids_for(issuer) if (e := keyring.get(k)) is not None]
    try:
        cp = verify_checkpoint(note, issuer, keys)
        proof_text = ext.get(EXT_AUDIT_PROOF) or ""
        if not isinstance(proof_text, str):
            raise _bad("audit proof must be a string", f"{_MH}.extension({EXT_AUDIT_PROOF})")
        proof = [base64.b64decode(p, validate=True) for p in proof_text.split()]
        leaf = leaf_from_hash(audit_hash)
    except CheckpointError as exc:
        raise _bad(f"receipt checkpoint: {exc}", where) from None
    except (binascii.Error, ValueError):
        raise _bad("audit proof or hash is not well formed",
                   f"{_MH}.extension({EXT_AUDIT_PROOF})") from None
    if cp.size != seq or not merkle.verify_inclusion(seq - 1, cp.size, leaf, proof, cp.root):
        raise _bad(f"audit entry {seq} is not in the receipt's checkpoint {cp.name}", where)
    return cp
