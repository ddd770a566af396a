"""Sync tracking over the wire (PROTOCOL §8a): sequence headers, the signed answer to
"which of these claims do you hold", and reconciliation.

Every claim a sender posts carries ``Bridge-Stream`` (its outbound link id) and
``Bridge-Sequence`` (the claim's number on that link, consecutive from 1). The receiver
records them with the claim, so it sees gaps in a sender's sequence, and numbers that
arrive twice under different identities (collisions: the claim is still accepted on its
identity, and the number is reported, P-SYNC-8).

``POST [base]/$sync-held`` takes a ``Parameters`` naming a stream, a sequence range and
the claim identities the sender has in it; the receiver answers with a ``Parameters``
listing those it holds (each with the audit entry it holds for it) and the highest
sequence it holds on that stream without a gap, the highest it holds at all and the
numbers it holds under more than one identity, signed with a detached JWS over the
body (``X-Signature``, ``msgid`` = the request's ``X-Correlation-Id``).

Reconciliation, at the sender: walk the acknowledged claims of a link in ranges, ask
the partner which it holds, resend those it lacks (the claim keeps its identity, so a
claim the partner did hold is answered with its original receipt and stored once), and
report receipts that name audit entries the partner no longer holds. The partner's
highest number becomes the floor of the link's numbering, so a sender restored from a
backup numbers its new claims after the ones the partner holds (P-SYNC-7).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from bridge.errors import (
    BridgeError,
    ParseError,
    TransportError,
    TrustError,
    has_digit_run,
    member_label,
)
from bridge.ledger.sync import (
    OutboundSummary,
    acked_claims,
    held,
    inbound_stream,
    ranges,
    record_received,
    save_outbound,
    spans,
)
from bridge.link.partner_http import PAGE_LIMIT, read_answer
from bridge.trust.jws import sign_detached_bytes, verify_detached_bytes

if TYPE_CHECKING:
    from datetime import datetime

    from bridge.ledger.portable import Tx
    from bridge.ledger.sqlite import InboxRow
    from bridge.link.dispatcher import Dispatcher
    from bridge.link.server import ReceiverApp

log = logging.getLogger("bridge.sync")

STREAM_HEADER = "Bridge-Stream"
SEQUENCE_HEADER = "Bridge-Sequence"
SIGNATURE_HEADER = "X-Signature"
CORRELATION_HEADER = "X-Correlation-Id"
#: Identities asked about in one request.
MAX_IDENTITIES = 1000
#: Colliding numbers named in one answer.
MAX_COLLISIONS = 1000
_STREAM = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
_UUID = re.compile(
    r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z"
)
_MAX_SEQ = 2**62
#: Streams a receiver takes from one partner by default (P-SYNC-10; the configuration's
#: ``server.max_streams_per_partner``): a sender has one per outbound link to this
#: receiver, and a conformance kit run names four new ones. Each stream is a row of
#: ``bridge sync status`` and a series of the operations port's metrics, so a partner
#: cannot make more of them at will.
MAX_STREAMS_PER_PARTNER = 256
#: The parameters of ``$sync-held`` (P-SYNC-4); any other is refused by name.
HELD_PARAMETERS = frozenset({"stream", "from", "to", "identity"})


class SyncError(ParseError):
    code = "sync-invalid"


def is_stream_name(text: object) -> bool:
    """Is ``text`` written as a link id is (P-SYNC-1: a partner id's form), and not a
    record number, an ID number or a telephone number (six digits in a row)?"""
    return isinstance(text, str) and bool(_STREAM.match(text)) and not has_digit_run(text)


def read_sequence(headers: Any) -> tuple[str, int] | None:
    """The ``(stream, seq)`` a claim request carries, None when it carries neither
    (a version 1.1 sender); a malformed or half pair is refused naming the header.
    Whether the receiver takes the stream from this partner is :class:`KnownStreams`'."""
    stream = headers.get(STREAM_HEADER)
    raw = headers.get(SEQUENCE_HEADER)
    if stream is None and raw is None:
        return None
    if stream is None or not is_stream_name(stream):
        raise SyncError("stream must be a link id", location=STREAM_HEADER)
    if raw is None or not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < _MAX_SEQ:
        raise SyncError("sequence must be a positive integer", location=SEQUENCE_HEADER)
    return stream, int(raw)


def _recorded_streams(store: Any, sender: str) -> list[str]:
    with store.read("sync_streams_of") as tx:
        return [str(r[0]) for r in tx.all(
            "SELECT DISTINCT stream FROM sync_inbound WHERE sender=?", (sender,))]


class KnownStreams:
    """The streams a receiver takes from each partner (P-SYNC-10): those it has recorded
    claims of, and new ones while the partner has fewer than ``limit``. A stream is
    the sender's link id; a partner naming a new one per claim would otherwise grow
    the receiver's sync records, status and metrics without end.

    A new stream is counted from the first claim that names it, whether or not that
    claim is then stored: the bound holds even for claims refused later or in flight
    together. A restart counts again from what the store recorded.
    """

    def __init__(self, limit: int = MAX_STREAMS_PER_PARTNER) -> None:
        self.limit = limit
        self._known: dict[str, set[str]] = {}

    async def admit(self, db: Any, sender: str, stream: str) -> None:
        """Take ``stream`` from ``sender``, or raise :class:`SyncError` naming the header."""
        known = self._known.get(sender)
        if known is None:
            recorded = await db.call(_recorded_streams, db.sync, sender)
            known = self._known.setdefault(sender, set(recorded))
        if stream in known:
            return
        if len(known) >= self.limit:
            raise SyncError(
                f"this receiver takes at most {self.limit} streams from one partner, and"
                " this one is new", location=STREAM_HEADER)
        known.add(stream)


def recording_hook(
    sequence: tuple[str, int] | None, *, sender: str, now: datetime, also: Any = None
) -> Any:
    """The ``within`` hook of ``inbox_accept``: record the sequence (and run ``also``)."""
    if sequence is None:
        return also

    def hook(tx: Tx, row: InboxRow) -> None:
        if not record_received(
            tx,
            sender=sender,
            stream=sequence[0],
            seq=sequence[1],
            message_id=row.message_id,
            now=now,
        ):
            warn_collision(sender, *sequence)
        if also is not None:
            also(tx, row)

    return hook


def warn_collision(sender: str, stream: str, seq: int) -> None:
    """Tell the operator that a number of a stream arrived under a second identity."""
    log.warning(
        "%s stream %s: seq %s received under more than one message identity (the claim"
        " is accepted on its identity; bridge sync status lists the numbers)",
        sender,
        stream,
        seq,
    )


def _param(params: dict[str, Any], name: str) -> list[Any]:
    out = []
    for p in params.get("parameter") or []:
        if isinstance(p, dict) and p.get("name") == name:
            out.append(p)
    return out


def _query(body: bytes) -> tuple[str, int, int, list[str]]:
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SyncError("body is not JSON", location="Parameters") from None
    if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
        raise SyncError("body must be a Parameters resource", location="Parameters")
    listed = params.get("parameter")
    if listed is not None and not isinstance(listed, list):
        raise SyncError("parameter must be a list", location="Parameters.parameter")
    for i, p in enumerate(listed or []):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise SyncError("a parameter must have a name", location=f"Parameters.parameter[{i}]")
        if p["name"] not in HELD_PARAMETERS:
            # Named as an element name is, or ``*``: the name is the sender's text.
            raise SyncError("unknown parameter", location=f"Parameters.{member_label(p['name'])}")
    streams = _param(params, "stream")
    if len(streams) != 1 or not is_stream_name(streams[0].get("valueString")):
        raise SyncError("one stream (a link id) is required", location="Parameters.stream")
    bounds = []
    for name in ("from", "to"):
        p = _param(params, name)
        value = p[0].get("valueInteger") if len(p) == 1 else None
        if type(value) is not int or not 0 < value < _MAX_SEQ:
            raise SyncError(f"{name} must be one positive integer", location=f"Parameters.{name}")
        bounds.append(value)
    if bounds[0] > bounds[1]:
        raise SyncError("from is after to", location="Parameters.from")
    ids = []
    for i, p in enumerate(_param(params, "identity")):
        value = p.get("valueString")
        if not isinstance(value, str) or not _UUID.match(value):
            raise SyncError(
                "identity must be a urn:uuid message identity", location=f"Parameters.identity[{i}]"
            )
        ids.append(value)
    if len(ids) > MAX_IDENTITIES:
        raise SyncError(
            f"at most {MAX_IDENTITIES} identities per request", location="Parameters.identity"
        )
    return streams[0]["valueString"], bounds[0], bounds[1], ids


class SyncAPI:
    """``POST [base]/$sync-held`` of the receiving side."""

    def __init__(self, app: ReceiverApp) -> None:
        self.app = app

    def register(self, web_app: web.Application, base: str) -> None:
        web_app.router.add_post(f"{base}/$sync-held", self.held)

    async def held(self, request: web.Request) -> web.Response:
        from bridge.link.server import FHIR_JSON, read_body

        app, c = self.app, self.app.c
        try:
            partner = app._peer_partner(request)
        except TrustError as exc:
            return await app._refuse(exc, partner=None, subject="connection")
        if c.inbound_link_for(partner.id) is None:
            from bridge.errors import UnknownPartner

            return await app._refuse_peer(
                UnknownPartner("partner has no inbound link here", location="links"),
                request,
                partner=partner.id,
                subject="connection",
            )
        correlation = request.headers.get(CORRELATION_HEADER, "")
        try:
            if not _UUID.match(correlation):
                raise SyncError(
                    "a urn:uuid correlation id is required", location=CORRELATION_HEADER
                )
            body = await read_body(request, c.config.server)
            stream, first, last, ids = _query(body)
        except BridgeError as exc:
            return await app._refuse(exc, partner=partner.id, subject="sync", action="sync.refused")
        found = await c.db.call(held, c.db.sync, partner.id, ids)
        state = await c.db.call(inbound_stream, c.db.sync, partner.id, stream)
        contiguous = state.contiguous if state is not None else 0
        collisions = state.collisions[:MAX_COLLISIONS] if state is not None else ()
        answer = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "stream", "valueString": stream},
                {"name": "from", "valueInteger": first},
                {"name": "to", "valueInteger": last},
                {"name": "contiguous", "valueInteger": contiguous},
                {"name": "highest", "valueInteger": state.highest if state is not None else 0},
                *({"name": "collision", "valueInteger": n} for n in collisions),
                *(
                    {
                        "name": "held",
                        "part": [
                            {"name": "identity", "valueString": h.message_id},
                            {"name": "audit-seq", "valueInteger": h.audit_seq},
                            *(
                                [{"name": "audit-hash", "valueString": h.audit_hash}]
                                if h.audit_hash
                                else []
                            ),
                        ],
                    }
                    for h in (found[m] for m in ids if m in found)
                ),
            ],
        }
        out = orjson.dumps(answer)
        now = c.clock()
        signature = sign_detached_bytes(
            out, c.signer_for_partner(partner.id), issuer=c.id, audience=partner.id,
            message_id=correlation, now=now
        )
        await c.db.append_audit(
            c.audit(
                "sync.held",
                subject=correlation,
                partner=partner.id,
                detail=f"stream {stream} seq {first}-{last}: asked {len(ids)}, held {len(found)},"
                f" contiguous {contiguous}"
                + (f", numbers received twice {len(collisions)}" if collisions else ""),
                now=now,
            )
        )
        return web.Response(
            body=out,
            content_type=FHIR_JSON,
            headers={SIGNATURE_HEADER: signature, CORRELATION_HEADER: correlation},
        )


@dataclass
class ReconcileReport:
    """What one reconciliation of a link found and did."""

    link: str
    compared: int = 0
    missing: list[int] = field(default_factory=list)
    resent: int = 0
    failed: int = 0
    #: Seqs whose stored receipt names an audit entry the partner no longer holds
    #: (absent, or another entry now).
    mismatched: list[int] = field(default_factory=list)
    confirmed_seq: int = 0
    #: The highest number the partner holds on the stream; new claims come after it.
    partner_highest: int = 0
    #: Numbers the partner holds under more than one message identity.
    collisions: set[int] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "compared": self.compared,
            "missing": len(self.missing),
            "missing_seqs": ranges(self.missing),
            "resent": self.resent,
            "failed": self.failed,
            "receipts_naming_absent_audit_entries": len(self.mismatched),
            "mismatched_seqs": ranges(self.mismatched),
            "confirmed_seq": self.confirmed_seq,
            "partner_highest": self.partner_highest,
            "collisions": ranges(self.collisions),
        }

    def heard(self, answer: HeldAnswer) -> None:
        """Take in the stream's figures from one of the partner's answers."""
        self.confirmed_seq = answer.contiguous
        self.partner_highest = max(self.partner_highest, answer.highest, answer.contiguous)
        self.collisions.update(answer.collisions)


@dataclass(frozen=True)
class HeldAnswer:
    """The partner's signed answer about a stream (P-SYNC-5, P-SYNC-9)."""

    #: identity -> (audit-seq, audit-hash) of the claims asked about that it holds
    found: dict[str, tuple[int, str | None]]
    contiguous: int
    #: 0 when the partner does not say (an older bridge): ``contiguous`` stands for it.
    highest: int
    collisions: tuple[int, ...]


def _receipt_audit(receipt: bytes) -> tuple[int | None, str | None]:
    """The audit entry a stored receipt names (seq, hash)."""
    try:
        bundle = orjson.loads(receipt)
        header = bundle["entry"][0]["resource"]
        seq = hash_ = None
        for ext in header.get("extension", []):
            if ext.get("url") == "urn:ws-fhir-bridge:ext:audit-seq":
                seq = int(ext["valueInteger"])
            elif ext.get("url") == "urn:ws-fhir-bridge:ext:audit-hash":
                hash_ = str(ext["valueString"])
        return seq, hash_
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None, None


async def ask_held(
    dispatcher: Dispatcher, first: int, last: int, identities: list[str]
) -> tuple[dict[str, tuple[int, str | None]], int]:
    """Ask the partner which of ``identities`` it holds; verify its signed answer.
    Returns those it holds and the stream's contiguous number."""
    answer = await ask_stream(dispatcher, first, last, identities)
    return answer.found, answer.contiguous


async def ask_stream(
    dispatcher: Dispatcher, first: int, last: int, identities: list[str]
) -> HeldAnswer:
    """Ask the partner which of ``identities`` it holds and what it holds of the
    stream; verify its signed answer."""
    c = dispatcher.c
    session = dispatcher.session()
    correlation = f"urn:uuid:{uuid.uuid4()}"
    query = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "stream", "valueString": dispatcher.link.id},
            {"name": "from", "valueInteger": first},
            {"name": "to", "valueInteger": last},
            *({"name": "identity", "valueString": m} for m in identities),
        ],
    }
    url = dispatcher.url.rsplit("/", 1)[0] + "/$sync-held"
    # A receiver busy with the resends of the previous range may answer slowly: wait
    # longer than for a claim, and ask again a couple of times before giving up.
    timeout = aiohttp.ClientTimeout(total=max(60.0, dispatcher.link.request_timeout_seconds))
    for attempt in range(3):
        try:
            async with session.post(
                url,
                data=orjson.dumps(query),
                timeout=timeout,
                headers={"Content-Type": "application/fhir+json", CORRELATION_HEADER: correlation},
                allow_redirects=False,
            ) as resp:
                body = await read_answer(resp, PAGE_LIMIT)  # a 3xx or an oversize: refused
                status = resp.status
                signature = resp.headers.get(SIGNATURE_HEADER, "")
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed
            from bridge.link.dispatcher import classify_exception

            failure = classify_exception(exc)
            if failure.fault != "transient" or attempt == 2:
                raise failure from None
            await asyncio.sleep(1.0 + attempt)
            continue
        if (status in (408, 429) or status >= 500) and attempt < 2:
            await asyncio.sleep(1.0 + attempt)
            continue
        break
    if status != 200:
        raise TransportError(
            f"partner answered {status} to the sync question",
            location="$sync-held",
            status=status,
        )
    claims = verify_detached_bytes(
        signature,
        body,
        c.keyring,
        expected_issuer=dispatcher.link.partner,
        expected_audience=c.id,
        now=c.clock(),
        location=SIGNATURE_HEADER,
    )
    if claims.message_id != correlation:
        raise TrustError("signed answer is for another question", location=SIGNATURE_HEADER)
    answer = orjson.loads(body)
    found: dict[str, tuple[int, str | None]] = {}
    for p in _param(answer, "held"):
        parts = {q.get("name"): q for q in p.get("part", [])}
        mid = parts.get("identity", {}).get("valueString")
        seq = parts.get("audit-seq", {}).get("valueInteger")
        if isinstance(mid, str) and isinstance(seq, int):
            found[mid] = (seq, parts.get("audit-hash", {}).get("valueString"))
    return HeldAnswer(
        found,
        _integer(answer, "contiguous"),
        _integer(answer, "highest"),
        tuple(
            p["valueInteger"]
            for p in _param(answer, "collision")
            if type(p.get("valueInteger")) is int and 0 < p["valueInteger"] < _MAX_SEQ
        ),
    )


def _integer(params: dict[str, Any], name: str) -> int:
    value = next((p.get("valueInteger") for p in _param(params, name)), 0)
    return value if type(value) is int and 0 <= value < _MAX_SEQ else 0


async def reconcile(
    dispatcher: Dispatcher, *, chunk: int = 500, full: bool = False
) -> ReconcileReport:
    """Compare the acknowledged claims of the link with what the partner holds,
    resend what it lacks, report receipts naming audit entries it no longer holds,
    and keep the partner's summary for ``bridge sync status``.

    By default only the claims past the partner's own summary are compared (it holds
    every claim up to ``contiguous`` by its signed word; a partner restored from an
    older backup says a lower number), so a periodic pass costs little however long
    the link's history. ``full`` compares every acknowledged claim, receipts included.
    """
    c = dispatcher.c
    link = dispatcher.link.id
    report = ReconcileReport(link)
    # Resends go a few at a time: the receiver verifies and stores each one, and a
    # restored receiver is usually serving new claims meanwhile.
    sem = asyncio.Semaphore(max(1, min(dispatcher.link.concurrency, 4)))
    after = 0
    if not full:
        first = await ask_stream(dispatcher, 1, 1, [])
        report.heard(first)
        after = first.contiguous

    async def resend(seq: int, mid: str) -> None:
        async with sem:
            try:
                await dispatcher.resend(mid)
                report.resent += 1
            except BridgeError as exc:
                report.failed += 1
                log.warning("link %s: resend of seq %s failed: %s", link, seq, exc.code)

    while True:
        rows = await c.db.call(acked_claims, c.db.sync, link, after_seq=after, limit=chunk)
        if not rows:
            break
        answer = await ask_stream(dispatcher, rows[0][0], rows[-1][0], [m for _s, m, _r in rows])
        found = answer.found
        report.heard(answer)
        report.compared += len(rows)
        lacking = []
        for seq, mid, receipt in rows:
            if mid not in found:
                report.missing.append(seq)
                report.mismatched.append(seq)  # the receipt's audit entry is not there
                lacking.append((seq, mid))
                continue
            audit_seq, audit_hash = _receipt_audit(receipt)
            held_seq, held_hash = found[mid]
            if audit_seq != held_seq or (audit_hash is not None and audit_hash != held_hash):
                report.mismatched.append(seq)
        await asyncio.gather(*(resend(seq, mid) for seq, mid in lacking))
        after = rows[-1][0]
    if report.resent or (full and not report.compared):
        # The partner's summary after the resends (or at all, when nothing was compared).
        report.heard(await ask_stream(dispatcher, 1, max(after, 1), []))
    now = c.clock()
    saved = await c.db.call(
        save_outbound,
        c.db.sync,
        OutboundSummary(
            link,
            report.confirmed_seq,
            now,
            report.compared,
            len(report.missing),
            report.resent,
            len(report.mismatched),
            None,
            report.partner_highest,
            0,
            tuple(report.collisions),
        ),
    )
    await c.db.append_audit(
        c.audit(
            "sync.reconcile",
            subject=f"link:{link}",
            partner=dispatcher.link.partner,
            outcome="success" if not report.failed else "failure",
            detail=f"compared {report.compared}, missing {len(report.missing)}, resent"
            f" {report.resent}, failed {report.failed}, receipts naming absent audit entries"
            f" {len(report.mismatched)}, partner contiguous {report.confirmed_seq}, partner"
            f" highest {report.partner_highest}"
            + (
                f", numbers the partner holds twice {len(report.collisions)}"
                if report.collisions
                else ""
            ),
            now=now,
        )
    )
    if saved.partner_highest > saved.own_highest:
        log.warning(
            "link %s: the partner holds up to seq %d, this store up to %d (restored from a"
            " backup?): new claims are numbered from %d",
            link,
            saved.partner_highest,
            saved.own_highest,
            saved.partner_highest + 1,
        )
    if report.collisions:
        log.warning(
            "link %s: the partner holds seq %s under more than one message identity",
            link,
            spans(ranges(report.collisions)),
        )
    if report.missing or report.mismatched:
        log.warning(
            "link %s: reconciliation found %d claims the partner lacked (resent %d) and %d"
            " receipts naming audit entries it no longer holds",
            link,
            len(report.missing),
            report.resent,
            len(report.mismatched),
        )
    return report


async def reconcile_periodically(dispatcher: Dispatcher) -> None:
    """Reconcile the link every ``reconcile_interval_seconds`` while the bridge runs.

    A failure (the partner down, a refused question) is logged and tried again at the
    next interval; the claims themselves are not at risk meanwhile.
    """
    interval = dispatcher.link.reconcile_interval_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            await reconcile(dispatcher)
        except BridgeError as exc:
            log.warning("link %s: reconciliation not done: %s", dispatcher.link.id, exc.code)
        except Exception:  # a periodic check must not end the bridge
            log.exception("link %s: reconciliation failed", dispatcher.link.id)


__all__ = [
    "CORRELATION_HEADER",
    "SEQUENCE_HEADER",
    "STREAM_HEADER",
    "HeldAnswer",
    "KnownStreams",
    "ReconcileReport",
    "SyncAPI",
    "ask_held",
    "ask_stream",
    "read_sequence",
    "reconcile",
    "reconcile_periodically",
    "recording_hook",
    "warn_collision",
]
