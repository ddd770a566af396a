"""The checks a client certificate must pass on every request, not only at the handshake.

A TLS handshake checks the client's certificate once. A connection can outlive the
certificate (kept alive for hours), and a resumed session would skip the check
altogether (the listener resumes none, but the rule must not depend on that). So the
receiver checks the certificate of the connection again for every request
(PROTOCOL P-TLS-7): its validity period at the time of the request and, when a CRL is
configured, that it is not revoked and that the CRL is current. Partner binding and
fingerprint pins are the registry's part of the same per-request check.

Pure: certificates and CRLs are read with ``cryptography``; no :mod:`ssl`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from bridge.errors import CertificateRejected, ConfigError
from bridge.trust.identity import CertIdentity, peer_identity

_LOC = "TLS.client-certificate"


@dataclass(frozen=True)
class RevocationList:
    """The revoked serial numbers of one issuer and how long the list is current."""

    issuer: str  # the issuer name, RFC 4514
    revoked: frozenset[int]
    next_update: datetime | None


@dataclass(frozen=True)
class PeerCertificateCheck:
    """Per-request validity of a connection's client certificate."""

    crls: tuple[RevocationList, ...] = field(default_factory=tuple)

    @classmethod
    def from_crl_file(cls, path: str | os.PathLike[str] | None) -> PeerCertificateCheck:
        """Read every CRL of a PEM file (the ``[tls] crl`` setting); ``None``: no CRL."""
        if path is None:
            return cls()
        try:
            data = open(path, "rb").read()  # noqa: SIM115 - read at start, once
        except OSError as exc:
            raise ConfigError(
                f"CRL file cannot be read ({exc.strerror or type(exc).__name__})",
                location=os.fspath(path),
            ) from None
        return cls(tuple(_read_crls(data, os.fspath(path))))

    def check(self, der: bytes, now: datetime) -> CertIdentity:
        """The certificate's identity, or :class:`CertificateRejected` naming why not."""
        identity = peer_identity(der)  # parsed once per certificate
        if identity.not_before is not None and now < identity.not_before:
            raise CertificateRejected("client certificate is not yet valid", location=_LOC)
        if now > identity.not_after:
            raise CertificateRejected("client certificate has expired", location=_LOC)
        if self.crls:
            crl = next((c for c in self.crls if c.issuer == identity.issuer), None)
            if crl is None:
                raise CertificateRejected(
                    "no CRL of the client certificate's issuer is configured", location=_LOC
                )
            if crl.next_update is not None and now > crl.next_update:
                raise CertificateRejected(
                    "the CRL of the client certificate's issuer is out of date", location=_LOC
                )
            if identity.serial_number in crl.revoked:
                raise CertificateRejected("client certificate is revoked", location=_LOC)
        return identity


def _read_crls(data: bytes, where: str) -> Iterable[RevocationList]:
    blocks = data.split(b"-----END X509 CRL-----")
    found = False
    for block in blocks:
        start = block.find(b"-----BEGIN X509 CRL-----")
        if start < 0:
            continue
        try:
            crl = x509.load_pem_x509_crl(block[start:] + b"-----END X509 CRL-----\n")
        except ValueError:
            raise ConfigError("file holds an unreadable CRL", location=where) from None
        found = True
        yield RevocationList(
            issuer=crl.issuer.rfc4514_string(),
            revoked=frozenset(r.serial_number for r in crl),
            next_update=crl.next_update_utc,
        )
    if not found:
        raise ConfigError("file holds no PEM CRL", location=where)
