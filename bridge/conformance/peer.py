"""A wire-level peer of a ws-fhir-bridge, written from PROTOCOL.md only.

It plays a sender (a hospital) against any bridge that claims to implement the
protocol: it opens mutual-TLS connections with the certificate, versions, suites and
key-exchange groups it is told to use (pyOpenSSL, so a stored TLS 1.2 session can be
offered again), speaks plain HTTP/1.1 on them, builds and signs claim messages with
any deviation a case needs (:mod:`bridge.conformance.envelope`), and reads back the
OperationOutcome or the signed receipt.

It imports nothing of the bridge outside this folder: a kit that shared the code under
test could not find its bugs. Everything is synchronous (blocking sockets with
deadlines); run it in a thread next to an event loop.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import select
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl

from bridge.conformance import protocol as P
from bridge.conformance.envelope import (
    JWSOptions,
    Outcome,
    PeerCheckFailed,
    ReceiptFacts,
    SigningKey,
    build_claim,
    read_outcome,
    sha256_digest,
    sign_message,
    signed_payload,
    v1_canonical,
    verify_receipt,
)

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
if hasattr(SSL, "TLS1_1_VERSION"):
    _VERSIONS["1.1"] = SSL.TLS1_1_VERSION


class TLSRefused(Exception):
    """The target ended the TLS handshake (or, under TLS 1.3, the first read) with an alert."""


class ConnectionClosed(Exception):
    """The target closed the connection without (a complete) answer."""


@dataclass(frozen=True)
class TLSOptions:
    """How the peer connects. ``None`` means the library default for that setting."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    min_version: str = "1.2"
    max_version: str = "1.3"
    ciphers: str | None = None  # TLS 1.2 cipher list, OpenSSL syntax
    tls13_suites: str | None = None
    groups: str | None = None  # e.g. "P-521:X448:ffdhe2048"
    server_name: str = "localhost"
    # The partner id the server's certificate must name (§2); None skips the check.
    expected_server_partner: str | None = None
    timeout: float = 10.0


@dataclass
class HTTPResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def outcome(self) -> Outcome | None:
        try:
            return read_outcome(self.json())
        except ValueError:
            return None


@functools.lru_cache(maxsize=64)
def _context(options: TLSOptions) -> SSL.Context:
    # One context per set of options: OpenSSL resumes a session only through the
    # context that made it.
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_VERSIONS[options.min_version])
    ctx.set_max_proto_version(_VERSIONS[options.max_version])
    if options.ciphers:
        ctx.set_cipher_list(options.ciphers.encode())
    if options.tls13_suites:
        ctx.set_tls13_ciphersuites(options.tls13_suites.encode())
    # pyOpenSSL has no public call for the group list; OpenSSL's own is reached through
    # the binding pyOpenSSL is built on.
    if options.groups and _openssl.SSL_CTX_set1_curves_list(
        ctx._context, options.groups.encode()
    ) != 1:
        raise ValueError(f"OpenSSL does not know the groups {options.groups!r}")
    if options.cert is not None:
        ctx.use_certificate_chain_file(str(options.cert))
    if options.key is not None:
        ctx.use_privatekey_file(str(options.key))
    ctx.load_verify_locations(str(options.ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
    # Keep sessions so a case can offer one again.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def _wait(sock: socket.socket, *, write: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the target did not answer in time")
    readable, writable, _ = select.select(
        [] if write else [sock], [sock] if write else [], [], remaining
    )
    if not readable and not writable:
        raise TimeoutError("the target did not answer in time")


class PeerConnection:
    """One TLS connection to the target, carrying HTTP/1.1 requests."""

    def __init__(self, sock: socket.socket, conn: SSL.Connection, timeout: float) -> None:
        self._sock = sock
        self._conn = conn
        self.timeout = timeout
        self._buffer = b""
        self.closed = False

    # --- TLS facts -----------------------------------------------------------------

    @property
    def version(self) -> str:
        return str(self._conn.get_protocol_version_name())

    @property
    def cipher(self) -> str:
        return str(self._conn.get_cipher_name())

    @property
    def group(self) -> str | None:
        name = self._conn.get_group_name()
        return str(name) if name is not None else None

    @property
    def session(self) -> SSL.Session | None:
        return self._conn.get_session()

    @property
    def session_reused(self) -> bool:
        return bool(_openssl.SSL_session_reused(self._conn._ssl))

    @property
    def server_certificate(self) -> x509.Certificate | None:
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        return cert

    def renegotiate(self) -> bool:
        """Ask for a TLS 1.2 renegotiation; True when the server completed one."""
        deadline = time.monotonic() + self.timeout
        if not self._conn.renegotiate():
            return False
        try:
            self._io(self._conn.do_handshake, deadline=deadline)
            self.send_raw(b"")
        except (SSL.Error, OSError, TLSRefused, ConnectionClosed):
            return False
        return bool(self._conn.total_renegotiations())

    # --- I/O -----------------------------------------------------------------------

    def _io(self, fn: Any, *args: Any, deadline: float) -> Any:
        while True:
            try:
                return fn(*args)
            except SSL.WantReadError:
                _wait(self._sock, write=False, deadline=deadline)
            except SSL.WantWriteError:
                _wait(self._sock, write=True, deadline=deadline)

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (a request, part of one, or anything else)."""
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        try:
            while view:
                sent = self._io(self._conn.send, view[:16384].tobytes(), deadline=deadline)
                view = view[sent:]
        except SSL.Error as exc:
            raise _refusal(exc) from None
        except OSError as exc:
            raise ConnectionClosed(f"connection lost while sending: {exc}") from None

    def _fill(self, deadline: float) -> bool:
        try:
            chunk = self._io(self._conn.recv, 65536, deadline=deadline)
        except SSL.ZeroReturnError:
            chunk = b""
        except SSL.SysCallError:
            chunk = b""
        except SSL.Error as exc:
            raise _refusal(exc) from None
        except TimeoutError:
            raise  # nothing arrived in time: not a close (TimeoutError is an OSError)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self._buffer += chunk
        return True

    def wait_closed(self, timeout: float) -> bool:
        """True when the target closes the connection within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        except (TLSRefused, ConnectionClosed):
            return True
        return True

    def read_response(self) -> HTTPResponse:
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill(deadline):
                raise ConnectionClosed("connection closed before an HTTP answer")
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        _version, _, status_reason = lines[0].partition(" ")
        status_text, _, reason = status_reason.partition(" ")
        headers = [
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])
        ]
        self._buffer = rest
        response = HTTPResponse(int(status_text), reason, headers, b"")
        length = response.header("Content-Length")
        if (response.header("Transfer-Encoding") or "").lower() == "chunked":
            response.body = self._read_chunked(deadline)
        elif length is not None:
            while len(self._buffer) < int(length):
                if not self._fill(deadline):
                    raise ConnectionClosed("connection closed inside an HTTP body")
            response.body, self._buffer = self._buffer[: int(length)], self._buffer[int(length) :]
        else:
            while self._fill(deadline):
                pass
            response.body, self._buffer = self._buffer, b""
        return response

    def _read_chunked(self, deadline: float) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self._buffer:
                if not self._fill(deadline):
                    raise ConnectionClosed("connection closed inside a chunked body")
            size_line, _, self._buffer = self._buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self._buffer) < size + 2:
                if not self._fill(deadline):
                    raise ConnectionClosed("connection closed inside a chunk")
            body += self._buffer[:size]
            self._buffer = self._buffer[size + 2 :]
            if size == 0:
                return body

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        *,
        host: str = "localhost",
    ) -> HTTPResponse:
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        names = {k.lower() for k, _ in items}
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        head += [f"{k}: {v}" for k, v in items]
        if "content-length" not in names and "transfer-encoding" not in names:
            head.append(f"Content-Length: {len(body)}")
        self.send_raw(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        return self.read_response()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._conn.shutdown()
        except (SSL.Error, OSError):
            pass
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refusal(exc: SSL.Error) -> TLSRefused:
    reasons = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and len(item) >= 3:
            reasons.append(str(item[2]))
    return TLSRefused(", ".join(reasons) or type(exc).__name__)


def _check_server_certificate(cert: x509.Certificate, options: TLSOptions) -> None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerCheckFailed("server certificate has no subject alternative name") from None
    try:
        address = ipaddress.ip_address(options.server_name)
        names_ok = address in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        names_ok = options.server_name in san.get_values_for_type(x509.DNSName)
    if not names_ok:
        raise PeerCheckFailed("server certificate is not for the host connected to")
    if options.expected_server_partner is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if P.PARTNER_URI_PREFIX + options.expected_server_partner not in uris:
            raise PeerCheckFailed("server certificate does not name the expected partner")


def connect(
    host: str, port: int, options: TLSOptions, *, session: SSL.Session | None = None
) -> PeerConnection:
    """Open a TCP connection and run the TLS handshake; raise :class:`TLSRefused`."""
    deadline = time.monotonic() + options.timeout
    sock = socket.create_connection((host, port), timeout=options.timeout)
    sock.setblocking(False)
    conn = SSL.Connection(_context(options), sock)
    if options.server_name and not _is_ip(options.server_name):
        conn.set_tlsext_host_name(options.server_name.encode())
    if session is not None:
        conn.set_session(session)
    conn.set_connect_state()
    peer = PeerConnection(sock, conn, options.timeout)
    try:
        peer._io(conn.do_handshake, deadline=deadline)
    except SSL.Error as exc:
        sock.close()
        raise _refusal(exc) from None
    except (OSError, TimeoutError):
        sock.close()
        raise
    cert = peer.server_certificate
    if cert is None:
        peer.close()
        raise PeerCheckFailed("server presented no certificate")
    _check_server_certificate(cert, options)
    return peer


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- the sender ------------------------------------------------------------------------


@dataclass
class Answer:
    """What the target answered to one message."""

    response: HTTPResponse
    outcome: Outcome | None
    receipt: ReceiptFacts | None = None
    receipt_error: str | None = None

    @property
    def status(self) -> str | int:
        return self.response.status

    @property
    def code(self) -> str | None:
        return self.outcome.code if self.outcome else None


@dataclass
class Peer:
    """A sender with one identity (TLS certificate and signing key) and one target."""

    base_url: str  # https://host:port/fhir
    partner_id: str  # who the peer claims to be
    receiver_id: str  # the target's partner id
    tls: TLSOptions
    signing_key: SigningKey
    receiver_signing_certificate: x509.Certificate | None = None
    _sent: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def host(self) -> str:
        return str(urlsplit(self.base_url).hostname)

    @property
    def port(self) -> int:
        return int(urlsplit(self.base_url).port or 443)

    def path(self, tail: str) -> str:
        return urlsplit(self.base_url).path.rstrip("/") + "/" + tail

    def connect(self, *, tls: TLSOptions | None = None, session: Any = None) -> PeerConnection:
        return connect(self.host, self.port, tls or self.tls, session=session)

    def claim(self, **changes: Any) -> dict[str, Any]:
        """An unsigned claim from this peer to the target (keyword arguments deviate)."""
        params: dict[str, Any] = {"sender": self.partner_id, "receiver": self.receiver_id}
        params.update(changes)
        return build_claim(**params)

    def sign(self, bundle: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"iss": self.partner_id, "aud": self.receiver_id}
        params.update(changes)
        signed = sign_message(bundle, self.signing_key, **params)
        # The digest a receipt must name is that of the form this signature covers.
        form = params.get("canonical")
        _SIGNED_DIGESTS[signed["signature"]["data"]] = sha256_digest(
            signed_payload(signed, form) if form is not None else signed_payload(signed))
        return signed

    def signed_claim(
        self, *, sign: Mapping[str, Any] | None = None, **changes: Any
    ) -> dict[str, Any]:
        return self.sign(self.claim(**changes), **dict(sign or {}))

    def post_message(
        self,
        conn: PeerConnection,
        message: Mapping[str, Any] | bytes,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """POST one message to ``[base]/$process-message`` and read the answer.

        A 200 answer is checked as a receipt (§6.2) when the target's signing
        certificate is known; a failed check is reported in ``receipt_error``.
        """
        body = message if isinstance(message, bytes) else json.dumps(
            message, ensure_ascii=False
        ).encode("utf-8")
        sent_headers = {"Content-Type": P.FHIR_JSON}
        sent_headers.update(headers or {})
        response = conn.request("POST", self.path(P.PROCESS_MESSAGE), body, sent_headers)
        answer = Answer(response=response, outcome=response.outcome)
        if response.status == 200 and not isinstance(message, bytes):
            try:
                answer.receipt = self.check_receipt(message, response.json())
            except (PeerCheckFailed, ValueError) as exc:
                answer.receipt_error = str(exc)
        return answer

    def check_receipt(self, message: Mapping[str, Any], receipt: Any) -> ReceiptFacts:
        if self.receiver_signing_certificate is None:
            raise PeerCheckFailed("the target's signing certificate is not known")
        if not isinstance(receipt, dict):
            raise PeerCheckFailed("answer is not a JSON object")
        identity = str((message.get("identifier") or {}).get("value"))
        return verify_receipt(
            receipt,
            self.receiver_signing_certificate,
            receiver=self.receiver_id,
            sender=self.partner_id,
            request_message_id=identity,
            request_digests=_digests_of(message),
        )

    def send(self, message: Mapping[str, Any] | bytes, **kwargs: Any) -> Answer:
        """Connect, POST one message, close."""
        with self.connect() as conn:
            return self.post_message(conn, message, **kwargs)

    def get(self, conn: PeerConnection, tail: str) -> HTTPResponse:
        return conn.request("GET", self.path(tail), headers={"Accept": P.FHIR_JSON})


#: Signature data (``Bundle.signature.data``) -> the digest of the payload form it
#: covers, for every message a peer signed: a receipt names exactly that digest.
_SIGNED_DIGESTS: dict[str, str] = {}


def _digests_of(message: Mapping[str, Any]) -> list[str]:
    """The request digests a receipt for ``message`` may name: that of the form the peer
    signed it over; either form for a message signed elsewhere (a hand-made one)."""
    data = (message.get("signature") or {}).get("data")
    if isinstance(data, str) and data in _SIGNED_DIGESTS:
        return [_SIGNED_DIGESTS[data]]
    return [sha256_digest(signed_payload(message)),
            sha256_digest(signed_payload(message, v1_canonical))]


def now_epoch() -> int:
    return int(datetime.now(UTC).timestamp())


__all__ = [
    "Answer",
    "ConnectionClosed",
    "HTTPResponse",
    "JWSOptions",
    "Peer",
    "PeerCheckFailed",
    "PeerConnection",
    "SigningKey",
    "TLSOptions",
    "TLSRefused",
    "connect",
    "now_epoch",
]
