"""Intake at the hospital: HL7 v2 messages become records, visits, and claims on links.

The listener (:mod:`bridge.link.mllp`) hands each message to :class:`Intake`, which
reads it with the site's :class:`~bridge.mapping.hl7v2.HL7Reader` and commits, in one
transaction with the ACK and its audit entry, the message, its own record and its part
of a visit (:mod:`bridge.ledger.intake`). After the AA, the :class:`Router` takes what
became routable — a record of its own, or a visit that is complete or was corrected —
assembles and maps it, and submits it on every link whose routing rule matches, through
the controller's submit path (consent at enqueue, signing, the outbox). A record no
rule matches is kept and reported (``bridge intake list``), never dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bridge.errors import (
    BridgeError,
    ConfigError,
    LoadError,
    MappingError,
    PayloadTooLarge,
    PolicyError,
)
from bridge.ledger import intake as intake_db
from bridge.link.routing import Source, links_for
from bridge.mapping.hl7v2 import HL7Reader, SiteContext, parse_hl7
from bridge.mapping.hl7v2.visit import assemble
from bridge.resources import MappingFiles

if TYPE_CHECKING:
    from bridge.config import BridgeConfig
    from bridge.ledger import Store
    from bridge.link.node import Controller, Submitted

log = logging.getLogger("bridge.intake")


def site_reader(config: BridgeConfig | None, *, site: Path | None = None) -> HL7Reader:
    """The HL7 v2 reader of a controller: its site overlay and its own organisation.

    A broken overlay is a :class:`~bridge.errors.ConfigError` naming the overlay file and
    the key (``site/hl7v2/valuesets/his-charge-item.yaml:12 concepts``), raised here, at
    start, rather than on the first message.
    """
    from bridge.mapping import shipped_mappings

    directory = site if site is not None else (config.intake.site if config else None)
    files = MappingFiles(directory.resolve() if directory is not None else None)
    context = SiteContext(config.controller.organization_code if config else None,
                          config.controller.name if config else None)
    try:
        files.overlays()
        reader = HL7Reader(files, context)
        shipped_mappings(files)  # the WS 445 mappings read the overlaid value sets too
    except LoadError as exc:
        where = "with the site overlay" if files.site is not None else "in the shipped files"
        raise ConfigError(f"mapping file invalid {where}: {exc.message}",
                          location=exc.location) from None
    return reader


# --- routing what intake accepted ----------------------------------------------------------------


class Router:
    """Routes what intake committed: records of their own, and visits once complete.

    One task per bridge process; several processes sharing a PostgreSQL store take
    records with ``FOR UPDATE SKIP LOCKED`` and a lease. A record is routed at the
    version it was taken at: a message that arrives for a visit while it is being
    routed leaves it pending, and the next pass routes the newer content (a corrected
    claim). Every outcome is in the store (``intake_record``, ``intake_delivery``) and
    the audit log; nothing is dropped silently.
    """

    def __init__(self, controller: Controller, reader: HL7Reader, *,
                 submit: Callable[..., Awaitable[Submitted]],
                 poll_interval: float = 1.0) -> None:
        self.c = controller
        self.reader = reader
        self._submit = submit
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.routed = 0

    def wake(self) -> None:
        """Something became routable (called after the commit that made it so)."""
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.wake()  # pending work from before a restart

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.run_once()
            except BridgeError as exc:  # the store failed: try again at the next wake
                log.error("intake routing pass failed: %s", exc.code)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop routing for good
                log.error("intake routing pass failed: %s", type(exc).__name__)

    async def run_once(self) -> int:
        """Route everything pending now; returns how many records were taken."""
        total = 0
        while True:
            rows = await self.c.db.call(intake_db.claim_pending, self.c.store,
                                        now=self.c.clock())
            if not rows:
                return total
            for row in rows:
                await self._route(row)
            total += len(rows)

    # --- one record ------------------------------------------------------------------------

    async def _route(self, row: intake_db.RecordRow) -> None:
        c = self.c
        provenance: dict[str, str] = {}
        if row.kind == "visit":
            parts = await c.db.call(intake_db.visit_parts, c.store, int(row.source[6:]))
            spec = self.reader.visits.get(parts[0].kind) if parts else None
            if spec is None:
                await self._finish(row, "incomplete", "no visit file for this kind", None)
                return
            record, provenance = assemble(spec, parts)
        else:
            stored = await c.db.call(intake_db.record_of, c.store, row.id)
            record = orjson.loads(stored) if stored else {}
        body = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        links = links_for(c.config.routes, Source(row.message_type, row.dataset, row.facility))
        if not links:
            await self._finish(row, "unrouted", "no routing rule matches", body,
                               action="intake.unrouted")
            return
        digest = hashlib.sha256(body).hexdigest()
        refused: list[str] = []
        for link in links:
            latest = await c.db.call(intake_db.latest_sent, c.store, row.id, link)
            if latest is not None and latest.digest == digest:
                continue  # this content was sent on this link already
            replaces = latest.message_id if latest is not None else None
            try:
                submitted = await self._submit(record, link, replaces=replaces)
            except (PolicyError, PayloadTooLarge) as exc:
                # Refused for this link (consent, or a claim larger than the link sends):
                # another try gives the same answer.
                refused.append(f"{link}: {exc.code}")
                await self._delivery(row, link, "", digest, replaces, "refused",
                                     f"{exc.code}@{exc.location or '-'}")
                continue
            except MappingError as exc:
                if exc.location == "$.dataset":  # the link does not carry this kind of record
                    refused.append(f"{link}: {exc.message}")
                    await self._delivery(row, link, "", digest, replaces, "refused", exc.message)
                    continue
                translated = await self._translate(row, exc, record, provenance)
                await self._finish(row, "incomplete", translated, body,
                                   action="visit.incomplete")
                return
            await self._delivery(row, link, submitted.message_id, digest, replaces, "queued",
                                 None)
        self.routed += 1
        if refused:
            await self._finish(row, "refused", "; ".join(refused), body)
        else:
            await self._finish(row, "routed", None, body)

    async def _translate(self, row: intake_db.RecordRow, exc: MappingError,
                         record: dict[str, Any], provenance: dict[str, str]) -> str:
        """A refusal of the record, named at the HL7 field its element comes from."""
        if row.kind != "visit":
            sender, _, control_id = row.source[4:].rpartition("/")
            message = await self.c.db.call(_message_of, self.c.store, sender, control_id)
            if message is not None:
                trace: dict[str, str] = {}
                try:
                    self.reader.to_record(parse_hl7(message), trace=trace)
                except BridgeError:
                    trace = {}
                provenance = trace
        translated = self.reader.translate(exc, record, provenance)
        return f"{translated.message} (at {translated.location})"

    async def _delivery(self, row: intake_db.RecordRow, link: str, message_id: str,
                        digest: str, replaces: str | None, state: str,
                        detail: str | None) -> None:
        c = self.c
        audit = None
        if replaces is not None and state == "queued":
            audit = c.audit("claim.correct", subject=message_id,
                            partner=c.config.link(link).partner,
                            detail=f"replaces {replaces} ({row.label(c.label_key)})")
        elif state == "refused":
            audit = c.audit("intake.refused", subject=row.label(c.label_key), outcome="denied",
                            detail=f"{link}: {detail}")
        await c.db.call(intake_db.add_delivery, c.store, record_id=row.id, link=link,
                        message_id=message_id, digest=digest, replaces=replaces, state=state,
                        detail=detail, now=c.clock(), audit=audit)

    async def _finish(self, row: intake_db.RecordRow, state: str, detail: str | None,
                      body: bytes | None, *, action: str | None = None) -> None:
        c = self.c
        audit = None
        if action is not None:
            audit = c.audit(action, subject=row.label(c.label_key), outcome="failure"
                            if state == "incomplete" else "success",
                            categories=[row.dataset], detail=detail)
        done = await c.db.call(intake_db.finish, c.store, row, state=state, detail=detail,
                               record=body, now=c.clock(), audit=audit)
        if not done:
            self.wake()  # newer content arrived meanwhile: route it next


def _message_of(store: Store, sender: str, control_id: str) -> bytes | None:
    with store.read("hl7_message") as tx:
        row = tx.one("SELECT message FROM hl7_inbox WHERE sender=? AND control_id=?",
                     (sender, control_id))
        return tx.unseal(row[0], context="hl7_inbox.message") if row is not None else None
