"""TLS contexts for bridge links, and the identity inside a peer certificate.

This is the only trust module that imports :mod:`ssl`. One function per direction:
:func:`server_context` for the listener, :func:`client_context` for outbound
deliveries. Both require mutual authentication against the bridge's own CA bundle
(never the system trust store), TLS 1.2 at least, and the Mozilla "intermediate"
cipher list for TLS 1.2 (ECDHE with AES-GCM or ChaCha20-Poly1305 only). TLS 1.3
suites are OpenSSL's defaults, which are all AEAD. Key-exchange groups are Mozilla's
intermediate ones (X25519, P-256, P-384), set through :mod:`bridge.trust.openssl`
because Python 3.11 has no call for it.

The listener never resumes a session: no TLS 1.3 tickets (``num_tickets = 0``), no
TLS 1.2 tickets (``OP_NO_TICKET``) and no session-id cache. A resumed session would
skip certificate verification, and the certificate must be checked on every
connection (and, by the server, on every request: :mod:`bridge.trust.peercheck`).

Limits of Python's :mod:`ssl` that an operator should know:

* CRLs are read once: reloading a CRL means building a new context.
* There is no OCSP.

With TLS 1.3 a client learns that the server refused its certificate only on its
first read, not in the handshake: senders must treat such failures as configuration
faults (pause the link, alert), not as transient errors.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

from bridge.errors import ConfigError, TrustError

# Peer identity lives in an ssl-free module so the registry can use it; it is
# re-exported here because it is read from what the handshake delivers.
from bridge.trust.identity import CertIdentity, certificate_identity, fingerprint_sha256
from bridge.trust.openssl import NativeTLSUnavailable, disable_session_cache, set_groups

__all__ = [
    "INTERMEDIATE_CIPHERS",
    "INTERMEDIATE_GROUPS",
    "CertIdentity",
    "certificate_identity",
    "client_context",
    "fingerprint_sha256",
    "peer_certificate_der",
    "server_context",
]

#: Mozilla "intermediate" TLS 1.2 suites (server-side ECDHE only, AEAD only).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: Mozilla "intermediate" key-exchange groups (OpenSSL names).
INTERMEDIATE_GROUPS = ("X25519", "prime256v1", "secp384r1")

Pathish = str | os.PathLike[str]


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks: the certificates of the development PKI satisfy them, and
    # an operator's CA should too.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    _native(set_groups, ctx, ":".join(INTERMEDIATE_GROUPS))


def _native(setting: Callable[..., None], ctx: ssl.SSLContext, *args: object) -> None:
    try:
        setting(ctx, *args)
    except NativeTLSUnavailable as exc:
        # Starting with weaker TLS than PROTOCOL §2 promises is worse than not starting.
        raise ConfigError(f"TLS cannot be configured as required: {exc}", location="tls") from None


def _load_chain(ctx: ssl.SSLContext, cert_file: Pathish, key_file: Pathish) -> None:
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        if not os.path.isfile(path):
            raise ConfigError(f"TLS {what} file not found", location=os.fspath(path))
    try:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"TLS certificate and key cannot be loaded together ({exc.reason or 'invalid'})",
            location=f"{os.fspath(cert_file)}, {os.fspath(key_file)}",
        ) from None


def _load_verify(ctx: ssl.SSLContext, path: Pathish, what: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file not found", location=os.fspath(path))
    try:
        ctx.load_verify_locations(cafile=os.fspath(path))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{what} file cannot be loaded ({exc.reason or 'invalid'})", location=os.fspath(path)
        ) from None


def server_context(
    cert_file: Pathish, key_file: Pathish, ca_file: Pathish, *, crl_file: Pathish | None = None
) -> ssl.SSLContext:
    """Listener context: mutual TLS ≥ 1.2, client certificate required, no resumption.

    ``ca_file`` holds the CAs whose client certificates are accepted. With
    ``crl_file`` (PEM CRLs of those CAs) the leaf certificate is also checked for
    revocation; every CA in ``ca_file`` then needs a CRL in that file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    # No resumption of any kind (PROTOCOL P-TLS-6): TLS 1.3 tickets, TLS 1.2 tickets,
    # TLS 1.2 session ids.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    _native(disable_session_cache, ctx)
    _load_chain(ctx, cert_file, key_file)
    _load_verify(ctx, ca_file, "CA bundle")
    if crl_file is not None:
        _load_verify(ctx, crl_file, "CRL")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(cert_file: Pathish, key_file: Pathish, ca_file: Pathish) -> ssl.SSLContext:
    """Outbound context: mutual TLS ≥ 1.2 with hostname checking against ``ca_file`` only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = True
    _load_chain(ctx, cert_file, key_file)
    _load_verify(ctx, ca_file, "CA bundle")
    return ctx


# --- peer identity ------------------------------------------------------------------------


def peer_certificate_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes:
    """DER of the verified peer certificate of a finished handshake.

    With aiohttp on the server: ``request.transport.get_extra_info("ssl_object")``.
    Raises :class:`TrustError` when there is no TLS or no peer certificate (which the
    contexts above never allow, so this means a misconfigured listener).
    """
    if ssl_object is None:
        raise TrustError("connection is not TLS", location="tls")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TrustError("peer presented no certificate", location="tls.peer_certificate")
    return der
