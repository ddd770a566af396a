"""Per-link circuit and sync progress, and audit checkpoint health, for ``/metrics`` and
the status page.

The figures come from the same store queries as ``bridge sync status``
(:mod:`bridge.ledger.sync`) and the checkpoint tables (:mod:`bridge.ledger.tree`), read
at scrape or page time; the circuit state is the running dispatcher's
(:mod:`bridge.link.circuit`). Metrics:

``bridge_link_circuit_state{link,state}``
    1 for the state the link's circuit is in (``closed``, ``open`` or ``probing``), 0
    for the other two. Only while the bridge runs (the circuit lives in the process).
``bridge_link_circuit_openings_total{link}``
    Times the circuit opened since the process started.
``bridge_sync_seq{link,stage}``
    Highest sequence number on an outbound link that was ``enqueued``, ``sent`` at least
    once, ``acknowledged``, ``acknowledged_contiguous`` (every claim up to it acknowledged),
    and ``confirmed`` by the partner's last signed summary (0 before a reconciliation).
``bridge_sync_last_reconcile_timestamp_seconds{link}``
    When the link was last reconciled (absent before the first reconciliation).
``bridge_sync_inbound_highest_seq{partner,stream}``, ``bridge_sync_inbound_missing{partner,stream}``
    Per sender stream received here: the highest sequence number, and how many numbers
    below it have not arrived (the gaps ``bridge sync status`` lists).

Labels are link, partner, stream and state ids only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from bridge.errors import BridgeError
from bridge.ledger import tree
from bridge.ledger.audit import parse_time
from bridge.ledger.sync import inbound_streams, outbound_progress, outbound_summary
from bridge.link.circuit import CircuitState
from bridge.ops.metrics import ScrapeContext, metric_source

log = logging.getLogger("bridge.ops.metrics")

#: The stages of ``bridge_sync_seq``, in the order a claim passes them.
SYNC_STAGES = ("enqueued", "sent", "acknowledged", "acknowledged_contiguous", "confirmed")


def circuit_state(service: Any, link_id: str) -> str | None:
    """The circuit state of a running outbound link, or None when it is not running here."""
    dispatcher = getattr(service, "dispatchers", {}).get(link_id) if service else None
    circuit = getattr(dispatcher, "circuit", None)
    return str(circuit.state) if circuit is not None else None


@metric_source
def link_sync(ctx: ScrapeContext) -> Iterator[Metric]:
    circuit = GaugeMetricFamily(
        "bridge_link_circuit_state",
        "1 for the state the link's circuit is in (closed, open, probing), 0 for the others",
        labels=["link", "state"],
    )
    openings = CounterMetricFamily(
        "bridge_link_circuit_openings", "Times the link's circuit opened in this process",
        labels=["link"],
    )
    seq = GaugeMetricFamily(
        "bridge_sync_seq",
        "Highest sequence number of the outbound link at each stage (enqueued, sent,"
        " acknowledged, acknowledged_contiguous, confirmed by the partner's summary)",
        labels=["link", "stage"],
    )
    reconciled = GaugeMetricFamily(
        "bridge_sync_last_reconcile_timestamp_seconds",
        "When the outbound link was last reconciled with the partner (Unix time)",
        labels=["link"],
    )
    highest = GaugeMetricFamily(
        "bridge_sync_inbound_highest_seq",
        "Highest sequence number received on a sender's stream", labels=["partner", "stream"],
    )
    missing = GaugeMetricFamily(
        "bridge_sync_inbound_missing",
        "Sequence numbers below the highest one received that have not arrived",
        labels=["partner", "stream"],
    )
    dispatchers = getattr(ctx.service, "dispatchers", {}) if ctx.service is not None else {}
    outbound = [link for link in ctx.config.links if link.direction == "outbound"]
    for link in outbound:
        c = getattr(dispatchers.get(link.id), "circuit", None)
        if c is not None:
            for state in CircuitState:
                circuit.add_metric([link.id, str(state)], 1 if c.state is state else 0)
            openings.add_metric([link.id], c.opened_total)
    # The circuit lives in the process: it is reported even when the store does not
    # answer (bridge_store_up says so).
    yield from (circuit, openings)
    try:
        for link in outbound:
            p = outbound_progress(ctx.store, link.id)
            summary = outbound_summary(ctx.store, link.id)
            values = (p["enqueued"], p["sent"], p["acked"], p["acked_contiguous"],
                      summary.confirmed_seq if summary is not None else 0)
            for stage, value in zip(SYNC_STAGES, values, strict=True):
                seq.add_metric([link.id, stage], value)
            if summary is not None:
                reconciled.add_metric([link.id], summary.checked.timestamp())
        senders = sorted({lk.partner for lk in ctx.config.links if lk.direction != "outbound"})
        for sender in senders:
            for s in inbound_streams(ctx.store, sender):
                highest.add_metric([s.sender, s.stream], s.highest)
                missing.add_metric([s.sender, s.stream], s.missing)
    except BridgeError as exc:
        log.warning("store unavailable for the sync figures of a scrape: %s", exc.code)
        return
    yield from (seq, reconciled, highest, missing)


# --- what the status page shows --------------------------------------------------------


@dataclass(frozen=True)
class OutboundSync:
    link: str
    partner: str
    circuit: str | None  # None: no dispatcher for the link in this process
    enqueued: int
    sent: int
    acked: int
    acked_contiguous: int
    confirmed: int | None  # None: never reconciled
    reconciled: datetime | None
    missing_at_partner: int = 0
    resent: int = 0
    mismatched: int = 0


@dataclass(frozen=True)
class InboundSync:
    link: str
    sender: str
    stream: str
    received: int
    highest: int
    contiguous: int
    missing: int


@dataclass(frozen=True)
class PartnerCheckpoints:
    partner: str
    witnessed_size: int | None  # the partner's newest checkpoint cosigned here
    witnessed_at: datetime | None
    cosigned_ours_size: int | None  # our newest checkpoint the partner cosigned
    refused: int  # partner checkpoints refused here
    last_refused_at: datetime | None
    last_refused_reason: str | None


@dataclass(frozen=True)
class CheckpointView:
    own_size: int | None
    own_issued: datetime | None
    audit_entries: int
    partners: Sequence[PartnerCheckpoints]


def sync_views(config: Any, store: Any) -> tuple[list[OutboundSync], list[InboundSync]]:
    """Per outbound link its progress, per inbound sender stream its gaps (ledger thread).

    The circuit is left None: the caller fills it from the running dispatchers.
    """
    out: list[OutboundSync] = []
    inbound: list[InboundSync] = []
    for link in config.links:
        if link.direction == "outbound":
            p = outbound_progress(store, link.id)
            s = outbound_summary(store, link.id)
            out.append(OutboundSync(
                link=link.id, partner=link.partner, circuit=None, enqueued=p["enqueued"],
                sent=p["sent"], acked=p["acked"], acked_contiguous=p["acked_contiguous"],
                confirmed=s.confirmed_seq if s else None, reconciled=s.checked if s else None,
                missing_at_partner=s.missing if s else 0, resent=s.resent if s else 0,
                mismatched=s.mismatched if s else 0,
            ))
        else:
            inbound.extend(
                InboundSync(link.id, i.sender, i.stream, i.received, i.highest, i.contiguous,
                            i.missing)
                for i in inbound_streams(store, link.partner)
            )
    return out, inbound


def checkpoint_view(config: Any, store: Any) -> CheckpointView:
    """Own newest checkpoint and each partner's witnessing state (ledger thread)."""
    latest = tree.latest_checkpoint(store)
    entries = store.audit_head()[0]
    partners = []
    with store.read("ops_checkpoint_panel") as tx:
        for p in config.partners:
            w = tx.one("SELECT size, cosigned FROM audit_witness WHERE partner=?"
                       " ORDER BY size DESC LIMIT 1", (p.id,))
            c = tx.one("SELECT MAX(size) FROM audit_cosigned WHERE cosigner=?", (p.id,))
            n = tx.one("SELECT COUNT(*) FROM audit_witness_fault WHERE partner=?", (p.id,))
            f = tx.one("SELECT seen, reason FROM audit_witness_fault WHERE partner=?"
                       " ORDER BY id DESC LIMIT 1", (p.id,))
            partners.append(PartnerCheckpoints(
                partner=p.id,
                witnessed_size=int(w[0]) if w else None,
                witnessed_at=parse_time(w[1]) if w else None,
                cosigned_ours_size=int(c[0]) if c and c[0] is not None else None,
                refused=int(n[0]) if n else 0,
                last_refused_at=parse_time(f[0]) if f else None,
                last_refused_reason=str(f[1]) if f else None,
            ))
    return CheckpointView(
        own_size=latest[0] if latest else None,
        own_issued=latest[2] if latest else None,
        audit_entries=entries,
        partners=partners,
    )


__all__ = [
    "SYNC_STAGES",
    "CheckpointView",
    "InboundSync",
    "OutboundSync",
    "PartnerCheckpoints",
    "checkpoint_view",
    "circuit_state",
    "link_sync",
    "sync_views",
]
