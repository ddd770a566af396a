"""Operator certificates: a person's client certificate for the operations port.

An operator certificate carries two URI SANs, ``urn:ws-fhir-bridge:operator:<controller>:
<name>`` and ``urn:ws-fhir-bridge:role:<role>``, and the extended key usage clientAuth
only. It names no partner, so the partner-facing listener never takes it for one, and a
partner's certificate names no operator, so the operations port never takes it for
one. The controller in the URI keeps a certificate issued for one bridge from opening
another bridge whose CA happens to be the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.errors import TrustError

OPERATOR_URI_PREFIX = "urn:ws-fhir-bridge:operator:"
ROLE_URI_PREFIX = "urn:ws-fhir-bridge:role:"
_LOC = "TLS.client-certificate"


@dataclass(frozen=True)
class OperatorIdentity:
    """What an operator certificate says: for which bridge, who, in which role."""

    controller: str
    name: str
    role: str


def issue_operator_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    controller: str,
    name: str,
    role: str,
    now: datetime,
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue an operator certificate (EC P-256, clientAuth only) and its new key."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, controller),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(f"{OPERATOR_URI_PREFIX}{controller}:{name}"),
            x509.UniformResourceIdentifier(f"{ROLE_URI_PREFIX}{role}"),
        ]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def operator_identity(der: bytes) -> OperatorIdentity:
    """The operator a DER certificate names, or :class:`TrustError` when it names none
    (or more than one, or no role)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise TrustError("not an operator certificate", location=_LOC) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    operators = [u[len(OPERATOR_URI_PREFIX):] for u in uris if u.startswith(OPERATOR_URI_PREFIX)]
    roles = [u[len(ROLE_URI_PREFIX):] for u in uris if u.startswith(ROLE_URI_PREFIX)]
    if len(operators) != 1 or len(roles) != 1:
        raise TrustError("not an operator certificate", location=_LOC)
    controller, sep, name = operators[0].partition(":")
    if not sep or not controller or not name:
        raise TrustError("operator certificate names no operator", location=_LOC)
    return OperatorIdentity(controller, name, roles[0])


__all__ = [
    "OPERATOR_URI_PREFIX",
    "ROLE_URI_PREFIX",
    "OperatorIdentity",
    "issue_operator_certificate",
    "operator_identity",
]
