"""Destruction after use: data received under an agreement is destroyed when the
agreement's retention has passed (GB/T 39725 §11.7.4.3, Appendix F).

For every receiving link (``inbound``, ``pull-from``) that carries an agreement, the
payloads received more than ``retention_days`` ago are emptied
(:func:`bridge.ledger.compliance.destroy_received`): the message identities, digests,
receipts and audit entries stay, so the exchange can still be proven and the audit log
and receipts verify as before. ``bridge serve`` runs it at start and every hour;
``bridge agreements destroy`` runs it on demand.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from bridge.ledger.compliance import Destroyed, destroy_received

if TYPE_CHECKING:
    from bridge.config import BridgeConfig
    from bridge.ledger import Store
    from bridge.link.node import Controller

log = logging.getLogger("bridge.destruction")

INTERVAL_SECONDS = 3600.0


def destroy_expired(store: Store, config: BridgeConfig, *, now: datetime,
                    dry_run: bool = False) -> list[Destroyed]:
    """Destroy what every receiving link's agreement no longer lets this side keep."""
    from bridge.compliance.operators import acting_operator
    from bridge.ledger.audit import AuditRecord

    done: list[Destroyed] = []
    for link in config.links:
        if link.agreement is None or link.direction not in ("inbound", "pull-from"):
            continue
        agreement = config.agreement(link.agreement)
        done.append(destroy_received(
            store, link=link.id, partner=link.partner, direction=link.direction,
            agreement=agreement.id, retention_days=agreement.retention_days, now=now,
            dry_run=dry_run,
            audit=AuditRecord(time=now, actor=config.controller.id, action="data.destroy",
                              subject=f"link:{link.id}", partner=link.partner,
                              operator=acting_operator()),
        ))
    return done


async def destroy_periodically(controller: Controller,
                               interval: float = INTERVAL_SECONDS) -> None:
    """Run :func:`destroy_expired` now and every ``interval`` seconds."""
    while True:
        try:
            done = await controller.db.call(destroy_expired, controller.store, controller.config,
                                            now=controller.clock())
            for d in done:
                if d.items:
                    log.info("destroyed %d received payloads on %s (agreement %s)",
                             d.items, d.link, d.agreement)
        except Exception:
            log.exception("destruction of expired data failed")
        await asyncio.sleep(interval)


__all__ = ["destroy_expired", "destroy_periodically"]
