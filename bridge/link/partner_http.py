"""HTTP sessions to partners, and how their answers are read.

Every request this bridge sends to a partner (a claim, a pull page, the readiness
check's ``metadata``) goes through a session from :func:`partner_session` and reads the
answer with :func:`read_answer`:

* the server must present a certificate that a CA bound to the partner issued
  (``partners.tls_ca``; the whole ``[tls] ca`` bundle when the partner has none) and
  that names the partner (:class:`~bridge.link.dispatcher.PartnerConnector`);
* redirects are never followed: a 3xx answer is a failure naming the status. A
  followed redirect would carry a claim, or the pulling side's certificate, to
  wherever the ``Location`` header points;
* an answer is read up to a size limit, and one announcing or sending more is refused
  without being read on (its connection is aborted), so a partner cannot make this
  bridge hold an answer of any size in memory;
* an answer with a ``Content-Encoding`` is refused rather than inflated (answers are
  sent as they are, PROTOCOL P-HTTP-2), so a small compressed answer cannot expand.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import aiohttp

from bridge.config import BridgeConfig
from bridge.errors import TransportError
from bridge.trust.tls import client_context

#: The largest receipt or OperationOutcome read from a partner.
RECEIPT_LIMIT = 1024 * 1024
#: The largest pull page read from a partner (1,000 resources of a few kB each).
PAGE_LIMIT = 64 * 1024 * 1024


class PartnerAnswerRefused(TransportError):
    """A partner's answer this bridge does not read: a redirect, one too large, or one
    with a content coding. Nothing of it is acted on."""

    code = "partner-answer-refused"


def partner_session(
    config: BridgeConfig, partner_id: str, *, timeout: float, limit: int = 1,
    headers: Mapping[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """A client session whose connections reach only ``partner_id``'s servers (through
    ``ssl_context`` when given, which a caller may reload in place)."""
    # Imported here: the dispatcher imports this module.
    from bridge.link.dispatcher import PartnerConnector

    tls = config.tls
    partner = config.partner(partner_id)
    connector = PartnerConnector(
        expected_partner=partner.id,
        fingerprints=frozenset(partner.tls_fingerprints),
        ssl=ssl_context or client_context(tls.cert, tls.key, partner.tls_ca or tls.ca),
        limit=limit,
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
        headers=dict(headers or {}), auto_decompress=False,
    )


def _drop(resp: aiohttp.ClientResponse) -> None:
    """Close the answer's connection at once: aborted rather than shut down politely,
    so nothing more of the answer is waited for or read."""
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    if transport is not None:
        transport.abort()
    resp.close()


async def read_answer(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of a partner's answer, or :class:`PartnerAnswerRefused`.

    Call with a request made with ``allow_redirects=False``."""
    status = resp.status
    if 300 <= status < 400:
        _drop(resp)
        raise PartnerAnswerRefused(
            f"partner answered {status}, a redirect; redirects are not followed"
            " (check the partner's base_url)",
            location=f"HTTP {status}", status=status,
        )
    coding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        _drop(resp)
        raise PartnerAnswerRefused(
            "partner answered with a Content-Encoding; answers are read only as sent",
            location="Content-Encoding", status=status,
        )
    declared = resp.content_length
    if declared is not None and declared > limit:
        _drop(resp)
        raise PartnerAnswerRefused(
            f"partner's answer is larger than {limit} bytes", location="Content-Length",
            status=status,
        )
    parts: list[bytes] = []
    size = 0
    while True:
        part = await resp.content.read(limit + 1 - size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > limit:
            _drop(resp)
            raise PartnerAnswerRefused(
                f"partner's answer is larger than {limit} bytes", location="body",
                status=status,
            )


__all__ = ["PAGE_LIMIT", "RECEIPT_LIMIT", "PartnerAnswerRefused", "partner_session",
           "read_answer"]
