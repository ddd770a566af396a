"""The certificates a controller depends on, and when each expires.

Every certificate file the configuration names is watched, whatever it is for: our TLS
pair (served to partners, the HIS and MLLP clients alike), every signing certificate
(``[signing]`` and ``[[signing.keys]]``), the CA bundle, the operator CA, each
partner's signing certificates, and each hand-off destination's CA and client
certificate. :func:`check` says, the same way for ``/readyz``, the status page and
``bridge status``, whether one is valid and further than the warning from expiry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from bridge.config import BridgeConfig


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate file of the configuration (a CA bundle gives one per certificate)."""

    name: str  # what it is for: "tls", "signing", "ca", "ca[1]", "partner:insurer-b:signing",
    # "signing.keys[0]", "operator-ca", "handoff:<id>:ca", "handoff:<id>:client"
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
    """Every certificate file the configuration names (see the module docstring)."""
    found = [
        *_read("tls", config.tls.cert),
        *_read("signing", config.signing.cert),
        *_read("ca", config.tls.ca),
    ]
    for i, extra in enumerate(config.signing.keys):
        found.extend(_read(f"signing.keys[{i}]", extra.cert))
    ops = config.operations
    if ops is not None and ops.operator_ca is not None:
        found.extend(_read("operator-ca", ops.operator_ca))
    for partner in config.partners:
        for i, path in enumerate(partner.signing_certs):
            suffix = "" if i == 0 else f"[{i}]"
            found.extend(_read(f"partner:{partner.id}:signing{suffix}", path))
    for dest in config.handoff:
        if dest.ca is not None:
            found.extend(_read(f"handoff:{dest.id}:ca", dest.ca))
        if dest.client_cert is not None:
            found.extend(_read(f"handoff:{dest.id}:client", dest.client_cert))
    return found


@dataclass(frozen=True)
class CertificateCheck:
    """Whether one certificate is fit: valid now and further than the warning from expiry."""

    name: str
    ok: bool
    detail: str
    days_left: float | None  # None when it cannot be read or is not valid now


def check(cert: CertificateInfo, now: datetime, warning_days: int) -> CertificateCheck:
    """The verdict on ``cert`` at ``now`` with a warning ``warning_days`` before expiry."""
    if cert.problem is not None:
        return CertificateCheck(cert.name, False, f"{cert.problem} ({cert.path})", None)
    if not cert.valid_at(now):
        return CertificateCheck(cert.name, False, "not valid now", None)
    days = cert.days_left(now) or 0.0
    ok = days >= warning_days
    detail = f"expires {cert.not_after.isoformat() if cert.not_after else '-'}"
    if not ok:
        detail += f", within {warning_days} days"
    return CertificateCheck(cert.name, ok, detail, days)


#: The warning when the configuration has no [operations] section to set it.
DEFAULT_WARNING_DAYS = 30


def warning_days(config: BridgeConfig) -> int:
    """``[operations] certificate_warning_days``, or 30 without an operations section."""
    ops = config.operations
    return ops.certificate_warning_days if ops is not None else DEFAULT_WARNING_DAYS


def certificate_report(config: BridgeConfig, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every configured certificate with its verdict, as ``bridge status --json`` lists them."""
    when = now if now is not None else datetime.now(UTC)
    days = warning_days(config)
    out = []
    for cert in configured_certificates(config):
        verdict = check(cert, when, days)
        out.append({"certificate": cert.name, "path": str(cert.path), "subject": cert.subject,
                    "not_after": cert.not_after.isoformat() if cert.not_after else None,
                    # Whole days, as people count them: 19.9 days left is "19 days".
                    "days_left": None if verdict.days_left is None else math.floor(verdict.days_left),
                    "ok": verdict.ok, "detail": verdict.detail})
    return out


__all__ = ["CertificateCheck", "CertificateInfo", "certificate_report", "check",
           "configured_certificates", "warning_days"]
