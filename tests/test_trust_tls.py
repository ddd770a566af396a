"""Mutual TLS contexts over real sockets: who gets through the handshake and who does not."""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bridge.errors import ConfigError
from bridge.trust.pki import (
    DevPKI,
    certificate_pem,
    generate_ca,
    init_dev_pki,
    issue_certificate,
    issue_crl,
    load_certificate,
    load_private_key,
    private_key_pem,
)
from bridge.trust.tls import (
    INTERMEDIATE_CIPHERS,
    certificate_identity,
    client_context,
    peer_certificate_der,
    server_context,
)

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(tmp_path_factory.mktemp("pki"), ["hospital-a", "insurer-b"], now=NOW)


@dataclass
class Outcome:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    peer_der: bytes | None = None
    version: str | None = None
    echoed: bytes | None = None


def exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "localhost"
) -> Outcome:
    """One connection through a tiny threaded TLS echo server."""
    out = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                out.peer_der = peer_certificate_der(tls)
                out.version = tls.version()
                data = tls.recv(64)
                tls.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            out.server_error = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(b"ping")
            # Under TLS 1.3 a refused client certificate surfaces only on this read.
            out.echoed = tls.recv(64) or None
    except (ssl.SSLError, OSError) as exc:
        out.client_error = exc
    thread.join(5)
    listener.close()
    return out


def server(pki: DevPKI, **kw: object) -> ssl.SSLContext:
    b = pki.controllers["insurer-b"]
    return server_context(b.tls_cert, b.tls_key, pki.ca_cert, **kw)  # type: ignore[arg-type]


def client(pki: DevPKI) -> ssl.SSLContext:
    a = pki.controllers["hospital-a"]
    return client_context(a.tls_cert, a.tls_key, pki.ca_cert)


def bare_client(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_file)
    return ctx


def write_pair(directory: Path, name: str, cert: object, key: object) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate_pem(cert))  # type: ignore[arg-type]
    key_path.write_bytes(private_key_pem(key))  # type: ignore[arg-type]
    return cert_path, key_path


def test_mutual_handshake_and_peer_identity(pki: DevPKI) -> None:
    out = exchange(server(pki), client(pki))
    assert out.server_error is None and out.client_error is None
    assert out.echoed == b"ping"
    assert out.version == "TLSv1.3"
    assert out.peer_der is not None
    ident = certificate_identity(out.peer_der)
    assert ident.partner_id == "hospital-a"
    assert ident.common_name == "hospital-a"
    assert ident.dns_names == ("localhost",)
    expected = load_certificate(pki.controllers["hospital-a"].tls_cert)
    assert (
        ident.fingerprint_sha256
        == __import__("hashlib").sha256(expected.public_bytes(Encoding.DER)).hexdigest()
    )
    assert ident.not_after == expected.not_valid_after_utc


def test_tls12_handshake_uses_an_intermediate_cipher(pki: DevPKI) -> None:
    ctx = client(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out = exchange(server(pki), ctx)
    assert out.version == "TLSv1.2" and out.echoed == b"ping"


def test_cbc_only_client_is_refused(pki: DevPKI) -> None:
    ctx = client(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    out = exchange(server(pki), ctx)
    assert isinstance(out.server_error, ssl.SSLError)
    assert "no shared cipher" in str(out.server_error).lower()
    assert out.echoed is None


def test_client_without_certificate_is_refused(pki: DevPKI) -> None:
    out = exchange(server(pki), bare_client(pki.ca_cert))
    assert isinstance(out.server_error, ssl.SSLError)
    assert "certificate" in str(out.server_error).lower()
    assert out.echoed is None and out.client_error is not None


def test_certificate_from_another_ca_is_refused(pki: DevPKI, tmp_path: Path) -> None:
    ca, ca_key = generate_ca("rogue CA", now=NOW)
    cert, key = issue_certificate(
        ca, ca_key, "hospital-a", purpose="tls", now=NOW, partner_id="hospital-a"
    )
    cert_path, key_path = write_pair(tmp_path, "rogue", cert, key)
    out = exchange(server(pki), client_context(cert_path, key_path, pki.ca_cert))
    assert isinstance(out.server_error, ssl.SSLError)
    assert "unable to get local issuer certificate" in str(out.server_error)
    assert out.echoed is None


def test_expired_client_certificate_is_refused(pki: DevPKI, tmp_path: Path) -> None:
    ca = load_certificate(pki.ca_cert)
    ca_key = load_private_key(pki.ca_key)
    cert, key = issue_certificate(
        ca,
        ca_key,
        "hospital-a",
        purpose="tls",
        now=NOW - timedelta(days=60),
        days=30,
        partner_id="hospital-a",  # type: ignore[arg-type]
    )
    cert_path, key_path = write_pair(tmp_path, "expired", cert, key)
    out = exchange(server(pki), client_context(cert_path, key_path, pki.ca_cert))
    assert isinstance(out.server_error, ssl.SSLError)
    assert "expired" in str(out.server_error).lower()
    assert out.echoed is None


def test_signing_certificate_cannot_authenticate_tls(pki: DevPKI) -> None:
    a = pki.controllers["hospital-a"]
    out = exchange(server(pki), client_context(a.sign_cert, a.sign_key, pki.ca_cert))
    assert isinstance(out.server_error, ssl.SSLError)
    assert "unsuitable certificate purpose" in str(out.server_error)
    assert out.echoed is None


def test_tls11_is_refused(pki: DevPKI) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_cert)
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client actually offer TLS 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    a = pki.controllers["hospital-a"]
    ctx.load_cert_chain(a.tls_cert, a.tls_key)
    out = exchange(server(pki), ctx)
    assert isinstance(out.server_error, ssl.SSLError)
    assert "unsupported protocol" in str(out.server_error).lower()
    assert out.echoed is None


def test_server_hostname_is_checked(pki: DevPKI) -> None:
    out = exchange(server(pki), client(pki), host="insurer-b.example")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)


def test_revoked_client_certificate_is_refused_with_a_crl(pki: DevPKI, tmp_path: Path) -> None:
    ca = load_certificate(pki.ca_cert)
    ca_key = load_private_key(pki.ca_key)
    revoked = load_certificate(pki.controllers["hospital-a"].tls_cert)
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(
        issue_crl(ca, ca_key, [revoked.serial_number], now=NOW).public_bytes(Encoding.PEM)
    )  # type: ignore[arg-type]
    out = exchange(server(pki, crl_file=crl_file), client(pki))
    assert isinstance(out.server_error, ssl.SSLError)
    assert "revoked" in str(out.server_error).lower()
    clean = tmp_path / "clean.pem"
    clean.write_bytes(issue_crl(ca, ca_key, [], now=NOW).public_bytes(Encoding.PEM))  # type: ignore[arg-type]
    assert exchange(server(pki, crl_file=clean), client(pki)).echoed == b"ping"


def test_context_settings(pki: DevPKI) -> None:
    ctx = server(pki)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.num_tickets == 0
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 <= set(INTERMEDIATE_CIPHERS.split(":"))
    c = client(pki)
    assert c.check_hostname and c.minimum_version == ssl.TLSVersion.TLSv1_2


def test_missing_files_raise_config_errors_naming_them(pki: DevPKI, tmp_path: Path) -> None:
    b = pki.controllers["insurer-b"]
    with pytest.raises(ConfigError) as err:
        server_context(b.tls_cert, tmp_path / "missing.key", pki.ca_cert)
    assert err.value.location == str(tmp_path / "missing.key")
    with pytest.raises(ConfigError):
        client_context(b.tls_cert, pki.controllers["hospital-a"].tls_key, pki.ca_cert)
