"""Certificates for the bridge: a development CA, TLS and signing certificates, PEM loading.

Production bridges use the operator's own CA; they only need a CA bundle, their own
certificate and key, and the partner registry. The development PKI built here exists so
that two bridges on one machine (and the test suite) can talk mutual TLS and sign
payloads without any outside infrastructure.

Certificates are built with ``cryptography``'s builders so that they pass both OpenSSL
(the TLS handshake, with ``VERIFY_X509_STRICT``) and ``cryptography``'s own RFC 5280
verifier: the SAN is non-critical because the subject is not empty, every certificate
carries subject and authority key identifiers, and the CA's basic constraints are
critical. Time is always a parameter so expiry can be tested without waiting.

Keys written by :func:`init_dev_pki` are **unencrypted** PKCS#8 PEM files with mode
0600. That is acceptable for a development PKI only; a production key belongs in the
operator's key store.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.errors import ConfigError

#: URI SAN prefix that names the controller a certificate belongs to.
PARTNER_URI_PREFIX = "urn:ws-fhir-bridge:partner:"

#: id-kp-documentSigning (RFC 9336), the extended key usage of signing certificates.
DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")

#: Organisation name written into every certificate subject of the development PKI.
DEV_ORGANISATION = "ws-fhir-bridge development PKI"

# Certificates become valid a little before ``now`` so that a peer whose clock runs a
# few minutes behind does not reject a freshly issued certificate.
_BACKDATE = timedelta(minutes=5)

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KeyAlgorithm = Literal["ES256", "Ed25519"]
Purpose = Literal["tls", "signing"]


def _require_aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def generate_ca(
    common_name: str, *, now: datetime, days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed EC P-256 certification authority valid for ``days`` from ``now``.

    The CA may only issue end-entity certificates (``pathLenConstraint`` 0).
    """
    now = _require_aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _generate_key(algorithm: KeyAlgorithm) -> PrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported key algorithm {algorithm!r}")


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    purpose: Purpose,
    now: datetime,
    days: int = 825,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    partner_id: str | None = None,
    key_algorithm: KeyAlgorithm = "ES256",
) -> tuple[x509.Certificate, PrivateKey]:
    """Issue an end-entity certificate and its new private key.

    ``purpose="tls"``: key usage digitalSignature, extended key usage serverAuth and
    clientAuth (one certificate serves both directions of a link), SAN with
    ``dns_names``, ``ip_addresses`` and, when ``partner_id`` is given, the URI
    ``urn:ws-fhir-bridge:partner:<partner_id>`` that the partner registry reads.

    ``purpose="signing"``: key usage digitalSignature and contentCommitment
    (non-repudiation), extended key usage documentSigning only (so the key cannot
    authenticate a TLS connection), and only the partner URI in the SAN.
    ``key_algorithm`` selects ES256 (EC P-256, the default) or Ed25519 for signing keys.
    """
    now = _require_aware(now)
    if purpose == "tls" and key_algorithm != "ES256":
        # OpenSSL 3.0 clients negotiate Ed25519 certificates only under TLS 1.3; keep
        # TLS certificates on P-256 so TLS 1.2 peers still work.
        raise ValueError("TLS certificates use EC P-256 keys")
    key = _generate_key(key_algorithm)
    sans: list[x509.GeneralName] = []
    if purpose == "tls":
        sans.extend(x509.DNSName(name) for name in dns_names)
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses)
    elif purpose != "signing":
        raise ValueError(f"unknown certificate purpose {purpose!r}")
    if partner_id is not None:
        if not partner_id or any(ch.isspace() for ch in partner_id):
            raise ValueError("partner_id must be a non-empty token without spaces")
        sans.append(x509.UniformResourceIdentifier(PARTNER_URI_PREFIX + partner_id))

    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=purpose == "signing",
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if purpose == "tls":
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        # Without any extended key usage a certificate is valid for every purpose,
        # TLS included; documentSigning (RFC 9336) keeps signing keys out of handshakes.
        usages = [DOCUMENT_SIGNING]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issue_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Iterable[int],
    *,
    now: datetime,
    days: int = 7,
) -> x509.CertificateRevocationList:
    """Build a CRL of ``ca_cert`` revoking ``revoked_serials`` as of ``now``."""
    now = _require_aware(now)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _BACKDATE)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


# --- PEM files ------------------------------------------------------------------------


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM encoding of ``key`` (development use only)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found", location=str(path)) from None
    except OSError as exc:
        raise ConfigError(
            f"{what} file cannot be read ({exc.strerror or type(exc).__name__})",
            location=str(path),
        ) from None


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Load every certificate of a PEM file (a single certificate or a bundle)."""
    path = Path(path)
    data = _read(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        # The parser's message may quote file content; name only the file.
        raise ConfigError("file holds no valid PEM certificate", location=str(path)) from None
    return certs


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load the single PEM certificate in ``path`` (the first one of a bundle is refused)."""
    certs = load_certificates(path)
    if len(certs) != 1:
        raise ConfigError("expected exactly one PEM certificate", location=str(Path(path)))
    return certs[0]


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load an unencrypted PEM private key (EC P-256 or Ed25519)."""
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            "file holds no valid unencrypted PEM private key", location=str(path)
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ConfigError("private key must be EC P-256 or Ed25519", location=str(path))


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_secret(path: Path, data: bytes) -> None:
    # Create with 0600 from the start (never world-readable, even for an instant), and
    # chmod again because an existing file keeps its old mode when truncated.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- development PKI --------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerFiles:
    """Files of one controller in the development PKI."""

    tls_cert: Path
    tls_key: Path
    sign_cert: Path
    sign_key: Path


@dataclass(frozen=True)
class DevPKI:
    """Paths written by :func:`init_dev_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    controllers: dict[str, ControllerFiles]


def controller_files(directory: Path, controller_id: str) -> ControllerFiles:
    """Where the development PKI keeps the files of ``controller_id``."""
    sub = directory / controller_id
    return ControllerFiles(
        tls_cert=sub / "tls.pem",
        tls_key=sub / "tls.key",
        sign_cert=sub / "sign.pem",
        sign_key=sub / "sign.key",
    )


def _check_controller_id(controller_id: str) -> None:
    # The id becomes a directory name and a URI: keep it a plain token.
    ok = controller_id and all(ch.isalnum() or ch in "-_." for ch in controller_id)
    if not ok or controller_id.startswith("."):
        raise ConfigError(
            "controller id must be letters, digits, '-', '_' or '.'", location="controllers"
        )


def add_controller(
    directory: str | os.PathLike[str],
    controller_id: str,
    *,
    now: datetime,
    force: bool = False,
) -> ControllerFiles:
    """Issue TLS and signing certificates for ``controller_id`` from the CA in ``directory``.

    Refuses to replace the controller's existing files unless ``force`` is true.
    """
    directory = Path(directory)
    _check_controller_id(controller_id)
    files = controller_files(directory, controller_id)
    existing = [p for p in vars(files).values() if p.exists()]
    if existing and not force:
        raise ConfigError(
            "controller certificates already exist; `bridge certs init --force` replaces them",
            location=str(existing[0]),
        )
    ca_cert = load_certificate(directory / "ca.pem")
    ca_key = load_private_key(directory / "ca.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be EC P-256", location=str(directory / "ca.key"))
    files.tls_cert.parent.mkdir(parents=True, exist_ok=True)
    tls_cert, tls_key = issue_certificate(
        ca_cert, ca_key, controller_id, purpose="tls", now=now, partner_id=controller_id
    )
    sign_cert, sign_key = issue_certificate(
        ca_cert,
        ca_key,
        f"{controller_id} signing",
        purpose="signing",
        now=now,
        partner_id=controller_id,
    )
    _write_secret(files.tls_key, private_key_pem(tls_key))
    _write_public(files.tls_cert, certificate_pem(tls_cert))
    _write_secret(files.sign_key, private_key_pem(sign_key))
    _write_public(files.sign_cert, certificate_pem(sign_cert))
    return files


def init_dev_pki(
    directory: str | os.PathLike[str],
    controllers: Sequence[str],
    *,
    now: datetime | None = None,
    force: bool = False,
) -> DevPKI:
    """Create a development CA and one TLS plus one signing certificate per controller.

    Layout (keys are unencrypted PKCS#8 PEM with mode 0600 — development only)::

        <directory>/ca.pem  ca.key
        <directory>/<controller id>/tls.pem  tls.key  sign.pem  sign.key

    An existing CA is never replaced unless ``force`` is true, because replacing it
    silently invalidates every certificate already handed to partners. ``now``
    defaults to the current time (this is a command-line entry point).
    """
    directory = Path(directory)
    when = _require_aware(now) if now is not None else datetime.now(UTC)
    for controller_id in controllers:
        _check_controller_id(controller_id)
    if len(set(controllers)) != len(controllers):
        raise ConfigError("controller ids must be unique", location="controllers")
    ca_pem, ca_key_path = directory / "ca.pem", directory / "ca.key"
    for path in (ca_pem, ca_key_path):
        if path.exists() and not force:
            raise ConfigError(
                "a CA already exists here; `bridge certs init --force` replaces it",
                location=str(path),
            )
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = generate_ca("ws-fhir-bridge development CA", now=when)
    _write_secret(ca_key_path, private_key_pem(ca_key))
    _write_public(ca_pem, certificate_pem(ca_cert))
    written = {
        controller_id: add_controller(directory, controller_id, now=when, force=True)
        for controller_id in controllers
    }
    return DevPKI(directory=directory, ca_cert=ca_pem, ca_key=ca_key_path, controllers=written)
