"""Detached JWS signatures in ``Bundle.signature``.

Canonicalisation (PROTOCOL §5.1)
--------------------------------
The signed payload of a bundle is :func:`canonical_json` of the bundle *without* its
``signature`` element: RFC 8785 (JSON Canonicalization Scheme) of the bundle as parsed
from the wire with a standard JSON parser (numbers become Python ``int``/``float``,
never ``Decimal`` or FHIR models). The signature therefore survives any re-encoding of
the JSON (whitespace, key order, ``250.10`` or ``250.1``) and can be checked again
years later from the stored bytes.

Protocol version 1 signed orjson's sorted-key output instead (:func:`canonical_json_v1`).
The two forms differ only for some numbers (``6600.0`` is ``6600`` under RFC 8785) and
for rare member names; both are one-to-one functions of the parsed document, so a
signature over either commits to the same document. Verifiers accept both
(:func:`verify_bundle` tries RFC 8785 first), which keeps every stored v1 signature
and receipt verifiable; signers produce RFC 8785 only.

Envelope
--------
``Bundle.signature`` is a FHIR R4 ``Signature`` with ``sigFormat``
``application/jose``; ``data`` is base64 of the compact JWS with a detached payload
(``header..signature``). The protected header names the algorithm (``alg``: one of
:mod:`bridge.trust.algorithms`, ES256 by default, Ed25519 available), the key (``kid``: base64url SHA-256 of the signing
certificate's DER, as ``x5t#S256``) and the replay claims: ``iss`` (signer partner
id), ``aud`` (receiver partner id), ``iat`` (epoch seconds) and ``msgid``
(``Bundle.identifier.value``). These six, and nothing else: a ``crit``, ``b64``,
``typ`` or any other member is refused by name (PROTOCOL §5.2), so no verifier can be
talked into another payload encoding or an extension it does not implement.

Verification order (PROTOCOL §5.4): the envelope of the signature, the header's
members (none but the six, all present, each of its type), the algorithm (registered),
the key (known, of the TLS peer, of the header's algorithm, an algorithm accepted from
that partner), the signature, ``iss``, ``Bundle.signature`` exactly as the table
says (nothing unsigned in it; ``when`` is ``iat``, ``who`` names ``iss``), ``msgid``,
the key's validity at ``iat`` — each a ``signature-invalid`` — and only then ``aud``
and the time window (``replay-rejected``). An old ``iat`` under a retired key is
therefore a bad signature, not a replay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.errors import BridgeError, ConfigError, ReplayError, SignatureError, member_label
from bridge.trust import algorithms
from bridge.trust.algorithms import SignatureAlgorithm
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


# Headers carry two partner ids and a urn:uuid; allow for long ids, not for megabytes.
_MAX_HEADER_CHARS = 2048


def digest(data: bytes) -> str:
    """``"sha256:" + hex`` of ``data``: the digest format used across the bridge."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


#: The members of the protected header, all required, no others (PROTOCOL §5.2).
HEADER_MEMBERS = ("alg", "kid", "iss", "aud", "iat", "msgid")
_HEADER_TYPES: dict[str, type] = {
    "alg": str, "kid": str, "iss": str, "aud": str, "iat": int, "msgid": str
}
_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


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


def _orjson_writes_jcs(obj: Any) -> bool:
    """True when orjson's sorted output of ``obj`` is byte for byte its RFC 8785 form.

    They agree on strings, integers, literals and the order of member names made of
    characters below U+E000 (where UTF-16 and code-point order coincide). For numbers
    they agree on non-integral doubles from 1e-5 to 1e15; an integral double (``6600.0``),
    ``-0.0`` or anything smaller or larger goes to the RFC 8785 implementation itself.
    """
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str) or not (key.isascii() or max(key) < "\ue000"):
                    return False
                if isinstance(value, (dict, list, float, int)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list, float, int)))
        elif isinstance(node, float):
            magnitude = abs(node)
            if not (1e-5 <= magnitude < 1e15) or node.is_integer():
                return False
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > 2**53 - 1:
            return False
    return True


# Bytes 0x00-0xED: deleting them leaves only the lead bytes of characters from U+E000 up.
_BELOW_E000 = bytes(range(0xEE))
# Structure outside strings becomes blanks: what is left are the number and literal tokens.
_STRUCTURE = bytes.maketrans(b"{}[]:,", b"      ")


def _orjson_output_is_jcs(out: bytes) -> bool:
    """True when ``out``, orjson's sorted output of some value, is that value's RFC 8785
    form: the conditions of :func:`_orjson_writes_jcs`, read from the bytes.

    Without a backslash every ``"`` in orjson's output delimits a string (a quote in a
    string is written ``\\"``), so the text between strings is structure, numbers and
    literals. A ``null`` may be a NaN or an infinity orjson wrote as null, and a byte
    from 0xEE up may belong to a member name RFC 8785 orders differently: both are left
    to the walk, as is any string with an escape. Each number is then read back (orjson
    writes the shortest form that reads back as the same double) and held to the same
    ranges as the walk holds the values.
    """
    if b"\\" in out or b"null" in out or out.translate(None, _BELOW_E000):
        return False
    for token in b"".join(out.split(b'"')[::2]).translate(_STRUCTURE).split():
        if token == b"true" or token == b"false":
            continue
        if b"." in token or b"e" in token or b"E" in token:
            number = float(token)
            if not (1e-5 <= abs(number) < 1e15) or number.is_integer():
                return False
        elif len(token) > 15 and abs(int(token)) > 2**53 - 1:
            return False
    return True


def _sorted_orjson(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 canonical JSON of ``obj`` (PROTOCOL §5.1).

    ``obj`` must be plain JSON data (dict, list, str, int, float, bool, None) as a
    standard JSON parser produces it. Raises :class:`SignatureError` for values that
    have no canonical form (``Decimal``, ``datetime``, non-string keys, NaN, lone
    surrogates, integers beyond ±(2^53 - 1)). The common case is written by orjson,
    which gives the same bytes about eighty times faster; whether it does is read from
    its output (:func:`_orjson_output_is_jcs`), else from the value
    (:func:`_orjson_writes_jcs`).
    """
    return _canonical(obj, None)


def _canonical(obj: Any, out: bytes | None) -> bytes:
    """:func:`canonical_json`, given orjson's sorted output of ``obj`` when already made."""
    try:
        if out is None:
            out = _sorted_orjson(obj)
        if _orjson_output_is_jcs(out) or _orjson_writes_jcs(obj):
            return out
        return bytes(rfc8785.dumps(obj))
    except (TypeError, ValueError, rfc8785.CanonicalizationError, RecursionError):
        _reject_non_finite(obj, "$")  # names where a NaN or an infinity is
        raise SignatureError("value has no canonical JSON form", location="$") from None


def canonical_json_v1(obj: Any) -> bytes:
    """The version 1 signed form: orjson's sorted-key output (PROTOCOL appendix A).

    Only for verifying what was signed under protocol version 1.
    """
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        raise SignatureError("value has no canonical JSON form", location="$") from None
    # NaN and Infinity come out as null; the (slower) walk that finds them runs only
    # when a null is present.
    if b"null" in out:
        _reject_non_finite(obj, "$")
    return out


def signed_payload(bundle: dict[str, Any]) -> bytes:
    """The bytes a bundle's signature covers: the canonical bundle without ``signature``."""
    return canonical_json({k: v for k, v in bundle.items() if k != "signature"})


def signed_payload_forms(bundle: dict[str, Any]) -> tuple[bytes, ...]:
    """The payloads a verifier accepts: RFC 8785, then (if it differs) the v1 form."""
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    try:
        legacy = _sorted_orjson(unsigned)
    except TypeError:
        return (canonical_json(unsigned),)
    # orjson's sorted output is the v1 form (checked for NaN below) and, usually, the
    # RFC 8785 form as well: written once, used for both.
    current = _canonical(unsigned, legacy)
    if b"null" in legacy:
        try:
            _reject_non_finite(unsigned, "$")
        except SignatureError:
            return (current,)
    return (current,) if legacy == current else (current, legacy)


def payload_digests(bundle: dict[str, Any]) -> frozenset[str]:
    """Digests of every accepted signed form of ``bundle``: the same content under
    either protocol version (idempotency and receipt checks compare against these)."""
    return frozenset(digest(form) for form in signed_payload_forms(bundle))


def certificate_kid(cert: x509.Certificate) -> str:
    """Key id of a signing certificate: base64url (no padding) SHA-256 of its DER."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _algorithm_for(key: Any) -> SignatureAlgorithm:
    algorithm = algorithms.for_key(key)
    if algorithm is None:
        raise ValueError(f"only {algorithms.key_kinds()} keys sign bundles")
    return algorithm


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
    _impl: SignatureAlgorithm = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            impl = _algorithm_for(self.private_key)
        except ValueError as exc:
            raise SigningError(str(exc), location="signer.private_key") from None
        object.__setattr__(self, "algorithm", impl.name)
        object.__setattr__(self, "_impl", impl)

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
        encoded = _b64url(json.dumps(protected, separators=(",", ":")).encode("utf-8"))
        signature = self._impl.sign(self.private_key, encoded + b"." + _b64url(payload))
        return (encoded + b".." + _b64url(signature)).decode("ascii")


# --- key ring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """One partner signing key, known by the thumbprint of its certificate."""

    kid: str
    partner_id: str
    public_key: Any
    algorithm: str
    not_before: datetime
    not_after: datetime
    impl: SignatureAlgorithm = field(repr=False, compare=False)


class KeyRing:
    """Maps kid → partner signing key. A partner may hold several keys at once (rotation).

    By default a partner's signature is accepted under the algorithm of whichever of its
    keys signed it. :meth:`accept` narrows that to the algorithms the configuration
    names for the partner: a key of another algorithm, even one still registered for the
    partner, then signs nothing this ring accepts.
    """

    def __init__(self) -> None:
        self._entries: dict[str, KeyEntry] = {}
        self._accepted: dict[str, frozenset[str]] = {}

    def accept(self, partner_id: str, names: frozenset[str] | set[str] | list[str]) -> None:
        """Accept signatures from ``partner_id`` under ``names`` only (JWS ``alg`` values)."""
        location = f"partners.{partner_id}.signature_algorithms"
        chosen = frozenset(names)
        if not chosen:
            raise ConfigError("at least one signature algorithm is accepted", location=location)
        unknown = sorted(n for n in chosen if algorithms.get(n) is None)
        if unknown:
            raise ConfigError(
                f"signature algorithm {unknown[0]} is not one of "
                f"{', '.join(algorithms.names())}",
                location=location,
            )
        self._accepted[partner_id] = chosen

    def accepted(self, partner_id: str) -> frozenset[str] | None:
        """The algorithms accepted from ``partner_id``, or None when not narrowed."""
        return self._accepted.get(partner_id)

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
        try:
            public_key = certificate.public_key()
            impl = _algorithm_for(public_key)
        except ValueError:
            raise ConfigError(
                f"signing certificate key must be {algorithms.key_kinds()}", location=location
            ) from None
        except Exception:  # noqa: BLE001 - cryptography cannot load this key type at all
            raise ConfigError(
                f"signing certificate key must be {algorithms.key_kinds()}", location=location
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
            public_key=public_key,
            algorithm=impl.name,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            impl=impl,
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
    """``now`` as Signature.when writes it: UTC, seconds, a four-digit year."""
    t = now.astimezone(UTC)
    return f"{t.year:04d}-{t:%m-%dT%H:%M:%S}Z"


def _signature_when(iat: int) -> str:
    """Signature.when of a signature made at ``iat`` (PROTOCOL §5's table); raises
    OverflowError, OSError or ValueError for a time that cannot be represented."""
    return _instant(datetime.fromtimestamp(iat, UTC))


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
    return sign_bundle_digests(
        bundle, signer, issuer=issuer, audience=audience, message_id=message_id, now=now,
        role=role,
    )[0]


def sign_bundle_digests(
    bundle: dict[str, Any],
    signer: Signer,
    *,
    issuer: str,
    audience: str,
    message_id: str,
    now: datetime,
    role: Literal["verification", "author"] = "verification",
) -> tuple[dict[str, Any], frozenset[str]]:
    """:func:`sign_bundle`, and :func:`payload_digests` of the signed bundle, taken from
    the payload just signed (a receipt for it names one of these)."""
    _aware(now)
    identifier = bundle.get("identifier")
    if not isinstance(identifier, dict) or identifier.get("value") != message_id:
        raise SigningError(
            "message id must equal Bundle.identifier.value", location="Bundle.identifier.value"
        )
    try:
        forms = signed_payload_forms(bundle)
    except SignatureError as exc:
        raise SigningError(exc.message, location=exc.location) from None
    payload = forms[0]
    iat = int(now.timestamp())
    data = signer.sign_detached(
        {"iss": issuer, "aud": audience, "iat": iat, "msgid": message_id}, payload
    )
    signature = {
        "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": SIGNATURE_TYPES[role]}],
        "when": _signature_when(iat),
        "who": {"identifier": {"system": PARTNER_SYSTEM, "value": issuer}},
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(data.encode("ascii")).decode("ascii"),
    }
    signed = {k: v for k, v in bundle.items() if k != "signature"}
    signed["signature"] = signature
    return signed, frozenset(digest(form) for form in forms)


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
    header = _protected_header(compact, _DATA_LOC)
    entry = _key_or_decoy(header, keyring, expected_issuer, _DATA_LOC,
                          check_time or _recent(header, now, window), compact,
                          lambda: signed_payload_forms(bundle))
    payload = _verified_payload(
        compact, signed_payload_forms(bundle), entry, expected_issuer, header, _DATA_LOC
    )
    # From here on the header is authentic.
    _exactly_as_signed(signature, header)
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
    header = _protected_header(raw, location)
    entry = _key_or_decoy(header, keyring, expected_issuer, location,
                          check_time or _recent(header, now, window), raw, lambda: (payload,))
    _verified_payload(raw, (payload,), entry, expected_issuer, header, location)
    return _claims(header, entry, payload, expected_audience, now, window, check_time, location)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    header = dict(pairs)
    if len(header) != len(pairs):
        raise ValueError("repeated member")
    return header


def _protected_header(compact: bytes, loc: str) -> dict[str, Any]:
    """PROTOCOL §5.4 steps 3-8: the JWS form and its protected header, or raise."""
    parts = compact.split(b".")
    if len(parts) != 3 or parts[1] != b"" or not parts[0] or not parts[2]:
        raise SignatureError("signature is not a detached compact JWS", location=loc)
    if not _B64URL.fullmatch(parts[0]) or len(parts[0]) % 4 == 1:
        raise SignatureError("protected header is not base64url", location=loc)
    try:
        raw = base64.urlsafe_b64decode(parts[0] + b"=" * (-len(parts[0]) % 4))
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SignatureError(
            "protected header is not a JSON object without repeated members", location=loc
        ) from None
    if not isinstance(header, dict):
        raise SignatureError("protected header is not a JSON object", location=loc)
    # Only the members PROTOCOL §5.2 lists: crit, b64, typ, x5c, jku... would each ask a
    # verifier for behaviour this protocol does not have.
    # A member's name is the sender's text (it may be a patient's name, or a newline
    # and a forged log line): named only when written as an element name is.
    extra = sorted(name for name in header if name not in _HEADER_TYPES)
    if extra:
        raise SignatureError(
            "protected header member not allowed by the protocol",
            location=f"{loc}#{member_label(extra[0])}",
        )
    for name in HEADER_MEMBERS:
        if name not in header:
            raise SignatureError("protected header member missing", location=f"{loc}#{name}")
    for name in HEADER_MEMBERS:
        # ``type(...) is``: JSON true is not an integer, 1.7e9 is not one either.
        if type(header[name]) is not _HEADER_TYPES[name]:
            raise SignatureError(
                "protected header member has the wrong type", location=f"{loc}#{name}"
            )
    if algorithms.get(header["alg"]) is None:
        raise SignatureError("signature algorithm not allowed", location=f"{loc}#alg")
    return header


def _recent(header: dict[str, Any], now: datetime, window: timedelta) -> bool:
    """Whether the (not yet verified) ``iat`` is within ``window`` of ``now``."""
    return bool(abs(now.timestamp() - header["iat"]) <= window.total_seconds())


def _signing_key(
    header: dict[str, Any], keyring: KeyRing, expected_issuer: str, loc: str, fresh: bool
) -> KeyEntry:
    """PROTOCOL §5.4 steps 10-12: a known key of the expected partner, of the header's
    alg, and for a new signature (``fresh``: a new message, or evidence signed within
    the window) an algorithm the configuration accepts from that partner. Older evidence
    (the original receipt returned to a resend) may predate a change of the link's
    algorithm: it is held to the algorithm of the key that made it. ``iat`` is not yet
    verified here; a changed ``iat`` fails the signature at the next step."""
    entry = keyring.get(header["kid"])
    if entry is None:
        raise SignatureError("signing key id is not in the key ring", location=f"{loc}#kid")
    if entry.partner_id != expected_issuer:
        raise SignatureError("signing key belongs to another partner", location=f"{loc}#kid")
    if header["alg"] != entry.algorithm:
        raise SignatureError("signature algorithm does not match the key", location=f"{loc}#alg")
    accepted = keyring.accepted(expected_issuer)
    if fresh and accepted is not None and entry.algorithm not in accepted:
        raise SignatureError(
            "signature algorithm is not one configured for this partner", location=f"{loc}#alg"
        )
    return entry


_DECOYS: dict[str, Any] = {}


def _decoy_key(alg: str) -> Any | None:
    """A throwaway public key for ``alg`` (None for an algorithm it cannot make)."""
    if alg not in _DECOYS:
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        _DECOYS[alg] = (
            ec.generate_private_key(ec.SECP256R1()).public_key() if alg == "ES256"
            else ed25519.Ed25519PrivateKey.generate().public_key() if alg == "Ed25519"
            else None
        )
    return _DECOYS[alg]


def _key_or_decoy(
    header: dict[str, Any], keyring: KeyRing, expected_issuer: str, loc: str, fresh: bool,
    compact: bytes, payloads: Callable[[], tuple[bytes, ...]],
) -> KeyEntry:
    """:func:`_signing_key`, taking as long when it fails as when it succeeds.

    A key id that is unknown, or another partner's, is refused only after the same
    signature verification a known key gets (against a throwaway key of the header's
    algorithm): the time of a refusal does not tell which key ids are registered, nor
    for whom. The refusal itself is the one §5.4 fixes."""
    try:
        return _signing_key(header, keyring, expected_issuer, loc, fresh)
    except SignatureError:
        _decoy_verification(header["alg"], compact, payloads)
        raise


def _decoy_verification(alg: str, compact: bytes,
                        payloads: Callable[[], tuple[bytes, ...]]) -> None:
    """The work of :func:`_verified_payload`, against a throwaway key; no answer."""
    impl, decoy = algorithms.get(alg), _decoy_key(alg)
    if impl is None or decoy is None:
        return
    encoded_header, _, encoded_signature = compact.split(b".")
    try:
        signature = base64.urlsafe_b64decode(
            encoded_signature + b"=" * (-len(encoded_signature) % 4))
        forms = payloads()
    except (ValueError, binascii.Error, SignatureError):
        return
    for payload in forms:
        try:
            impl.verify(decoy, signature, encoded_header + b"." + _b64url(payload))
        except Exception:  # noqa: BLE001, S110 - the answer is already decided
            pass


def _verified_payload(
    compact: bytes,
    payloads: tuple[bytes, ...],
    entry: KeyEntry,
    expected_issuer: str,
    header: dict[str, Any],
    loc: str,
) -> bytes:
    """PROTOCOL §5.4 steps 13-14: the payload form the signature covers, then ``iss``."""
    encoded_header, _, encoded_signature = compact.split(b".")
    try:
        if len(encoded_header) > _MAX_HEADER_CHARS or not _B64URL.fullmatch(encoded_signature):
            raise ValueError("not a signature")
        signature = base64.urlsafe_b64decode(encoded_signature + b"=" * (-len(encoded_signature) % 4))
    except (ValueError, binascii.Error):
        raise SignatureError("signature does not verify", location=loc) from None
    for payload in payloads:
        if entry.impl.verify(entry.public_key, signature, encoded_header + b"." + _b64url(payload)):
            break
    else:
        raise SignatureError("signature does not verify", location=loc)
    if header["iss"] != expected_issuer:
        raise SignatureError("signed issuer is not the expected partner", location=f"{loc}#iss")
    return payload


#: The members of ``Bundle.signature`` (PROTOCOL §5's table, in its order).
SIGNATURE_MEMBERS = ("type", "when", "who", "sigFormat", "data")
#: Each value ``Signature.type`` may have: one coding, author or verification.
_SIGNATURE_TYPE_VALUES = [[{"system": SIGNATURE_TYPE_SYSTEM, "code": code}]
                          for code in SIGNATURE_TYPES.values()]


def _exactly_as_signed(signature: dict[str, Any], header: dict[str, Any]) -> None:
    """PROTOCOL §5.4 step 15: ``Bundle.signature`` holds what §5's table says and nothing
    else. No signature covers that element (§5.1 signs the bundle without it), so anything
    more in it (an extension, ``onBehalfOf``, a ``who`` with more than its identifier, a
    ``when`` other than ``iat``, another ``type``) would be stored, and kept as evidence,
    as if the signer had said it. Raises :class:`SignatureError` at the first member that
    differs: any member outside the table (the first in code-point order), then ``type``,
    ``when`` and ``who`` in the table's order. ``header`` is authentic."""
    extra = sorted(k for k in signature if k not in SIGNATURE_MEMBERS)
    if extra:
        raise SignatureError("Bundle.signature carries a member no signature covers",
                             location=f"{_SIG_LOC}.{member_label(extra[0])}")
    kinds = signature.get("type")
    if kinds not in _SIGNATURE_TYPE_VALUES:
        raise SignatureError("Signature.type must be one coding: verification or author",
                             location=f"{_SIG_LOC}.type")
    try:
        when = _signature_when(header["iat"])
    except (OverflowError, OSError, ValueError):
        when = None  # not a representable time: refused at #iat (step 17)
    if when is not None and signature.get("when") != when:
        raise SignatureError("Signature.when must be the signing time (iat)",
                             location=f"{_SIG_LOC}.when")
    if signature.get("who") != {"identifier": {"system": PARTNER_SYSTEM, "value": header["iss"]}}:
        raise SignatureError("Signature.who does not name the signer, or carries more than "
                             "its identifier", location=f"{_SIG_LOC}.who")


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
    """PROTOCOL §5.4 steps 17-19: key validity at ``iat`` (a signature fault), then the
    audience and the time window (replay faults)."""
    try:
        issued_at = datetime.fromtimestamp(header["iat"], UTC)
    except (OverflowError, OSError, ValueError):
        raise SignatureError("signature time is out of range", location=f"{loc}#iat") from None
    if not (entry.not_before <= issued_at <= entry.not_after):
        raise SignatureError(
            "signing certificate was not valid at the signing time", location=f"{loc}#kid"
        )
    if header["aud"] != expected_audience:
        raise ReplayError("addressed to another partner", location=f"{loc}#aud")
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
