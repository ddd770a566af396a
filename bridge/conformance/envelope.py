"""Messages, signatures and receipts built from PROTOCOL.md §4-6 alone.

Canonical JSON is RFC 8785 (the ``rfc8785`` package); JWS is assembled by hand from
RFC 7515 with ``cryptography``'s primitives, so that every field can be set, left out
or bent on purpose: a conformance peer must be able to send what a broken or hostile
sender would send. Nothing here comes from the bridge's own signing code.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from bridge.conformance import protocol as P

Canonicaliser = Callable[[Any], bytes]


class PeerCheckFailed(Exception):
    """Something the target sent does not satisfy PROTOCOL.md (the message names what)."""


# --- canonical JSON and digests --------------------------------------------------------


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical form (PROTOCOL §5.1)."""
    return bytes(rfc8785.dumps(value))


def signed_payload(bundle: Mapping[str, Any], canonical: Canonicaliser = jcs) -> bytes:
    """The bytes a bundle's signature covers: the bundle without ``signature``."""
    return canonical({k: v for k, v in bundle.items() if k != "signature"})


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A partner's signing key and the certificate its kid is computed from (§5.2)."""

    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    certificate: x509.Certificate

    @classmethod
    def from_files(cls, key_file: str | Path, cert_file: str | Path) -> SigningKey:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise TypeError("signing keys are EC P-256 or Ed25519")
        return cls(key, cert)

    @property
    def kid(self) -> str:
        return certificate_kid(self.certificate)

    @property
    def algorithm(self) -> str:
        return "Ed25519" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else "ES256"

    def sign(self, signing_input: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(signing_input)
        der = self.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def certificate_kid(cert: x509.Certificate) -> str:
    """§5.2 kid: base64url, unpadded, of the SHA-256 of the certificate's DER."""
    return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def verify_jws_signature(
    public_key: Any, algorithm: str, signing_input: bytes, signature: bytes
) -> bool:
    try:
        if algorithm == "Ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, signing_input)
            return True
        if algorithm == "ES256" and isinstance(public_key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            return True
    except InvalidSignature:
        return False
    return False


# --- JWS with deviations ---------------------------------------------------------------


@dataclass
class JWSOptions:
    """How to bend the protected header or the signing input (all default to §5)."""

    extra_headers: dict[str, Any] = field(default_factory=dict)  # e.g. {"crit": ["b64"]}
    overrides: dict[str, Any] = field(default_factory=dict)  # replace a §5 value
    omit: tuple[str, ...] = ()  # leave a §5 header out
    b64: bool = True  # False signs the raw payload as RFC 7797 does
    corrupt_signature: bool = False


def sign_detached(
    payload: bytes,
    key: SigningKey,
    *,
    iss: str,
    aud: str,
    iat: int,
    msgid: str,
    options: JWSOptions | None = None,
) -> str:
    """A compact JWS with detached payload (``header..signature``) per §5.2."""
    opts = options or JWSOptions()
    header: dict[str, Any] = {
        "alg": key.algorithm,
        "kid": key.kid,
        "iss": iss,
        "aud": aud,
        "iat": iat,
        "msgid": msgid,
    }
    header.update(opts.overrides)
    for name in opts.omit:
        header.pop(name, None)
    header.update(opts.extra_headers)
    encoded_header = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = payload if not opts.b64 else b64url(payload).encode("ascii")
    signature = key.sign(encoded_header.encode("ascii") + b"." + body)
    if opts.corrupt_signature:
        signature = bytes([signature[0] ^ 0x01]) + signature[1:]
    return f"{encoded_header}..{b64url(signature)}"


# --- claim messages --------------------------------------------------------------------


def sample_claim_content() -> dict[str, Any]:
    """A small claim (Organization, Patient, Encounter, Coverage, Claim, Condition).

    Synthetic data, inside the commercial-insurance profile; amounts include an integral
    decimal, whose canonical form differs between RFC 8785 and other serialisers.
    """
    text = resources.files("bridge.conformance").joinpath("claim-content.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def new_identity() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def build_claim(
    *,
    sender: str,
    receiver: str,
    identity: str | None = None,
    event: str = P.CLAIM_EVENT,
    content: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    source_endpoint: str | None = None,
    destination_endpoint: str | None = None,
) -> dict[str, Any]:
    """An unsigned claim message per §4 (change any part of it afterwards to deviate)."""
    now = now or datetime.now(UTC)
    identity = identity or new_identity()
    collection = copy.deepcopy(dict(content or sample_claim_content()))
    entries: list[dict[str, Any]] = list(collection.get("entry") or [])
    header_id = str(uuid.uuid4())
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {"system": P.EVENT_SYSTEM, "code": event},
        "destination": [
            {
                "endpoint": destination_endpoint or f"{P.PARTNER_URI_PREFIX}{receiver}",
                "receiver": {"identifier": {"system": P.PARTNER_SYSTEM, "value": receiver}},
            }
        ],
        "sender": {"identifier": {"system": P.PARTNER_SYSTEM, "value": sender}},
        "source": {"endpoint": source_endpoint or f"{P.PARTNER_URI_PREFIX}{sender}"},
    }
    focus = [
        {"reference": e["fullUrl"]}
        for e in entries
        if isinstance(e, dict) and (e.get("resource") or {}).get("resourceType") == "Claim"
    ]
    if focus:
        header["focus"] = focus
    bare = identity.removeprefix("urn:uuid:")
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "identifier": {"system": P.IDENTIFIER_SYSTEM, "value": identity},
        "type": "message",
        "timestamp": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "entry": [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}, *entries],
    }
    if re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", bare):
        bundle["id"] = bare
    return bundle


def signature_time(iat: int) -> str:
    """Signature.when for ``iat`` (§5's table): UTC, seconds, a four-digit year."""
    t = datetime.fromtimestamp(iat, UTC)
    return f"{t.year:04d}-{t:%m-%dT%H:%M:%S}Z"


def sign_message(
    bundle: Mapping[str, Any],
    key: SigningKey,
    *,
    iss: str,
    aud: str,
    iat: int | None = None,
    msgid: str | None = None,
    who: str | None = None,
    role_code: str = P.SIGNATURE_TYPE_VERIFICATION,
    canonical: Canonicaliser = jcs,
    options: JWSOptions | None = None,
) -> dict[str, Any]:
    """``bundle`` with ``Bundle.signature`` per §5 (each argument can be made wrong)."""
    if iat is None:
        iat = int(datetime.now(UTC).timestamp())
    if msgid is None:
        msgid = str((bundle.get("identifier") or {}).get("value"))
    payload = signed_payload(bundle, canonical)
    compact = sign_detached(payload, key, iss=iss, aud=aud, iat=iat, msgid=msgid, options=options)
    signed = {k: v for k, v in bundle.items() if k != "signature"}
    signed["signature"] = {
        "type": [{"system": P.SIGNATURE_TYPE_SYSTEM, "code": role_code}],
        "when": signature_time(iat),
        "who": {"identifier": {"system": P.PARTNER_SYSTEM, "value": who or iss}},
        "sigFormat": P.SIG_FORMAT,
        "data": base64.b64encode(compact.encode("ascii")).decode("ascii"),
    }
    return signed


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The first issue of an OperationOutcome (§7)."""

    code: str | None
    text: str | None
    expression: tuple[str, ...]
    severity: str | None


def read_outcome(document: Any) -> Outcome | None:
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return None
    issues = document.get("issue") or [{}]
    first = issues[0] if isinstance(issues[0], dict) else {}
    details = first.get("details") or {}
    codings = [c for c in details.get("coding") or [] if isinstance(c, dict)]
    code = next((c.get("code") for c in codings if c.get("system") == P.ERROR_SYSTEM), None)
    return Outcome(
        code=code,
        text=details.get("text"),
        expression=tuple(first.get("expression") or ()),
        severity=first.get("severity"),
    )


@dataclass(frozen=True)
class ReceiptFacts:
    """What a verified receipt (§6.2) says."""

    identity: str
    outcome: str
    request_message_id: str
    request_digest: str
    audit_seq: int
    audit_hash: str
    issued_at: int


def _parse_compact(data: Any) -> tuple[dict[str, Any], str, bytes]:
    if not isinstance(data, str):
        raise PeerCheckFailed("Bundle.signature.data is not a string")
    try:
        compact = base64.b64decode(data, validate=True).decode("ascii")
    except ValueError as exc:
        raise PeerCheckFailed("Bundle.signature.data is not base64 of a compact JWS") from exc
    parts = compact.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise PeerCheckFailed("signature is not a detached compact JWS")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise PeerCheckFailed("protected header repeats a member")
        return dict(pairs)

    try:
        header = json.loads(b64url_decode(parts[0]), object_pairs_hook=no_duplicates)
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise PeerCheckFailed("protected header is not base64url JSON") from exc
    if not isinstance(header, dict):
        raise PeerCheckFailed("protected header is not a JSON object")
    return header, parts[0], signature


def verify_signed_bundle(
    bundle: Mapping[str, Any],
    signer_certificate: x509.Certificate,
    *,
    issuer: str,
    audience: str,
    accept_v1: bool = True,
) -> tuple[dict[str, Any], bytes]:
    """Check ``Bundle.signature`` by §5.4 (without the freshness check); return the
    protected header and the payload bytes the signature covers."""
    sig = bundle.get("signature")
    if not isinstance(sig, dict) or sig.get("sigFormat") != P.SIG_FORMAT:
        raise PeerCheckFailed("Bundle.signature missing or not application/jose")
    header, encoded_header, signature = _parse_compact(sig.get("data"))
    extra = sorted(set(header) - set(P.JWS_HEADERS))
    if extra:
        raise PeerCheckFailed(f"protected header carries {extra[0]!r}, which §5.2 does not allow")
    missing = [h for h in P.JWS_HEADERS if h not in header]
    if missing:
        raise PeerCheckFailed(f"protected header lacks {missing[0]!r}")
    for name in P.JWS_HEADERS:  # §5.2 types, in the table's order (§5.4 step 8)
        value = header[name]
        typed = (isinstance(value, int) and not isinstance(value, bool)) if name == "iat" else (
            isinstance(value, str))
        if not typed:
            raise PeerCheckFailed(f"protected header member {name!r} is not of its §5.2 type")
    if header["alg"] not in P.JWS_ALGORITHMS:
        raise PeerCheckFailed("alg is not one §5.2 allows")
    if header["kid"] != certificate_kid(signer_certificate):
        raise PeerCheckFailed("kid is not the signer's certificate")
    forms = [signed_payload(bundle)]
    if accept_v1:
        forms.append(signed_payload(bundle, v1_canonical))
    public_key = signer_certificate.public_key()
    for payload in forms:
        signing_input = encoded_header.encode("ascii") + b"." + b64url(payload).encode("ascii")
        if verify_jws_signature(public_key, header["alg"], signing_input, signature):
            break
    else:
        raise PeerCheckFailed("signature does not verify")
    if header["iss"] != issuer:
        raise PeerCheckFailed("iss is not the expected signer")
    extra = sorted(set(sig) - set(P.SIGNATURE_MEMBERS))
    if extra:  # §5.4 step 15: nothing covers Bundle.signature itself
        raise PeerCheckFailed(f"Bundle.signature carries {extra[0]!r}, which §5 does not allow")
    codes = (P.SIGNATURE_TYPE_VERIFICATION, P.SIGNATURE_TYPE_AUTHOR)
    if sig.get("type") not in [[{"system": P.SIGNATURE_TYPE_SYSTEM, "code": c}] for c in codes]:
        raise PeerCheckFailed("Signature.type is not one §5 coding")
    try:
        when: str | None = signature_time(header["iat"])
    except (OverflowError, OSError, ValueError):
        when = None  # not a time: refused after msgid, as §5.4 step 17 comes after 16
    if when is not None and sig.get("when") != when:
        raise PeerCheckFailed("Signature.when is not iat")
    if sig.get("who") != {"identifier": {"system": P.PARTNER_SYSTEM, "value": header["iss"]}}:
        raise PeerCheckFailed("Signature.who is not exactly the identifier of iss")
    if (bundle.get("identifier") or {}).get("value") != header["msgid"]:
        raise PeerCheckFailed("msgid differs from Bundle.identifier.value")
    if when is None:
        raise PeerCheckFailed("iat is not a representable time")
    if header["aud"] != audience:
        raise PeerCheckFailed("aud is not the expected audience")
    return header, payload


def v1_canonical(value: Any) -> bytes:
    """The version 1 signed form (PROTOCOL appendix A): orjson's sorted-key output."""
    import orjson  # only for evidence signed under version 1

    return bytes(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def _party(reference: Any) -> str | None:
    """The partner id a MessageHeader reference names by identifier (§1), else None."""
    identifier = reference.get("identifier") if isinstance(reference, dict) else None
    if not isinstance(identifier, dict) or identifier.get("system") != P.PARTNER_SYSTEM:
        return None
    value = identifier.get("value")
    return value if isinstance(value, str) else None


def verify_receipt(
    receipt: Mapping[str, Any],
    receiver_signing_certificate: x509.Certificate,
    *,
    receiver: str,
    sender: str,
    request_message_id: str,
    request_digests: Sequence[str] | None = None,
) -> ReceiptFacts:
    """Check a receipt against §6.2 and return what it vouches for."""
    header, _ = verify_signed_bundle(
        receipt, receiver_signing_certificate, issuer=receiver, audience=sender
    )
    expected_id = P.receipt_identity(request_message_id, receiver)
    if (receipt.get("identifier") or {}).get("value") != expected_id:
        raise PeerCheckFailed("receipt identity is not uuid5 of the request and receiver")
    if receipt.get("type") != "message":
        raise PeerCheckFailed("receipt is not a message bundle")
    entries = receipt.get("entry") or []
    mh = entries[0].get("resource") if entries and isinstance(entries[0], dict) else None
    if not isinstance(mh, dict) or mh.get("resourceType") != "MessageHeader":
        raise PeerCheckFailed("receipt does not start with a MessageHeader")
    if mh.get("eventCoding") != {"system": P.EVENT_SYSTEM, "code": P.RECEIPT_EVENT}:
        raise PeerCheckFailed("receipt event is not urn:ws-fhir-bridge:event|receipt")
    # The receipt goes from the receiver back to the sender (§6.2), and says so.
    if _party(mh.get("sender")) != receiver:
        raise PeerCheckFailed("receipt MessageHeader.sender is not the receiver")
    destinations = mh.get("destination")
    if not isinstance(destinations, list) or len(destinations) != 1 or not isinstance(
        destinations[0], dict
    ):
        raise PeerCheckFailed("receipt MessageHeader has not exactly one destination")
    if _party(destinations[0].get("receiver")) != sender:
        raise PeerCheckFailed("receipt destination[0].receiver is not the original sender")
    response = mh.get("response") or {}
    if response.get("identifier") != request_message_id.removeprefix("urn:uuid:"):
        raise PeerCheckFailed("response.identifier names another request")
    if response.get("code") not in P.RECEIPT_OUTCOMES:
        raise PeerCheckFailed("response.code is not a receipt outcome")
    ext = {
        e.get("url"): e.get("valueString", e.get("valueInteger"))
        for e in mh.get("extension") or []
        if isinstance(e, dict)
    }
    if ext.get(P.EXT_REQUEST_MESSAGE_ID) != request_message_id:
        raise PeerCheckFailed("request-message-id extension names another request")
    got_digest = ext.get(P.EXT_REQUEST_DIGEST)
    if request_digests is not None and got_digest not in request_digests:
        raise PeerCheckFailed("request-digest is not the digest of what was sent")
    seq, audit_hash = ext.get(P.EXT_AUDIT_SEQ), ext.get(P.EXT_AUDIT_HASH)
    if not isinstance(seq, int) or not isinstance(audit_hash, str):
        raise PeerCheckFailed("receipt lacks the audit entry it names")
    return ReceiptFacts(
        identity=expected_id,
        outcome=str(response["code"]),
        request_message_id=request_message_id,
        request_digest=str(got_digest),
        audit_seq=seq,
        audit_hash=audit_hash,
        issued_at=int(header["iat"]),
    )
