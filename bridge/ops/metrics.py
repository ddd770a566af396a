"""Prometheus metrics of one controller, for ``/metrics`` on the operations port.

Two kinds of figure, and where each comes from:

* **What the store holds** (claims by link and state, dead letters, inbox depth, audit
  size) and what the configuration names (certificate expiry) are read *at scrape
  time* by metric sources: functions ``source(ctx) -> Iterable[Metric]`` registered
  with :func:`metric_source`. Nothing counts them along the way, so they are right
  after a restart, with several bridge processes on one store, and whatever another
  tool did to the store. Another part of the bridge adds a figure by registering a
  source in its own module::

      from prometheus_client.core import GaugeMetricFamily
      from bridge.ops.metrics import ScrapeContext, metric_source

      @metric_source
      def handoff_depth(ctx: ScrapeContext) -> Iterable[Metric]:
          depth = GaugeMetricFamily("bridge_handoff_pending", "...", labels=["target"])
          for target, n in pending_by_target(ctx.store):
              depth.add_metric([target], n)
          yield depth

  Sources run on the ledger's worker thread, so they may call the synchronous store
  (``ctx.store``) directly; ``ctx.service`` is the running bridge (its dispatchers and
  listeners) when there is one. A source that raises is reported in
  ``bridge_metrics_source_errors_total`` and does not spoil the rest of the scrape.

* **What happened in this process** (deliveries, retries, refusals, the time from
  enqueue to signed receipt) is counted from the events of :mod:`bridge.logs`: the one
  line that logs a delivery also feeds the latency histogram.

Labels are link, partner, state and stage ids: never a message identity, and never
anything taken from a record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from bridge.config import BridgeConfig
from bridge.errors import BridgeError
from bridge.logs import subscribe
from bridge.ops.certs import configured_certificates

log = logging.getLogger("bridge.ops.metrics")

#: Upper bounds (seconds) of the receipt latency histogram: loopback deliveries take
#: milliseconds, a retried one minutes, a link that was down for a while hours.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0, float("inf"),
)


@dataclass(frozen=True)
class ScrapeContext:
    """What a metric source may read during one scrape."""

    config: BridgeConfig
    store: Any  # bridge.ledger.Store, called synchronously on the ledger thread
    now: datetime
    service: Any | None = None  # bridge.link.service.BridgeService when running


MetricSource = Callable[[ScrapeContext], Iterable[Metric]]

_SOURCES: list[MetricSource] = []
_sources_lock = threading.Lock()


def metric_source(fn: MetricSource) -> MetricSource:
    """Register ``fn`` to be read at every scrape of every controller in this process."""
    with _sources_lock:
        if fn not in _SOURCES:
            _SOURCES.append(fn)
    return fn


def registered_sources() -> list[MetricSource]:
    with _sources_lock:
        return list(_SOURCES)


# --- sources every bridge has -------------------------------------------------------------


@metric_source
def build_info(ctx: ScrapeContext) -> Iterator[Metric]:
    from bridge.cli_common import FHIR_VERSION, PROTOCOL_VERSION, version_text

    info = GaugeMetricFamily(
        "bridge_build_info",
        "Always 1; the labels name this bridge's version, FHIR version and protocol version",
        labels=["controller", "version", "fhir_version", "protocol_version"],
    )
    version = version_text().split()[1]
    info.add_metric([ctx.config.controller.id, version, FHIR_VERSION, PROTOCOL_VERSION], 1)
    yield info


@metric_source
def store_figures(ctx: ScrapeContext) -> Iterator[Metric]:
    """Claims by link and state, dead letters, inbox depth and audit size, from the store."""
    up = GaugeMetricFamily("bridge_store_up", "1 when the store answered during this scrape")
    claims = GaugeMetricFamily(
        "bridge_claims", "Outbox claims by link and state", labels=["link", "partner", "state"]
    )
    dead = GaugeMetricFamily(
        "bridge_dead_letters", "Claims dead-lettered after their last attempt", labels=["link"]
    )
    contiguous = GaugeMetricFamily(
        "bridge_claims_settled_seq",
        "Highest sequence number up to which every claim on the link is acknowledged",
        labels=["link"],
    )
    inbox = GaugeMetricFamily(
        "bridge_inbox_messages", "Messages received and stored, by sender", labels=["partner"]
    )
    hl7 = GaugeMetricFamily("bridge_hl7_inbox_messages", "HL7 v2 messages accepted (AA)")
    audit = GaugeMetricFamily("bridge_audit_entries", "Entries in the audit chain")
    store = ctx.store
    try:
        for link in ctx.config.links:
            if link.direction == "outbound":
                counts = store.outbox_counts(link.id)
                for state, n in sorted(counts.items()):
                    claims.add_metric([link.id, link.partner, state], n)
                dead.add_metric([link.id], counts.get("dead", 0))
                contiguous.add_metric([link.id], store.highest_contiguous_acked(link.id))
            else:
                inbox.add_metric([link.partner], store.inbox_count(link.partner))
        hl7.add_metric([], store.hl7_count())
        audit.add_metric([], store.audit_head()[0])
    except BridgeError as exc:
        log.warning("store unavailable during a metrics scrape: %s", exc.code)
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield from (up, claims, dead, contiguous, inbox, hl7, audit)


@metric_source
def certificate_expiry(ctx: ScrapeContext) -> Iterator[Metric]:
    expiry = GaugeMetricFamily(
        "bridge_certificate_expiry_timestamp_seconds",
        "When each configured certificate expires (Unix time)",
        labels=["certificate"],
    )
    for cert in configured_certificates(ctx.config):
        if cert.not_after is not None:
            expiry.add_metric([cert.name], cert.not_after.timestamp())
    yield expiry


@metric_source
def link_state(ctx: ScrapeContext) -> Iterator[Metric]:
    """Outbound links paused by a certificate fault (the dispatcher stops sending)."""
    if ctx.service is None:
        return
    paused = GaugeMetricFamily(
        "bridge_link_paused", "1 while a link is paused by a certificate fault", labels=["link"]
    )
    for link_id, dispatcher in sorted(getattr(ctx.service, "dispatchers", {}).items()):
        paused.add_metric([link_id], 1 if getattr(dispatcher, "paused_reason", None) else 0)
    yield paused


@metric_source
def link_circuit(ctx: ScrapeContext) -> Iterator[Metric]:
    """Each outbound link's circuit (bridge.link.circuit): whether the partner is taken
    to be down, how often that happened, probes and requests sent."""
    if ctx.service is None:
        return
    state = GaugeMetricFamily(
        "bridge_link_circuit_open",
        "1 while the partner is taken to be down (circuit open or probing)",
        labels=["link"],
    )
    opened = CounterMetricFamily(
        "bridge_link_circuit_opened", "Times the link's circuit opened", labels=["link"]
    )
    probes = CounterMetricFamily(
        "bridge_link_probes", "Probe requests sent while the partner was down", labels=["link"]
    )
    requests = CounterMetricFamily(
        "bridge_link_requests", "Claim requests started (each may open a connection)",
        labels=["link"],
    )
    batches = CounterMetricFamily(
        "bridge_link_batches", "Batch requests sent (several claims in one, PROTOCOL §6b)",
        labels=["link"],
    )
    batched = CounterMetricFamily(
        "bridge_link_batched_claims", "Claims sent inside batch requests", labels=["link"],
    )
    for link_id, dispatcher in sorted(getattr(ctx.service, "dispatchers", {}).items()):
        circuit = getattr(dispatcher, "circuit", None)
        if circuit is None:
            continue
        state.add_metric([link_id], 0 if circuit.state == "closed" else 1)
        opened.add_metric([link_id], circuit.opened_total)
        probes.add_metric([link_id], circuit.probes_total)
        requests.add_metric([link_id], dispatcher.stats.requests)
        batches.add_metric([link_id], dispatcher.stats.batches)
        batched.add_metric([link_id], dispatcher.stats.batched)
    yield from (state, opened, probes, requests, batches, batched)


# --- one controller's registry --------------------------------------------------------------


class _Sources(Collector):
    def __init__(self, owner: BridgeMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        owner = self.owner
        ctx = ScrapeContext(
            config=owner.config, store=owner.store, now=owner.clock(), service=owner.service
        )
        for source in registered_sources():
            try:
                yield from list(source(ctx))
            except Exception:
                name = getattr(source, "__name__", "source")
                log.exception("metric source %s failed", name)
                owner.source_errors[name] = owner.source_errors.get(name, 0) + 1
        errors = CounterMetricFamily(
            "bridge_metrics_source_errors",
            "Scrapes in which a metric source failed",
            labels=["source"],
        )
        for name, n in sorted(owner.source_errors.items()):
            errors.add_metric([name], n)
        yield errors


class BridgeMetrics:
    """The registry behind one controller's ``/metrics``.

    ``render()`` reads the store: call it on the ledger's thread
    (``await controller.db.call(metrics.render)``).
    """

    def __init__(
        self,
        config: BridgeConfig,
        store: Any,
        *,
        service: Any | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.store = store
        self.service = service
        self.clock = clock
        self.controller_id = config.controller.id
        self.source_errors: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.deliveries = Counter(
            "bridge_deliveries", "Claims delivered with a verified receipt", ["link"], registry=r
        )
        self.retries = Counter(
            "bridge_delivery_retries", "Delivery attempts rescheduled after a transient failure",
            ["link"], registry=r,
        )
        self.dead_lettered = Counter(
            "bridge_dead_lettered", "Claims dead-lettered by this process", ["link"], registry=r
        )
        self.rejections = Counter(
            "bridge_partner_rejections", "Claims the partner refused definitively", ["link"],
            registry=r,
        )
        self.refusals = Counter(
            "bridge_refusals", "Messages or requests refused, by stage", ["stage"], registry=r
        )
        self.certificate_refusals = Counter(
            "bridge_certificate_refusals", "TLS handshakes refused or links paused for a"
            " certificate fault", registry=r,
        )
        self.latency = Histogram(
            "bridge_receipt_latency_seconds",
            "Time from enqueue to the partner's verified signed receipt",
            ["link"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_Sources(self))
        self._unsubscribe = subscribe(self._on_event)

    def _on_event(self, name: str, fields: dict[str, Any]) -> None:
        if fields.get("controller") != self.controller_id:
            return
        link = str(fields.get("link", ""))
        if name == "delivery":
            self.deliveries.labels(link).inc()
            seconds = fields.get("seconds")
            if isinstance(seconds, int | float):
                self.latency.labels(link).observe(max(0.0, float(seconds)))
        elif name == "retry":
            self.retries.labels(link).inc()
        elif name == "dead_letter":
            self.dead_lettered.labels(link).inc()
        elif name == "rejected":
            self.rejections.labels(link).inc()
        elif name == "refusal":
            self.refusals.labels(str(fields.get("stage", "unknown"))).inc()
        elif name == "certificate_refusal":
            self.certificate_refusals.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition (reads the store: run on the ledger thread)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        self._unsubscribe()


__all__ = [
    "LATENCY_BUCKETS",
    "BridgeMetrics",
    "MetricSource",
    "ScrapeContext",
    "metric_source",
    "registered_sources",
]
