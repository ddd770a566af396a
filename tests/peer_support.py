"""Fixtures for tests that talk to a running bridge through the conformance peer.

The bridge under test runs in the test's event loop (``e2e_support.start_pair``); the
peer is synchronous and runs in a worker thread (``call``). Certificates are made
here with the bridge's PKI builders; everything sent comes from the peer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from e2e_support import Pair

from bridge.conformance.peer import Peer, SigningKey, TLSOptions
from bridge.ledger.audit import AuditEntry
from bridge.trust.pki import (
    certificate_pem,
    issue_certificate,
    load_certificate,
    load_private_key,
    private_key_pem,
)

T = TypeVar("T")


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking peer call in a thread so the bridge's event loop keeps serving."""
    return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


def tls_options(pki: Path, who: str | None, **changes: Any) -> TLSOptions:
    params: dict[str, Any] = {
        "ca": pki / "ca.pem",
        "cert": pki / who / "tls.pem" if who else None,
        "key": pki / who / "tls.key" if who else None,
        "server_name": "127.0.0.1",
        "expected_server_partner": "insurer-b",
        "timeout": 10.0,
    }
    params.update(changes)
    return TLSOptions(**params)


def make_peer(pair: Pair, who: str = "hospital-a", **tls: Any) -> Peer:
    """The peer as ``who`` (TLS certificate and signing key of that controller)."""
    pki = pair.root / "pki"
    return Peer(
        base_url=pair.insurer_url,
        partner_id=who,
        receiver_id="insurer-b",
        tls=tls_options(pki, who, **tls),
        signing_key=SigningKey.from_files(pki / who / "sign.key", pki / who / "sign.pem"),
        receiver_signing_certificate=x509.load_pem_x509_certificate(
            (pki / "insurer-b" / "sign.pem").read_bytes()
        ),
    )


def issue_tls_certificate(
    pki: Path,
    out: Path,
    partner_id: str,
    *,
    issued_at: datetime | None = None,
    days: int = 30,
    name: str = "client",
) -> tuple[Path, Path, x509.Certificate]:
    """A TLS certificate for ``partner_id`` from the pair's CA, valid from five minutes
    before ``issued_at`` until ``issued_at + days`` (``days=0``: it ends at ``issued_at``)."""
    ca_cert, ca_key = load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key")
    cert, key = issue_certificate(
        ca_cert,
        ca_key,  # type: ignore[arg-type]
        partner_id,
        purpose="tls",
        now=issued_at or datetime.now(UTC),
        days=days,
        partner_id=partner_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = out / f"{name}.pem", out / f"{name}.key"
    cert_file.write_bytes(certificate_pem(cert))
    key_file.write_bytes(private_key_pem(key))
    return cert_file, key_file, cert


async def audit_of(pair: Pair, *actions: str, since: int = 0) -> list[AuditEntry]:
    entries = await pair.insurer.controller.db.audit_entries(since_seq=since)
    return [e for e in entries if not actions or e.record.action in actions]


async def audit_head(pair: Pair) -> int:
    entries = await pair.insurer.controller.db.audit_entries()
    return entries[-1].seq if entries else 0


async def wait_for_audit(
    pair: Pair, action: str, *, since: int = 0, timeout: float = 5.0
) -> list[AuditEntry]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await audit_of(pair, action, since=since)
        if found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)


async def stored(pair: Pair, message_id: str) -> bool:
    return await pair.insurer.controller.db.inbox_lookup("hospital-a", message_id) is not None
