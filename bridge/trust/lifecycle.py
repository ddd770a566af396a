"""Certificate lifecycle for operators: issue, revoke (with a CRL), rotate, inspect, and
which certificates of a configuration expire soon.

Works on the folder layout of :func:`bridge.trust.pki.init_dev_pki` (``ca.pem``,
``ca.key``, ``<id>/tls.pem``...). Revoked serial numbers are kept in ``revoked.txt``
next to the CA, one hexadecimal serial per line with the revocation time, and
``crl.pem`` is re-signed from that list on every change; a bridge whose ``[tls] crl``
names it picks the new list up on ``SIGHUP`` (``bridge serve``) without a restart.

Rotation never destroys a key: the previous certificate and key are kept beside the
new ones as ``<what>.<serial>.pem``/``.key``. For signing keys that is the overlap
period: partners list both certificates in ``signing_certs`` (a verifier accepts a
signature by any certificate of the partner valid at its ``iat``, PROTOCOL P-KEY-2),
then drop the old one; revoking it ends the overlap for this bridge's own CRL.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.errors import ConfigError, NotFound, UsageError
from bridge.trust.pki import (
    PARTNER_URI_PREFIX,
    _check_controller_id,
    _write_public,
    _write_secret,
    certificate_pem,
    controller_files,
    issue_certificate,
    issue_crl,
    load_certificate,
    load_certificates,
    load_private_key,
    private_key_pem,
)

#: ``bridge status`` warns this many days before a certificate expires.
EXPIRY_WARNING_DAYS = 30


def _ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    for name in ("ca.pem", "ca.key"):
        if not (directory / name).is_file():
            raise NotFound("no CA in this folder (bridge certs init makes one)",
                           location=str(directory / name))
    key = load_private_key(directory / "ca.key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be EC P-256", location=str(directory / "ca.key"))
    return load_certificate(directory / "ca.pem"), key


@dataclass(frozen=True)
class Issued:
    what: str  # tls | signing
    cert: Path
    key: Path
    certificate: x509.Certificate


def issue(
    directory: Path,
    controller_id: str,
    *,
    now: datetime,
    what: Sequence[str] = ("tls", "signing"),
    days: int = 825,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    force: bool = False,
) -> list[Issued]:
    """Issue certificates for a controller (this bridge's or a partner's) from the CA.

    The TLS certificate carries the partner URI SAN and ``dns_names``/``ip_addresses``;
    the signing certificate only the partner URI. Existing files are kept unless
    ``force`` (use :func:`rotate` to replace a certificate in service).
    """
    _check_controller_id(controller_id)
    ca, ca_key = _ca(directory)
    files = controller_files(directory, controller_id)
    out: list[Issued] = []
    for kind in what:
        cert_path, key_path = (
            (files.tls_cert, files.tls_key) if kind == "tls" else (files.sign_cert, files.sign_key)
        )
        if cert_path.exists() and not force:
            raise ConfigError(
                "certificate already exists; `bridge certs rotate` replaces one in service",
                location=str(cert_path),
            )
        cert, key = issue_certificate(
            ca, ca_key, controller_id if kind == "tls" else f"{controller_id} signing",
            purpose="tls" if kind == "tls" else "signing", now=now, days=days,
            dns_names=dns_names, ip_addresses=ip_addresses, partner_id=controller_id,
        )
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write_secret(key_path, private_key_pem(key))
        _write_public(cert_path, certificate_pem(cert))
        out.append(Issued(kind, cert_path, key_path, cert))
    return out


def _revoked(directory: Path) -> dict[int, str]:
    path = directory / "revoked.txt"
    found: dict[int, str] = {}
    if path.exists():
        for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            try:
                found[int(parts[0], 16)] = parts[1] if len(parts) > 1 else ""
            except ValueError:
                raise ConfigError("not a hexadecimal serial number",
                                  location=f"{path}:{n}") from None
    return found


def write_crl(directory: Path, *, now: datetime, days: int = 7) -> Path:
    """Sign ``crl.pem`` from ``revoked.txt`` (also to renew it before ``nextUpdate``)."""
    ca, ca_key = _ca(directory)
    crl = issue_crl(ca, ca_key, sorted(_revoked(directory)), now=now, days=days)
    path = directory / "crl.pem"
    _write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def revoke(directory: Path, cert_file: Path, *, now: datetime, crl_days: int = 7) -> Path:
    """Add the certificate in ``cert_file`` to the revocation list and re-sign the CRL."""
    ca, _ = _ca(directory)
    cert = load_certificate(cert_file)
    if cert.issuer != ca.subject:
        raise UsageError("certificate was not issued by this CA", location=str(cert_file))
    revoked = _revoked(directory)
    if cert.serial_number not in revoked:
        line = f"{cert.serial_number:x} {now.astimezone(UTC).isoformat(timespec='seconds')}\n"
        with (directory / "revoked.txt").open("a", encoding="ascii") as handle:
            handle.write(line)
    return write_crl(directory, now=now, days=crl_days)


@dataclass(frozen=True)
class Rotated:
    what: str
    new: Issued
    previous_cert: Path
    previous_key: Path
    previous_valid_until: datetime


def rotate(
    directory: Path, controller_id: str, what: str, *, now: datetime, days: int = 825,
    dns_names: Sequence[str] = ("localhost",), ip_addresses: Sequence[str] = ("127.0.0.1",),
) -> Rotated:
    """Replace a controller's TLS or signing certificate and key, keeping the previous
    pair beside them as ``<what>.<serial>.pem``/``.key``."""
    if what not in ("tls", "signing"):
        raise UsageError("rotate tls or signing", location="WHAT")
    files = controller_files(directory, controller_id)
    cert_path, key_path = (
        (files.tls_cert, files.tls_key) if what == "tls" else (files.sign_cert, files.sign_key)
    )
    if not cert_path.exists():
        raise NotFound("no certificate to rotate (bridge certs issue makes one)",
                       location=str(cert_path))
    old = load_certificate(cert_path)
    stem = "tls" if what == "tls" else "sign"
    prev_cert = cert_path.with_name(f"{stem}.{old.serial_number:x}.pem")
    prev_key = key_path.with_name(f"{stem}.{old.serial_number:x}.key")
    _write_public(prev_cert, cert_path.read_bytes())
    _write_secret(prev_key, key_path.read_bytes())
    new = issue(directory, controller_id, now=now, what=(what,), days=days,
                dns_names=dns_names, ip_addresses=ip_addresses, force=True)[0]
    return Rotated(what, new, prev_cert, prev_key, old.not_valid_after_utc)


# --- inspect and expiry ---------------------------------------------------------------------


def describe(cert: x509.Certificate, *, now: datetime) -> dict[str, Any]:
    """What an operator wants to know of a certificate, as data."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        uris, dns, ips = [], [], []
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        usages = [n for n in ("digital_signature", "content_commitment", "key_cert_sign",
                              "crl_sign") if getattr(usage, n)]
    except x509.ExtensionNotFound:
        usages = []
    der = cert.public_bytes(serialization.Encoding.DER)
    days_left = (cert.not_valid_after_utc - now).total_seconds() / 86400
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": int(days_left // 1),
        "expired": days_left < 0,
        "expires_soon": 0 <= days_left <= EXPIRY_WARNING_DAYS,
        "partners": [u[len(PARTNER_URI_PREFIX):] for u in uris
                     if u.startswith(PARTNER_URI_PREFIX)],
        "dns": dns,
        "ip": ips,
        "key_usage": usages,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "kid": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode(),
    }


def inspect(path: Path, *, now: datetime) -> list[dict[str, Any]]:
    """Every certificate (or CRL) in a PEM file, described."""
    data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise NotFound("no such file", location=str(path))
    if b"-----BEGIN X509 CRL-----" in data:
        crl = x509.load_pem_x509_crl(data)
        return [{
            "crl_issuer": crl.issuer.rfc4514_string(),
            "last_update": crl.last_update_utc.isoformat(),
            "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
            "revoked": [f"{r.serial_number:x}" for r in crl],
            "out_of_date": bool(crl.next_update_utc and crl.next_update_utc < now),
        }]
    return [describe(c, now=now) for c in load_certificates(path)]
