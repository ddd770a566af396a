"""Constants of the exchange protocol, copied from ``conformance/PROTOCOL.md`` (v1.3).

Pure data: the conformance peer builds what it sends from these values and the rules of
the document, never from the bridge's own code. Each constant names the section that
defines it.
"""

from __future__ import annotations

import uuid

PROTOCOL_VERSION = "1.3"

# §1 parties
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
PARTNER_URI_PREFIX = "urn:ws-fhir-bridge:partner:"

# §2 transport
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
TLS12_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
TLS_GROUPS = ("X25519", "prime256v1", "secp384r1")

# §3 endpoints
FHIR_JSON = "application/fhir+json"
PROCESS_MESSAGE = "$process-message"
METADATA = "metadata"

# §4 the claim message
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
EVENT_SYSTEM = "urn:ws-fhir-bridge:event"
CLAIM_EVENT = "claim-submit"
RECEIPT_EVENT = "receipt"
MAX_NESTING = 64

# §5 signatures
SIGNATURE_TYPE_SYSTEM = "urn:iso-astm:E1762-95:2013"
SIGNATURE_TYPE_VERIFICATION = "1.2.840.10065.1.12.1.5"
SIGNATURE_TYPE_AUTHOR = "1.2.840.10065.1.12.1.1"
SIG_FORMAT = "application/jose"
#: The members of Bundle.signature, and no other (§5's table; §5.4 step 15).
SIGNATURE_MEMBERS = ("type", "when", "who", "sigFormat", "data")
JWS_HEADERS = ("alg", "kid", "iss", "aud", "iat", "msgid")
JWS_ALGORITHMS = ("ES256", "Ed25519")
REPLAY_WINDOW_SECONDS = 300

# §6b several claims per request
BATCH_INTERACTION = "batch"
BATCH_EXTENSION = "urn:ws-fhir-bridge:ext:message-batch"
BATCH_STREAM_EXTENSION = "urn:ws-fhir-bridge:ext:bridge-stream"
BATCH_SEQUENCE_EXTENSION = "urn:ws-fhir-bridge:ext:bridge-sequence"

# §6 receipts
RECEIPT_NAMESPACE = uuid.UUID("3d3b185e-0ea4-5090-8cf1-41374f3bbbe3")
EXT_PREFIX = "urn:ws-fhir-bridge:ext:"
EXT_REQUEST_MESSAGE_ID = EXT_PREFIX + "request-message-id"
EXT_REQUEST_DIGEST = EXT_PREFIX + "request-digest"
EXT_AUDIT_SEQ = EXT_PREFIX + "audit-seq"
EXT_AUDIT_HASH = EXT_PREFIX + "audit-hash"
RECEIPT_OUTCOMES = ("ok", "transient-error", "fatal-error")

# §7 errors
ERROR_SYSTEM = "urn:ws-fhir-bridge:error"
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx


def receipt_identity(request_message_id: str, receiver: str) -> str:
    """§6.2: ``urn:uuid:`` + uuid5(RECEIPT_NAMESPACE, request id + U+0000 + receiver)."""
    name = request_message_id + "\x00" + receiver
    return f"urn:uuid:{uuid.uuid5(RECEIPT_NAMESPACE, name)}"
