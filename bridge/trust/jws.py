"""Detached JWS signatures in ``Bundle.signature``.

Bridge canonicalisation
-----------------------
The signed payload of a bundle is :func:`canonical_json` of the bundle *without* its
``signature`` element: the bundle as parsed from the wire with a standard JSON parser
(numbers become Python ``int``/``float``), re-serialised by orjson with keys sorted and
no whitespace, UTF-8, no escaping of non-ASCII text. Both sides must parse with a
standard JSON parser (``json.loads`` or ``orjson.loads``), never with ``Decimal``
numbers or through FHIR models, so that a decimal such as ``250.10`` becomes the same
float (serialised ``250.1``) on both sides. The signature therefore survives any
re-encoding of the JSON (whitespace, key order) and can be checked again years later
from the stored bytes.

Envelope
--------
``Bundle.signature`` is a FHIR R4 ``Signature`` with ``sigFormat``
``application/jose``; ``data`` is base64 of the compact JWS with a detached payload
(``header..signature``). The protected header names the algorithm (``alg``: ES256 by
default, Ed25519 available), the key (``kid``: base64url SHA-256 of the signing
certificate's DER, as ``x5t#S256``) and the replay claims: ``iss`` (signer partner
id), ``aud`` (receiver partner id), ``iat`` (epoch seconds) and ``msgid``
(``Bundle.identifier.value``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey
from joserfc.registry import HeaderParameter

from bridge.errors import BridgeError, ConfigError, ReplayError, SignatureError
from bridge.trust.pki import PrivateKey, load_certificate, load_private_key

SIGNATURE_TYPE_SYSTEM = "urn:iso-astm:E1762-95:2013"
SIGNATURE_TYPES = {
    "author": "1.2.840.10065.1.12.1.1",
    "verification": "1.2.840.10065.1.12.1.5",
}
PARTNER_SYSTEM = "urn:ws-fhir-bridge:partner"
SIG_FORMAT = "application/jose"

_SIG_LOC = "Bundle.signature"
_DATA_LOC = "Bundle.signature.data"


class SigningError(BridgeError):
    """The bridge itself cannot sign (bad input or key); the peer is not at fault."""

    code = "signing-failed"
    http_status = 500
    ack_code = "AE"
    fault = "local"
    issue_type = "exception"


# The replay claims travel in the protected header (RFC 7519 §5.3 allows claims there),
# so they need entries in joserfc's header registry.
_REGISTRY = jws.JWSRegistry(
    header_registry={
        "iss": HeaderParameter("issuer partner id", "str", required=True),
        "aud": HeaderParameter("audience partner id", "str", required=True),
        "iat": HeaderParameter("issued at, epoch seconds", "int", required=True),
        "msgid": HeaderParameter("Bundle.identifier.value", "str", required=True),
        "kid": HeaderParameter("key id", "str", required=True),
    },
    algorithms=["ES256", "Ed25519"],
)
# Headers carry two partner ids and a urn:uuid; allow for long ids.
_REGISTRY.max_header_length = 2048


def digest(data: bytes) -> str:
    """``"sha256:" + hex`` of ``data``: the digest format used across the bridge."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _reject_non_finite(obj: Any, path: str) -> None:
    # orjson writes NaN and Infinity as null, which would let two different documents
    # share one canonical form; they are not JSON anyway.
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise SignatureError("non-finite number cannot be canonicalised", location=path)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (dict, list, float)):
                _reject_non_finite(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, (dict, list, float)):
                _reject_non_finite(value, f"{path}[{i}]")


def canonical_json(obj: Any) -> bytes:
    """The bridge canonicalisation: orjson, sorted keys, no whitespace, UTF-8.

    ``obj`` must be plain JSON data (dict, list, str, int, float, bool, None) as a
    standard JSON parser produces it. Raises :class:`SignatureError` for values that
    have no JSON form (``Decimal``, ``datetime``, non-string keys, NaN).
    """
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        raise SignatureError("value has no canonical JSON form", location="$") from None
    # NaN and Infinity come out as null; FHIR JSON rarely holds a real null, so the
    # (slower) walk that finds them runs only when a null is present.
    if b"null" in out:
        _reject_non_finite(obj, "$")
    return out


def signed_payload(bundle: dict[str, Any]) -> bytes:
    """The bytes a bundle's signature covers: the canonical bundle without ``signature``."""
    return canonical_json({k: v for k, v in bundle.items() if k != "signature"})


def certificate_kid(cert: x509.Certificate) -> str:
    """Key id of a signing certificate: base64url (no padding) SHA-256 of its DER."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _algorithm_for(key: Any) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ES256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519"
    raise ValueError("only EC P-256 and Ed25519 keys sign bundles")


def _jose_key(key: Any) -> ECKey | OKPKey:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return ECKey.import_key(key)
    return OKPKey.import_key(key)


def _public_bytes(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass(frozen=True)
class Signer:
    """A private signing key and the key id its partners know it by."""

    private_key: PrivateKey
    kid: str
    algorithm: str = field(init=False)
    _jose: ECKey | OKPKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            alg = _algorithm_for(self.private_key)
        except ValueError as exc:
            raise SigningError(str(exc), location="signer.private_key") from None
        object.__setattr__(self, "algorithm", alg)
        object.__setattr__(self, "_jose", _jose_key(self.private_key))

    @classmethod
    def from_certificate(cls, private_key: PrivateKey, cert: x509.Certificate) -> Signer:
        """Signer whose kid is the thumbprint of ``cert``; the key must match the certificate."""
        if _public_bytes(private_key.public_key()) != _public_bytes(cert.public_key()):
            raise ConfigError(
                "signing key does not match the signing certificate", location="signer"
            )
        return cls(private_key=private_key, kid=certificate_kid(cert))

    @classmethod
    def from_files(
        cls, key_file: str | os.PathLike[str], cert_file: str | os.PathLike[str]
    ) -> Signer:
        """Load a signer from PEM files (the dev PKI's ``<id>/sign.key`` and ``sign.pem``)."""
        key = load_private_key(key_file)
        cert = load_certificate(cert_file)
        if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
            raise ConfigError(
                "signing key does not match the signing certificate",
                location=f"{os.fspath(key_file)}, {os.fspath(cert_file)}",
            )
        return cls(private_key=key, kid=certificate_kid(cert))

    def sign_detached(self, header: dict[str, Any], payload: bytes) -> str:
        """Compact JWS of ``payload`` with the content detached (``header..signature``)."""
        protected = {**header, "alg": self.algorithm, "kid": self.kid}
        compact = jws.serialize_compact(protected, payload, self._jose, registry=_REGISTRY)
        return str(jws.detach_content(compact))


# --- key ring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """One partner signing key, known by the thumbprint of its certificate."""

    kid: str
    partner_id: str
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    algorithm: str
    not_before: datetime
    not_after: datetime
    jose_key: ECKey | OKPKey = field(repr=False, compare=False)


class KeyRing:
    """Maps kid → partner signing key. A partner may hold several keys at once (rotation)."""

    def __init__(self) -> None:
        self._entries: dict[str, KeyEntry] = {}

    def add_certificate(
        self, partner_id: str, cert: x509.Certificate | bytes | str | os.PathLike[str]
    ) -> KeyEntry:
        """Register the signing certificate of ``partner_id``.

        ``cert`` is a certificate object, PEM bytes, a PEM string, or a file path.
        The certificate's chain is not checked here: the key ring is filled from the
        operator's partner registry, which is trusted configuration.
        """
        location = f"partners.{partner_id}.signing_certificates"
        if isinstance(cert, x509.Certificate):
            certificate = cert
        elif isinstance(cert, bytes) or (
            isinstance(cert, str) and cert.lstrip().startswith("-----BEGIN")
        ):
            try:
                certificate = x509.load_pem_x509_certificate(
                    cert.encode() if isinstance(cert, str) else cert
                )
            except ValueError:
                raise ConfigError("not a PEM certificate", location=location) from None
        else:
            certificate = load_certificate(Path(cert))
            location = os.fspath(cert)
        public_key = certificate.public_key()
        try:
            algorithm = _algorithm_for(public_key)
        except ValueError:
            raise ConfigError(
                "signing certificate key must be EC P-256 or Ed25519", location=location
            ) from None
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
            if not usage.digital_signature:
                raise ConfigError("certificate is not for digital signatures", location=location)
        except x509.ExtensionNotFound:
            pass
        kid = certificate_kid(certificate)
        known = self._entries.get(kid)
        if known is not None and known.partner_id != partner_id:
            raise ConfigError("signing certificate registered for two partners", location=location)
        entry = KeyEntry(
            kid=kid,
            partner_id=partner_id,
            public_key=public_key,  # type: ignore[arg-type]
            algorithm=algorithm,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            jose_key=_jose_key(public_key),
        )
        self._entries[kid] = entry
        return entry

    def remove(self, kid: str) -> None:
        """Forget a key (after rotation); verifying old evidence then needs an archive ring."""
        self._entries.pop(kid, None)

    def get(self, kid: str) -> KeyEntry | None:
        """The entry for ``kid``, or None."""
        return self._entries.get(kid)

    def kids_for(self, partner_id: str) -> list[str]:
        """Key ids registered for ``partner_id``."""
        return [e.kid for e in self._entries.values() if e.partner_id == partner_id]

    def __contains__(self, kid: object) -> bool:
        return kid in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# --- sign and verify --------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedClaims:
    """What a verified signature vouches for."""

    kid: str
    issuer: str
    audience: str
    issued_at: datetime
    message_id: str
    payload_digest: str  # digest() of the canonical signed payload
    algorithm: str = "ES256"


def _instant(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now


def sign_bundle(
    bundle: dict[str, Any],
    signer: Signer,
    *,
    issuer: str,
    audience: str,
    message_id: str,
    now: datetime,
    role: Literal["verification", "author"] = "verification",
) -> dict[str, Any]:
    """Return a copy of ``bundle`` with ``signature`` set to a detached JWS over it.

    ``message_id`` must equal ``Bundle.identifier.value``; it is bound into the
    signature so a receiver can deduplicate on a value the sender vouched for.
    ``role`` chooses the Signature.type code (verification 1.2.840.10065.1.12.1.5
    by default, or author 1.2.840.10065.1.12.1.1).
    """
    _aware(now)
    identifier = bundle.get("identifier")
    if not isinstance(identifier, dict) or identifier.get("value") != message_id:
        raise SigningError(
            "message id must equal Bundle.identifier.value", location="Bundle.identifier.value"
        )
    try:
        payload = signed_payload(bundle)
    except SignatureError as exc:
        raise SigningError(exc.message, location=exc.location) from None
    iat = int(now.timestamp())
    data = signer.sign_detached(
        {"iss": issuer, "aud": audience, "iat": iat, "msgid": message_id}, payload
    )
    signature = {
        "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": SIGNATURE_TYPES[role]}],
        "when": _instant(datetime.fromtimestamp(iat, UTC)),
        "who": {"identifier": {"system": PARTNER_SYSTEM, "value": issuer}},
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(data.encode("ascii")).decode("ascii"),
    }
    signed = {k: v for k, v in bundle.items() if k != "signature"}
    signed["signature"] = signature
    return signed


def verify_bundle(
    bundle: dict[str, Any],
    keyring: KeyRing,
    *,
    expected_issuer: str,
    expected_audience: str,
    now: datetime,
    window: timedelta = timedelta(minutes=5),
    check_time: bool = True,
) -> SignedClaims:
    """Verify ``Bundle.signature`` or raise.

    ``expected_issuer`` is the partner the TLS connection authenticated (or, for a
    stored bundle, the partner it came from); ``expected_audience`` is this bridge.
    Raises :class:`SignatureError` (missing, malformed, unknown key, key of another
    partner, key not valid at the signing time, bad signature, issuer or message id
    mismatch) or :class:`ReplayError` (wrong audience, ``iat`` outside ``now ±
    window`` when ``check_time``). Evidence checked long after the fact (stored
    receipts) passes ``check_time=False``; the signing key must still have been valid
    at ``iat``.
    """
    _aware(now)
    signature = bundle.get("signature")
    if not isinstance(signature, dict):
        raise SignatureError("bundle is not signed", location=_SIG_LOC)
    if signature.get("sigFormat") != SIG_FORMAT:
        raise SignatureError(
            "signature format must be application/jose", location=f"{_SIG_LOC}.sigFormat"
        )
    data = signature.get("data")
    if not isinstance(data, str):
        raise SignatureError("signature data missing", location=_DATA_LOC)
    try:
        compact = base64.b64decode(data, validate=True)
        compact.decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise SignatureError(
            "signature data is not base64 of a compact JWS", location=_DATA_LOC
        ) from None
    payload = signed_payload(bundle)
    header, entry = _authentic_header(compact, payload, keyring, expected_issuer, _DATA_LOC)
    # From here on the header is authentic.
    who = signature.get("who")
    who_value = who.get("identifier", {}).get("value") if isinstance(who, dict) else None
    if who_value != header["iss"]:
        raise SignatureError("Signature.who does not name the signer", location=f"{_SIG_LOC}.who")
    identifier = bundle.get("identifier")
    if not isinstance(identifier, dict) or identifier.get("value") != header["msgid"]:
        raise SignatureError(
            "signed message id differs from the bundle identifier",
            location="Bundle.identifier.value",
        )
    return _claims(header, entry, payload, expected_audience, now, window, check_time, _DATA_LOC)


def sign_detached_bytes(
    payload: bytes,
    signer: Signer,
    *,
    issuer: str,
    audience: str,
    message_id: str,
    now: datetime,
) -> str:
    """A compact detached JWS over exact bytes (for payloads that are not bundles).

    Used in the ``X-Signature`` header of requests whose body is a single resource,
    such as a partner-submitted Consent. The signature covers the bytes as sent, so
    the receiver verifies the body before parsing it.
    """
    _aware(now)
    header = {"iss": issuer, "aud": audience, "iat": int(now.timestamp()), "msgid": message_id}
    return signer.sign_detached(header, payload)


def verify_detached_bytes(
    compact: str,
    payload: bytes,
    keyring: KeyRing,
    *,
    expected_issuer: str,
    expected_audience: str,
    now: datetime,
    window: timedelta = timedelta(minutes=5),
    check_time: bool = True,
    location: str = "X-Signature",
) -> SignedClaims:
    """Verify a compact detached JWS over ``payload`` (see :func:`sign_detached_bytes`)."""
    _aware(now)
    try:
        raw = compact.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise SignatureError("signature is not a compact JWS", location=location) from None
    header, entry = _authentic_header(raw, payload, keyring, expected_issuer, location)
    return _claims(header, entry, payload, expected_audience, now, window, check_time, location)


def _authentic_header(
    compact: bytes, payload: bytes, keyring: KeyRing, expected_issuer: str, loc: str
) -> tuple[dict[str, Any], KeyEntry]:
    """Check the JWS over ``payload`` with the issuer's key; return its header and key."""
    parts = compact.split(b".")
    if len(parts) != 3 or parts[1] != b"":
        raise SignatureError("signature is not a detached compact JWS", location=loc)
    try:
        obj = jws.extract_compact(compact, payload, _REGISTRY)
        header = obj.headers()
        _REGISTRY.check_header(header)
    except (JoseError, ValueError, TypeError):
        raise SignatureError("signature header is malformed", location=loc) from None

    kid = header["kid"]
    entry = keyring.get(kid)
    if entry is None:
        raise SignatureError("signing key id is not in the key ring", location=f"{loc}#kid")
    if entry.partner_id != expected_issuer:
        raise SignatureError("signing key belongs to another partner", location=f"{loc}#kid")
    if header.get("alg") != entry.algorithm:
        raise SignatureError("signature algorithm does not match the key", location=f"{loc}#alg")
    try:
        valid = jws.validate_compact(obj, entry.jose_key, [entry.algorithm], _REGISTRY)
    except (JoseError, ValueError):
        valid = False
    if not valid:
        raise SignatureError("signature does not verify", location=loc)
    if header["iss"] != expected_issuer:
        raise SignatureError("signed issuer is not the expected partner", location=f"{loc}#iss")
    return dict(header), entry


def _claims(
    header: dict[str, Any],
    entry: KeyEntry,
    payload: bytes,
    expected_audience: str,
    now: datetime,
    window: timedelta,
    check_time: bool,
    loc: str,
) -> SignedClaims:
    """Audience, signing time and key validity of an authentic header."""
    if header["aud"] != expected_audience:
        raise ReplayError("addressed to another partner", location=f"{loc}#aud")
    try:
        issued_at = datetime.fromtimestamp(header["iat"], UTC)
    except (OverflowError, OSError, ValueError):
        raise SignatureError("signature time is out of range", location=f"{loc}#iat") from None
    if not (entry.not_before <= issued_at <= entry.not_after):
        raise SignatureError(
            "signing certificate was not valid at the signing time", location=f"{loc}#kid"
        )
    if check_time and abs(now - issued_at) > window:
        raise ReplayError("signature time is outside the accepted window", location=f"{loc}#iat")
    return SignedClaims(
        kid=header["kid"],
        issuer=header["iss"],
        audience=header["aud"],
        issued_at=issued_at,
        message_id=header["msgid"],
        payload_digest=digest(payload),
        algorithm=entry.algorithm,
    )
