"""Where a pull link's answers come from.

:class:`PullSource` is the adapter interface. The bridge ships :class:`StoreSource`,
which answers from the bridge's own records store (``bridge.ledger.records``: records
that arrived over MLLP, were pushed with ``bridge push`` or imported with ``bridge
records import``). A hospital that already runs a FHIR server or a clinical data
repository can answer from it instead by implementing the same three methods (see the
README, "Record pull"); whatever a source returns still goes through the link's
policy, signing and audit, so a source only has to find data, never to filter it.

A source's contract:

- it speaks of a patient by one stable id, the id its Patient resource carries, and
  finds it by an identifier ``(system, value)`` or that id (``open_patient``);
- positions only grow: ``open_patient`` without a snapshot returns the current one in
  its view; every resource has a position (``StoredResource.seq``) and a traversal
  reads *as of* one snapshot, in position order, so pages neither repeat nor skip a
  resource while data keeps arriving;
- the resources of a patient are in the patient's compartment: references between them
  are ``Type/id``, and the Patient is among them;
- date and lastUpdated filters are applied by the source (``DateFilter.matches`` gives
  the R4 semantics for a source that filters in Python).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from bridge.errors import BridgeError
from bridge.ledger import records as rec
from bridge.ledger.records import PatientView, StoredResource
from bridge.records.search import DateFilter

if TYPE_CHECKING:
    from bridge.link.node import Controller

log = logging.getLogger("bridge.pull")


class PullSource(Protocol):
    """The adapter interface of a pull link (see the module docstring)."""

    async def open_patient(
        self,
        *,
        identifier: tuple[str, str] | None = None,
        patient_id: str | None = None,
        snapshot: int | None = None,
    ) -> PatientView | None:
        """The patient holding ``identifier`` ``(system, value)``, or with ``patient_id``,
        as of ``snapshot`` (the current position when None, which the view then
        carries): its id, its Patient resource and every ``(system, value)`` it is known
        by, most stable first. None when there is no such patient."""
        ...

    async def resources(
        self,
        patient: str,
        *,
        types: Sequence[str],
        snapshot: int,
        after: int,
        limit: int,
        dates: Sequence[DateFilter] = (),
        last_updated: Sequence[DateFilter] = (),
        ids: Sequence[str] = (),
    ) -> list[StoredResource]:
        """Up to ``limit`` resources of the patient of ``types`` as of ``snapshot``, with
        positions above ``after``, in position order, matching every filter."""
        ...

    async def read(
        self, patient: str, refs: Sequence[tuple[str, str]], *, snapshot: int
    ) -> list[StoredResource]:
        """These ``(type, id)`` of the patient's compartment as of ``snapshot``."""
        ...


class StoreSource:
    """Answers from the bridge's own records store, keeping up with the HL7 inbox.

    Records that arrive over MLLP are kept in the HL7 inbox as DE records; they are
    mapped and indexed here (in the background, and before each answer for at most
    ``catch_up_rows`` rows) so a pull sees what the HIS sent a moment ago.
    """

    def __init__(self, controller: Controller, *, catch_up_rows: int = 500) -> None:
        self.c = controller
        self._lock = asyncio.Lock()
        self._catch_up_rows = catch_up_rows
        self._task: asyncio.Task[None] | None = None
        self.indexed = 0
        self.skipped = 0

    # --- keeping up with the HL7 inbox ----------------------------------------------------

    async def catch_up(self, *, max_rows: int | None = None) -> int:
        """Index pending HL7 inbox records (up to ``max_rows``); return how many were read."""
        budget = self._catch_up_rows if max_rows is None else max_rows
        done = 0
        async with self._lock:
            while done < budget:
                rows = await self.c.db.call(rec.hl7_pending, self.c.store,
                                            limit=min(100, budget - done))
                if not rows:
                    break
                items = [(i, record, f"mllp:{sender}/{control}", self._map(record))
                         for i, sender, control, record in rows]
                self.indexed += await self.c.db.call(
                    rec.index_hl7, self.c.store, items, now=self.c.clock()
                )
                done += len(rows)
        return done

    def _map(self, record: bytes) -> dict[str, Any] | None:
        if not record:
            return None
        try:
            collection = self.c.pull_collection(orjson.loads(record))
            rec.patient_keys(collection)
        except (BridgeError, ValueError) as exc:
            # A stored record that does not map or names no patient is not pullable; the
            # HL7 inbox keeps it (its acknowledgement already said so).
            self.skipped += 1
            log.info("HL7 inbox record not indexed for pull: %s", getattr(exc, "code", "invalid"))
            return None
        return collection

    async def run(self, interval: float = 1.0) -> None:
        """Index in the background until cancelled."""
        while True:
            try:
                read = await self.catch_up(max_rows=1000)
            except BridgeError as exc:
                log.warning("indexing the HL7 inbox for pull failed: %s", exc)
                read = 0
            if read == 0:
                await asyncio.sleep(interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="pull-index")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the adapter interface ---------------------------------------------------------------

    async def open_patient(
        self,
        *,
        identifier: tuple[str, str] | None = None,
        patient_id: str | None = None,
        snapshot: int | None = None,
    ) -> PatientView | None:
        key = f"{identifier[0]}|{identifier[1]}" if identifier is not None else None
        for _ in range(3):
            head, view = await self.c.db.call(
                rec.open_patient, self.c.store, key=key, person=patient_id,
                snapshot_seq=snapshot,
            )
            if head >= 0:
                return view
            # HL7 inbox rows wait to be indexed: take them in before answering.
            await self.catch_up()
        head, view = await self.c.db.call(
            rec.open_patient, self.c.store, key=key, person=patient_id,
            snapshot_seq=await self.c.db.call(rec.snapshot, self.c.store),
        )
        return view

    async def resources(
        self,
        patient: str,
        *,
        types: Sequence[str],
        snapshot: int,
        after: int,
        limit: int,
        dates: Sequence[DateFilter] = (),
        last_updated: Sequence[DateFilter] = (),
        ids: Sequence[str] = (),
    ) -> list[StoredResource]:
        return await self.c.db.call(
            rec.page, self.c.store, person=patient, types=list(types), snapshot_seq=snapshot,
            after=after, limit=limit, dates=list(dates), last_updated=list(last_updated),
            ids=list(ids),
        )

    async def read(
        self, patient: str, refs: Sequence[tuple[str, str]], *, snapshot: int
    ) -> list[StoredResource]:
        return await self.c.db.call(
            rec.read_refs, self.c.store, person=patient, refs=list(refs), snapshot_seq=snapshot
        )
