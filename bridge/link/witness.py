"""Partners check each other's audit logs: checkpoints exchanged and cosigned (PROTOCOL §9.7).

Serving side (:class:`AuditExchangeAPI`), for any registered partner over mutual TLS:

- ``GET [base]/$audit-checkpoint?from=M`` answers a FHIR ``Parameters`` with this
  controller's newest signed checkpoint (``checkpoint``; one is signed first when
  entries are not yet covered) and, when ``M`` is not larger than its size, the
  consistency proof from size ``M`` (``consistency``: base64 hashes, space-separated,
  left out when empty);
- ``POST [base]/$audit-cosign`` takes a ``Parameters`` whose ``checkpoint`` is one of
  this controller's checkpoints with the caller's cosignature added, checks both
  signatures and that the checkpoint is one it issued, and keeps it.

Calling side (:class:`AuditWitness`): at least every 60 s, for each partner, fetch its
checkpoint with a proof from the last one this controller cosigned (or the larger one a
receipt of that partner carried), verify the signature and the proof
(:func:`bridge.trust.checkpoint.check_extends`), and only then cosign it, keep it and
send the cosignature back. A checkpoint that fails is kept as evidence, audited as
``audit.partner-inconsistent`` with the checkpoint's name, counted, and logged; it is
never cosigned, and the next round checks against the same previous checkpoint again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.errors import BridgeError, NotFound, ParseError, PartnerRejected, member_label
from bridge.ledger import merkle, tree
from bridge.ops.metrics import ScrapeContext, metric_source
from bridge.trust.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_extends,
    cosign,
    cosignatures,
    origin_for,
    parse_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from bridge.trust.receipts import EXT_AUDIT_CHECKPOINT

if TYPE_CHECKING:
    from bridge.link.node import Controller
    from bridge.link.server import ReceiverApp

log = logging.getLogger("bridge.witness")

FHIR_JSON = "application/fhir+json"
#: How often partners' checkpoints are fetched, and own checkpoints considered.
INTERVAL_SECONDS = 30.0
#: The query parameters of ``$audit-checkpoint`` (PROTOCOL §9.7); any other is refused.
CHECKPOINT_PARAMETERS = frozenset({"from"})


class NoCheckpoint(NotFound):
    """This controller has issued no checkpoint yet: its audit log is empty (P-AUD-11).

    A normal state of a new bridge, not a fault of either side: the caller has nothing
    to check yet and asks again in its next round.
    """

    code = "no-checkpoint"


def _parameters(**values: str | None) -> bytes:
    params = [{"name": k, "valueString": v} for k, v in values.items() if v]
    return orjson.dumps({"resourceType": "Parameters", "parameter": params})


def _read_parameters(body: bytes, where: str) -> dict[str, str]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ParseError("body is not JSON", location=where) from None
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise ParseError("body is not a FHIR Parameters resource", location=where)
    out: dict[str, str] = {}
    for i, p in enumerate(doc.get("parameter") or []):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(
                p.get("valueString"), str):
            raise ParseError("parameter must have a name and a valueString",
                             location=f"Parameters.parameter[{i}]")
        out[p["name"]] = p["valueString"]
    return out


def _outcome_code(body: bytes) -> str | None:
    """The error code of an OperationOutcome answer (PROTOCOL P-ERR-1), None if it has none."""
    try:
        doc = orjson.loads(body)
        code = doc["issue"][0]["details"]["coding"][0]["code"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _proof_text(proof: list[bytes]) -> str | None:
    return " ".join(base64.b64encode(h).decode() for h in proof) or None


def _proof(text: str | None, where: str) -> list[bytes]:
    try:
        return [base64.b64decode(p, validate=True) for p in (text or "").split()]
    except binascii.Error:
        raise ParseError("consistency proof is not base64", location=where) from None


def own_signer(c: Controller) -> Any:
    """``sign(size, root, now) -> note`` with the controller's signing key."""

    def sign(size: int, root: bytes, now: Any) -> str:
        return sign_checkpoint(c.signer.private_key, c.id, origin_for(c.id), size, root,
                               now).note

    return sign


def keys_of(c: Controller, name: str) -> list[Any]:
    """Signing public keys of ``name`` (a partner, or this controller)."""
    if name == c.id:
        return [c.signer.private_key.public_key()]
    return [e.public_key for k in c.keyring.kids_for(name) if (e := c.keyring.get(k)) is not None]


# --- serving side ------------------------------------------------------------------------


def checkpoint_answer(store: Any, sign: Any, now: Any, from_size: int) -> bytes:
    """The body of ``GET $audit-checkpoint?from=M`` (sync; runs in the store's thread).

    A new checkpoint is signed only when one is due, or when the caller already holds a
    larger one (from a receipt): asking often does not make the store write more.
    """
    latest = tree.latest_checkpoint(store)
    if tree.checkpoint_due(store, now) or latest is None or latest[0] < from_size:
        tree.issue_checkpoint(store, sign, now)
        latest = tree.latest_checkpoint(store)
    if latest is None:
        raise NoCheckpoint("no checkpoint yet: the audit log is empty",
                           location="$audit-checkpoint")
    size, _, _, note = latest
    proof: list[bytes] = []
    if from_size <= size:
        _, _, leaves = tree.cache_of(store).sync(store)
        proof = merkle.consistency_proof(from_size, leaves[:size])
    return _parameters(checkpoint=note, consistency=_proof_text(proof))


def _from_size(query: Any) -> int:
    """``from`` of ``$audit-checkpoint`` (0 when absent): one tree size, no other parameter.
    A parameter is named as an element name is, or ``*``: its name is the caller's text."""
    for name in query:
        if name not in CHECKPOINT_PARAMETERS:
            raise ParseError("unknown parameter", location=member_label(name))
    values = query.getall("from", ["0"])
    if len(values) != 1:
        raise ParseError("from is given more than once", location="from")
    text = values[0]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ParseError("from must be a tree size (a whole number)", location="from")
    return int(text)


class AuditExchangeAPI:
    """``$audit-checkpoint`` and ``$audit-cosign`` (see the module docstring)."""

    def __init__(self, receiver: ReceiverApp) -> None:
        self.receiver = receiver
        self.c = receiver.c

    def register(self, app: web.Application, base: str) -> None:
        app.router.add_get(f"{base}/$audit-checkpoint", self.checkpoint, allow_head=False)
        app.router.add_post(f"{base}/$audit-cosign", self.cosign)

    async def checkpoint(self, request: web.Request) -> web.Response:
        partner = self.receiver._peer_partner(request)
        try:
            from_size = _from_size(request.query)
        except ParseError as exc:
            # The partner's bad question: refused, audited and logged as a refusal.
            return await self.receiver._refuse(exc, partner=partner.id,
                                               subject="$audit-checkpoint")
        c = self.c
        try:
            body = await c.db.call(checkpoint_answer, c.store, own_signer(c), c.clock(),
                                   from_size)
        except NoCheckpoint as exc:
            log.info("%s asked for an audit checkpoint: none yet (the audit log is empty)",
                     partner.id)
            return web.Response(status=exc.http_status,
                                body=orjson.dumps(exc.to_operation_outcome()),
                                content_type=FHIR_JSON)
        return web.Response(body=body, content_type=FHIR_JSON)

    async def cosign(self, request: web.Request) -> web.Response:
        partner = self.receiver._peer_partner(request)
        c = self.c
        params = _read_parameters(await request.read(), "Parameters")
        for name in params:
            if name != "checkpoint":
                raise ParseError("unknown parameter", location=f"Parameters.{member_label(name)}")
        note = params.get("checkpoint")
        if note is None:
            raise ParseError("no checkpoint parameter", location="Parameters.parameter")
        cp = verify_checkpoint(note, c.id, keys_of(c, c.id))
        if not cosignatures(note, partner.id, keys_of(c, partner.id),
                            where=f"checkpoint {cp.name}"):
            raise CheckpointError(f"no valid cosignature by {partner.id}",
                                  location=f"checkpoint {cp.name}")
        own = dict(await c.db.call(tree.own_checkpoints, c.store))
        if own.get(cp.size) is None or parse_checkpoint(own[cp.size]).root != cp.root:
            raise CheckpointError("not a checkpoint this controller issued",
                                  location=f"checkpoint {cp.name}")
        await c.db.call(tree.keep_cosigned, c.store, partner.id, cp.size, note, c.clock())
        return web.Response(body=_parameters(stored="true"), content_type=FHIR_JSON)


# --- calling side -------------------------------------------------------------------------


@dataclass(frozen=True)
class WitnessResult:
    """One round with one partner: what was cosigned, or what was refused and why."""

    partner: str
    checkpoint: str | None = None
    cosigned: bool = False
    fault: str | None = None


def _receipt_checkpoint(store: Any, partner: str) -> Checkpoint | None:
    """The checkpoint in the newest receipt from ``partner`` (not yet verified here)."""
    with store.read("receipt_checkpoint") as tx:
        r = tx.one("SELECT receipt FROM outbox WHERE partner=? AND state='acked'"
                   " AND receipt IS NOT NULL ORDER BY updated DESC LIMIT 1", (partner,))
        data = tx.unseal(r[0], context="outbox.receipt") if r is not None else None
    if data is None:
        return None
    try:
        receipt = orjson.loads(data)
        for ext in receipt["entry"][0]["resource"].get("extension", []):
            if ext.get("url") == EXT_AUDIT_CHECKPOINT:
                return parse_checkpoint(ext["valueString"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError,
            CheckpointError):
        return None
    return None


def previous_checkpoint(c: Controller, partner: str) -> Checkpoint | None:
    """What the partner's next checkpoint must extend: the larger of the last one this
    controller cosigned and the one in the newest receipt (sync)."""
    found: list[Checkpoint] = []
    last = tree.last_witnessed(c.store, partner)
    if last is not None:
        found.append(verify_checkpoint(last[1], partner, keys_of(c, partner)))
    from_receipt = _receipt_checkpoint(c.store, partner)
    if from_receipt is not None:
        try:
            found.append(verify_checkpoint(from_receipt.note, partner, keys_of(c, partner)))
        except CheckpointError:
            pass
    return max(found, key=lambda cp: cp.size) if found else None


class AuditWitness:
    """Fetch, check, cosign and return partners' checkpoints (see the module docstring)."""

    def __init__(self, controller: Controller, *, interval: float = INTERVAL_SECONDS) -> None:
        self.c = controller
        self.interval = interval
        self.faults = 0
        self._task: asyncio.Task[None] | None = None

    def partners(self) -> list[Any]:
        linked = {link.partner for link in self.c.config.links}
        return [p for p in self.c.config.partners if p.id in linked and p.base_url]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-witness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            # First round after one interval: partners starting together are up by then.
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except BridgeError as exc:
                # An audit entry changed outside the bridge lands here: it names the entry
                # and column; the next round tries again.
                log.error("audit checkpoint round failed: %s", exc)
            except Exception:
                log.exception("audit checkpoint round failed")

    async def run_once(self) -> list[WitnessResult]:
        """Sign an own checkpoint when one is due, then one round with every partner."""
        c = self.c
        now = c.clock()
        try:
            if await c.db.call(tree.checkpoint_due, c.store, now):
                await c.db.call(tree.issue_checkpoint, c.store, own_signer(c), now)
        except BridgeError as exc:
            # A damaged own log: the partners' logs are still checked this round.
            log.error("own audit checkpoint not signed: %s (%s)", exc.code, exc.location)
        results = []
        for partner in self.partners():
            try:
                results.append(await self.witness(partner))
            except BridgeError as exc:
                log.warning("audit checkpoint exchange with %s failed: %s (%s)", partner.id,
                            exc.code, exc.location)
                results.append(WitnessResult(partner.id, fault=f"{exc.code}@{exc.location}"))
        return results

    async def _session(self, partner: Any) -> aiohttp.ClientSession:
        from bridge.link.dispatcher import PartnerConnector
        from bridge.trust.tls import client_context

        tls = self.c.config.tls
        connector = PartnerConnector(expected_partner=partner.id,
                                     fingerprints=frozenset(partner.tls_fingerprints),
                                     ssl=client_context(tls.cert, tls.key, tls.ca), limit=1)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30),
                                     headers={"Accept": FHIR_JSON})

    async def witness(self, partner: Any) -> WitnessResult:
        """One round with ``partner``."""
        from bridge.link.dispatcher import classify_exception

        c = self.c
        base = str(partner.base_url).rstrip("/")
        previous = await c.db.call(previous_checkpoint, c, partner.id)
        async with await self._session(partner) as session:
            try:
                async with session.get(f"{base}/$audit-checkpoint",
                                       params={"from": str(previous.size if previous else 0)}
                                       ) as resp:
                    body, status = await resp.read(), resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise classify_exception(exc) from None
            if status == NoCheckpoint.http_status and _outcome_code(body) == NoCheckpoint.code:
                if previous is None:
                    # The partner's log is empty (a new bridge): nothing to check yet.
                    log.info("partner %s has no audit checkpoint yet (its log is empty)",
                             partner.id)
                    return WitnessResult(partner.id)
                # A log this side saw checkpoints of is empty now: it was wiped or
                # replaced (P-AUD-11), which no append-only log does.
                emptied = CheckpointError(
                    f"the partner's audit log is empty, after a checkpoint of size"
                    f" {previous.size}", location="checkpoint size")
                await self._fault(partner.id, "", emptied)
                return WitnessResult(partner.id, fault=f"{emptied}")
            if status != 200:
                raise PartnerRejected(f"checkpoint request answered {status}",
                                      location=f"HTTP {status}")
            params = _read_parameters(body, "$audit-checkpoint")
            note = params.get("checkpoint", "")
            try:
                cp = verify_checkpoint(note, partner.id, keys_of(c, partner.id))
                check_extends(previous, cp, _proof(params.get("consistency"), "consistency"))
            except (CheckpointError, ParseError) as exc:
                await self._fault(partner.id, note, exc)
                return WitnessResult(partner.id, checkpoint=note or None,
                                     fault=f"{exc}")
            last = await c.db.call(tree.last_witnessed, c.store, partner.id)
            if last is not None and last[0] == cp.size:
                return WitnessResult(partner.id, checkpoint=cp.name)  # nothing new to cosign
            now = c.clock()
            cosigned = cosign(cp, c.signer.private_key, c.id, now)
            await c.db.call(tree.keep_witnessed, c.store, partner.id, cp.size, cp.root,
                            cosigned, now)
            try:
                async with session.post(f"{base}/$audit-cosign",
                                        data=_parameters(checkpoint=cosigned),
                                        headers={"Content-Type": FHIR_JSON}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise PartnerRejected(f"cosignature refused ({resp.status})",
                                              location=f"checkpoint {cp.name}")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise classify_exception(exc) from None
        return WitnessResult(partner.id, checkpoint=cp.name, cosigned=True)

    async def _fault(self, partner: str, note: str, exc: BridgeError) -> None:
        c = self.c
        self.faults += 1
        where = exc.location or "checkpoint"
        log.error("partner %s audit log check failed at %s: %s", partner, where, exc)
        await c.db.call(tree.keep_fault, c.store, partner, note, str(exc), c.clock())
        await c.db.append_audit(c.audit(
            "audit.partner-inconsistent", subject=where.removeprefix("checkpoint "),
            partner=partner, outcome="failure", detail=f"{exc.code}@{where}"))


# --- metrics ------------------------------------------------------------------------------


@metric_source
def audit_evidence(ctx: ScrapeContext) -> Iterator[Metric]:
    """Own checkpoints, what each partner's log was last cosigned at, and refusals."""
    own = GaugeMetricFamily("bridge_audit_checkpoint_size",
                            "Entries covered by this controller's newest signed checkpoint")
    latest = tree.latest_checkpoint(ctx.store)
    own.add_metric([], latest[0] if latest else 0)
    witnessed = GaugeMetricFamily("bridge_audit_partner_cosigned_size",
                                  "Size of the partner's newest checkpoint cosigned here",
                                  labels=["partner"])
    refused = CounterMetricFamily("bridge_audit_partner_inconsistent",
                                  "Partner checkpoints refused: the partner's log no longer"
                                  " extends the one cosigned before", labels=["partner"])
    with ctx.store.read("audit_evidence_metrics") as tx:
        faults = {str(p): int(n) for p, n in tx.all(
            "SELECT partner, COUNT(*) FROM audit_witness_fault GROUP BY partner")}
    for p in ctx.config.partners:
        last = tree.last_witnessed(ctx.store, p.id)
        witnessed.add_metric([p.id], last[0] if last else 0)
        refused.add_metric([p.id], faults.get(p.id, 0))
    yield from (own, witnessed, refused)
