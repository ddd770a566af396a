"""The identity inside a peer certificate (no :mod:`ssl` needed to read it)."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from bridge.errors import TrustError, UnknownPartner
from bridge.trust.pki import PARTNER_URI_PREFIX


@dataclass(frozen=True)
class CertIdentity:
    """What the bridge reads from a (TLS-verified) peer certificate."""

    fingerprint_sha256: str  # hex, lowercase, of the DER certificate
    common_name: str | None
    dns_names: tuple[str, ...]
    uri_sans: tuple[str, ...]
    partner_id: str | None  # from the ``urn:ws-fhir-bridge:partner:<id>`` URI SAN
    not_after: datetime  # timezone-aware UTC
    not_before: datetime | None = None  # timezone-aware UTC
    serial_number: int | None = None
    issuer: str | None = None  # the issuer's name, RFC 4514 (to match a CRL)


def pinned(fingerprint: str, pins: Iterable[str]) -> bool:
    """Whether ``fingerprint`` is one of ``pins``, compared in constant time and without
    stopping at the first match, so the time taken tells nothing about the pins."""
    found = False
    for pin in pins:
        found |= hmac.compare_digest(fingerprint.encode(), pin.encode())
    return found


def fingerprint_sha256(der: bytes) -> str:
    """Lowercase hex SHA-256 of a DER certificate (the registry's fingerprint format)."""
    return hashlib.sha256(der).hexdigest()


def certificate_identity(der: bytes) -> CertIdentity:
    """Read the identity of a DER certificate.

    Raises :class:`TrustError` when the bytes are not a certificate, and
    :class:`UnknownPartner` when the certificate names more than one partner.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise TrustError(
            "peer certificate is not valid DER", location="tls.peer_certificate"
        ) from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(cns[0].value) if cns else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        uri_sans = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns_names, uri_sans = (), ()
    partner_ids = {
        u[len(PARTNER_URI_PREFIX) :] for u in uri_sans if u.startswith(PARTNER_URI_PREFIX)
    }
    partner_ids.discard("")
    if len(partner_ids) > 1:
        # Ambiguous is nobody: the certificate maps to no one partner (401 on the wire).
        raise UnknownPartner(
            "peer certificate names more than one partner", location="tls.peer_certificate.SAN"
        )
    return CertIdentity(
        fingerprint_sha256=fingerprint_sha256(der),
        common_name=common_name,
        dns_names=dns_names,
        uri_sans=uri_sans,
        partner_id=next(iter(partner_ids), None),
        not_after=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
        serial_number=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
    )


@functools.lru_cache(maxsize=1024)
def peer_identity(der: bytes) -> CertIdentity:
    """:func:`certificate_identity`, read once per certificate: a long-lived connection
    presents the same certificate for every request (the identity is immutable, and a
    certificate that cannot be read is refused on every request)."""
    return certificate_identity(der)
