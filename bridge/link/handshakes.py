"""What became of a TLS handshake that did not complete, and how much of it is audited.

Three kinds of failure look alike to ``loop.start_tls`` but mean different things:

``refused``
    The bridge refused the client: its certificate (expired, not yet valid, from an
    unknown CA, revoked, missing) or its offer (TLS version, suites, groups). Each is
    recorded as ``tls.refused`` with a specific reason and, when a certificate was
    presented, its SHA-256 fingerprint (PROTOCOL P-TLS-9).
``stalled``
    The client connected and did not finish the handshake in time.
``dropped`` / ``aborted``
    The client went away before finishing (closed, reset, killed), or ended the
    handshake itself with an alert (it did not trust this server).

Stalls, drops and aborts say nothing about a certificate and cost a client nothing to
produce, so they are never written one row each: they are counted, and one
``tls.incomplete`` row per window holds the counts. Refusals are written at once, one
row per distinct (reason, fingerprint) in a window; repeats of the same refusal within
the window are counted and written as one row with ``repeated=N`` when the window
closes, and past ``max_distinct`` distinct refusals a window writes one overflow row.
The number of durable rows is thus bounded per window whatever a client does, and
every failed handshake is still counted in the trail.
"""

from __future__ import annotations

import errno
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("bridge.link.tls")

Kind = Literal["refused", "stalled", "dropped", "aborted"]

#: OpenSSL X509_V_ERR_* codes that name why a certificate was refused.
_VERIFY_REASONS = {
    2: "unknown-ca",  # unable to get issuer certificate
    3: "crl-unavailable",
    9: "certificate-not-yet-valid",
    10: "certificate-expired",
    11: "crl-not-yet-valid",
    12: "crl-expired",
    18: "unknown-ca",  # self-signed leaf
    19: "unknown-ca",  # self-signed certificate in chain
    20: "unknown-ca",  # unable to get local issuer certificate
    21: "unknown-ca",  # unable to verify the first certificate
    23: "certificate-revoked",
    26: "certificate-wrong-purpose",
}

#: OpenSSL reason strings of refusals that are not about a certificate.
_PROTOCOL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-certificate",
    "UNSUPPORTED_PROTOCOL": "protocol-version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol-version",
    "NO_SHARED_CIPHER": "no-shared-cipher",
    "NO_SUITABLE_KEY_SHARE": "no-shared-group",
    "NO_SHARED_GROUPS": "no-shared-group",
    "HTTP_REQUEST": "not-tls",
    "HTTPS_PROXY_REQUEST": "not-tls",
    "WRONG_VERSION_NUMBER": "not-tls",
    "UNKNOWN_PROTOCOL": "not-tls",
}


@dataclass(frozen=True)
class HandshakeFailure:
    """One failed handshake, as the listener saw it."""

    kind: Kind
    reason: str  # a short code, never text from the peer
    address: str
    fingerprint: str | None = None  # "sha256:<hex>" of the certificate presented


def classify(exc: BaseException | None, address: str, fingerprint: str | None) -> HandshakeFailure:
    """Sort the exception ``start_tls`` raised (None: the connection just closed)."""
    if exc is None:
        return HandshakeFailure("dropped", "closed", address)
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = int(exc.verify_code or 0)
        reason = _VERIFY_REASONS.get(code, f"certificate-invalid-{code}")
        return HandshakeFailure("refused", reason, address, fingerprint)
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return HandshakeFailure("dropped", "eof", address)
    if isinstance(exc, ssl.SSLError):
        name = (exc.reason or "").upper()
        if name in _PROTOCOL_REASONS:
            reason = _PROTOCOL_REASONS[name]
            return HandshakeFailure(
                "refused", reason, address, None if reason == "no-certificate" else fingerprint
            )
        if "ALERT" in name:
            # The client ended the handshake with an alert: it refused us.
            return HandshakeFailure("aborted", name.lower().replace("_", "-"), address)
        if "EOF" in name:
            return HandshakeFailure("dropped", "eof", address)
        return HandshakeFailure("refused", (name or "tls-error").lower().replace("_", "-"),
                                address, fingerprint)
    # Python 3.11's asyncio raises ConnectionAbortedError when the handshake timeout
    # fires; later versions raise TimeoutError.
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return HandshakeFailure("stalled", "timeout", address)
    if isinstance(exc, type) and issubclass(exc, ConnectionError):
        return HandshakeFailure("dropped", "eof", address)  # asyncio passes the class
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, None):
        return HandshakeFailure("dropped", "reset", address)
    return HandshakeFailure("dropped", type(exc).__name__, address)


@dataclass(frozen=True)
class HandshakeRecord:
    """One audit row to write: ``tls.refused`` or ``tls.incomplete``."""

    action: str
    subject: str
    detail: str
    digest: str | None = None


HandshakeHook = Callable[[HandshakeRecord], Awaitable[None]]


class HandshakeAudit:
    """Turns failures into a bounded number of audit rows (see the module docstring)."""

    def __init__(
        self,
        write: HandshakeHook | None,
        *,
        listener: str,
        window: float = 60.0,
        max_distinct: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._listener = listener
        self.window = window
        self._max_distinct = max_distinct
        self._clock = clock
        self._window_start = clock()
        self._refusals: dict[tuple[str, str | None], tuple[str, int]] = {}
        self._overflow = 0
        self._counts: dict[str, int] = {"stalled": 0, "dropped": 0, "aborted": 0}
        #: Totals since start, for status and metrics.
        self.totals: dict[str, int] = {"refused": 0, "stalled": 0, "dropped": 0, "aborted": 0}

    async def failed(self, failure: HandshakeFailure) -> None:
        self.totals[failure.kind] += 1
        if self._clock() - self._window_start >= self.window:
            await self.flush()
        if failure.kind != "refused":
            self._counts[failure.kind] += 1
            log.debug("TLS handshake %s from %s (%s)", failure.kind, failure.address,
                      failure.reason)
            return
        key = (failure.reason, failure.fingerprint)
        seen = self._refusals.get(key)
        if seen is not None:
            self._refusals[key] = (seen[0], seen[1] + 1)
            return
        if len(self._refusals) >= self._max_distinct:
            self._overflow += 1
            return
        self._refusals[key] = (failure.address, 0)
        log.warning("TLS handshake refused from %s: %s", failure.address, failure.reason)
        await self._emit(
            HandshakeRecord(
                "tls.refused", f"peer:{failure.address}", failure.reason, failure.fingerprint
            )
        )

    async def flush(self) -> None:
        """Write what the window counted, and start a new window."""
        refusals, overflow, counts = self._refusals, self._overflow, self._counts
        self._refusals, self._overflow = {}, 0
        self._counts = {"stalled": 0, "dropped": 0, "aborted": 0}
        self._window_start = self._clock()
        for (reason, fingerprint), (address, repeated) in refusals.items():
            if repeated:
                await self._emit(
                    HandshakeRecord(
                        "tls.refused", f"peer:{address}", f"{reason} repeated={repeated}",
                        fingerprint,
                    )
                )
        if overflow:
            await self._emit(
                HandshakeRecord("tls.refused", self._listener, f"other-refusals count={overflow}")
            )
        if any(counts.values()):
            detail = " ".join(f"{k}={v}" for k, v in counts.items())
            log.info("TLS handshakes not completed on %s: %s", self._listener, detail)
            await self._emit(HandshakeRecord("tls.incomplete", self._listener, detail))

    async def _emit(self, record: HandshakeRecord) -> None:
        if self._write is None:
            return
        try:
            await self._write(record)
        except Exception:  # the refusal stands even if recording it fails
            log.exception("could not record a failed TLS handshake")
