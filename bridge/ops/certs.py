"""The certificates a controller depends on, and when each expires."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from bridge.config import BridgeConfig


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate file of the configuration (a CA bundle gives one per certificate)."""

    name: str  # what it is for: "tls", "signing", "ca", "ca[1]", "partner:insurer-b:signing"
    path: Path
    subject: str
    not_before: datetime | None
    not_after: datetime | None
    problem: str | None = None  # why it could not be read

    def days_left(self, now: datetime) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / 86400

    def valid_at(self, now: datetime) -> bool:
        return (
            self.problem is None
            and self.not_before is not None
            and self.not_after is not None
            and self.not_before <= now <= self.not_after
        )


def _read(name: str, path: Path) -> list[CertificateInfo]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return [CertificateInfo(name, path, "", None, None, exc.strerror or "cannot read")]
    except ValueError:
        return [CertificateInfo(name, path, "", None, None, "not a PEM certificate")]
    return [
        CertificateInfo(
            name if i == 0 else f"{name}[{i}]",
            path,
            cert.subject.rfc4514_string(),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
        for i, cert in enumerate(certs)
    ]


def configured_certificates(config: BridgeConfig) -> list[CertificateInfo]:
    """Our TLS and signing certificates, the CA bundle, and each partner's signing certs."""
    found = [
        *_read("tls", config.tls.cert),
        *_read("signing", config.signing.cert),
        *_read("ca", config.tls.ca),
    ]
    for partner in config.partners:
        for i, path in enumerate(partner.signing_certs):
            suffix = "" if i == 0 else f"[{i}]"
            found.extend(_read(f"partner:{partner.id}:signing{suffix}", path))
    return found


__all__ = ["CertificateInfo", "configured_certificates"]
