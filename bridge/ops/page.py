"""The status page: one server-rendered HTML page per controller.

Everything it needs is inline (styles and the SVG charts): it works in a hospital
network with no way out. It shows identities, counts and codes only, never a value
from a record. Every string from the store or the configuration is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING

from bridge.ops.certs import CertificateInfo
from bridge.ops.certs import check as check_certificate

if TYPE_CHECKING:
    from bridge.ops.linkstate import CheckpointView, InboundSync, OutboundSync


@dataclass(frozen=True)
class LinkView:
    id: str
    partner: str
    direction: str
    state: str  # "running", "paused: <reason>", "receiving"
    counts: dict[str, int] = field(default_factory=dict)
    settled_seq: int = 0
    received: int = 0
    series: Sequence[tuple[float, int]] = ()


@dataclass(frozen=True)
class DeadLetterView:
    link: str
    seq: int
    message_id: str
    state: str  # dead or rejected
    error: str | None
    updated: datetime


@dataclass(frozen=True)
class HandoffView:
    """One hand-off destination: claims received here on their way to our own systems."""

    id: str
    kind: str | None  # None: no longer configured, its claims go nowhere
    waiting: int
    delivered: int
    dead: int
    failing: str | None  # the error code while a waiting hand-off keeps failing
    oldest_waiting: datetime | None


@dataclass(frozen=True)
class StatusView:
    controller: str
    name: str
    version: str
    now: datetime
    clock_now: float  # the sampling clock's now, for the chart's x axis
    window: float
    store_ok: bool
    audit_entries: int
    links: Sequence[LinkView]
    dead_letters: Sequence[DeadLetterView]
    certificates: Sequence[CertificateInfo]
    warning_days: int
    csrf_token: str
    notice: str | None = None
    refresh_seconds: int = 30
    handoffs: Sequence[HandoffView] = ()
    sync_out: Sequence[OutboundSync] = ()
    sync_in: Sequence[InboundSync] = ()
    checkpoints: CheckpointView | None = None


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .5em}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #d8dde6;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17663a}.bad{color:#a3141e;font-weight:600}.warn{color:#8a5a00;font-weight:600}
.muted{color:#5b6475}.notice{background:#e7f4ea;border:1px solid #9fd0ad;padding:.5em}
svg{background:#fff;border:1px solid #d8dde6}code{font-size:.92em}
button{font:inherit;padding:.15em .7em}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def depth_chart(
    series: Sequence[tuple[float, int]], *, now: float, window: float, label: str
) -> str:
    """An inline SVG line chart of queue depth over the last ``window`` seconds."""
    width, height, pad = 360, 80, 4
    points = [(t, d) for t, d in series if t >= now - window]
    peak = max((d for _t, d in points), default=0)
    top = max(peak, 1)
    coords = " ".join(
        f"{pad + (width - 2 * pad) * (1 - (now - t) / window):.1f},"
        f"{height - pad - (height - 2 * pad) * d / top:.1f}"
        for t, d in points
    )
    latest = points[-1][1] if points else 0
    title = f"{label}: {len(points)} samples, now {latest}, peak {peak}"
    line = (
        f'<polyline fill="none" stroke="#2f6fdb" stroke-width="2" points="{coords}"/>'
        if len(points) > 1
        else (
            f'<circle cx="{width - pad}" cy="{height - pad - (height - 2 * pad) * latest / top:.1f}"'
            ' r="2.5" fill="#2f6fdb"/>'
            if points
            else ""
        )
    )
    return (
        f'<svg class="depth" role="img" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" data-link="{_e(label)}" data-now="{latest}"'
        f' data-peak="{peak}" data-samples="{len(points)}"><title>{_e(title)}</title>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"'
        ' stroke="#c4cad4"/>'
        f'<text x="{pad + 2}" y="12" font-size="10" fill="#5b6475">peak {peak}</text>'
        f'<text x="{width - pad - 2}" y="12" font-size="10" fill="#5b6475"'
        f' text-anchor="end">now {latest}</text>{line}</svg>'
    )


def _links_table(view: StatusView) -> str:
    rows = []
    for link in view.links:
        state_class = "bad" if link.state.startswith("paused") else "ok"
        if link.direction == "outbound":
            c = link.counts
            sent = sum(c.values())
            waiting = c.get("queued", 0) + c.get("sending", 0)
            progress = (
                f"<td class='n' data-field='enqueued'>{sent}</td>"
                f"<td class='n' data-field='acked'>{c.get('acked', 0)}</td>"
                f"<td class='n' data-field='waiting'>{waiting}</td>"
                f"<td class='n' data-field='dead'>{c.get('dead', 0)}</td>"
                f"<td class='n' data-field='rejected'>{c.get('rejected', 0)}</td>"
                f"<td class='n' data-field='refused'>{c.get('refused', 0)}</td>"
                f"<td class='n' data-field='settled'>{link.settled_seq}</td>"
            )
            chart = depth_chart(link.series, now=view.clock_now, window=view.window, label=link.id)
        else:
            progress = (
                f"<td class='n' data-field='received'>{link.received}</td>"
                "<td colspan='6' class='muted'>inbound: messages received and stored</td>"
            )
            chart = ""
        rows.append(
            f"<tr data-link='{_e(link.id)}'><td><code>{_e(link.id)}</code></td>"
            f"<td>{_e(link.partner)}</td><td>{_e(link.direction)}</td>"
            f"<td class='{state_class}' data-field='state'>{_e(link.state)}</td>"
            f"{progress}<td>{chart}</td></tr>"
        )
    return (
        "<table id='links'><tr><th>link</th><th>partner</th><th>direction</th><th>state</th>"
        "<th>enqueued</th><th>acknowledged</th><th>waiting</th><th>dead</th><th>rejected</th>"
        "<th>refused</th><th>settled up to seq</th><th>waiting, last hour</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _dead_letters(view: StatusView) -> str:
    if not view.dead_letters:
        return "<p id='dead-letters' class='ok'>No dead or rejected claims.</p>"
    rows = []
    for d in view.dead_letters:
        rows.append(
            f"<tr data-message-id='{_e(d.message_id)}'><td><code>{_e(d.link)}</code></td>"
            f"<td class='n'>{d.seq}</td><td><code>{_e(d.message_id)}</code></td>"
            f"<td class='bad'>{_e(d.state)}</td><td>{_e(d.error or '-')}</td>"
            f"<td>{_e(d.updated.isoformat(timespec='seconds'))}</td>"
            "<td><form method='post' action='/requeue'>"
            f"<input type='hidden' name='message_id' value='{_e(d.message_id)}'>"
            f"<input type='hidden' name='token' value='{_e(view.csrf_token)}'>"
            f"<button type='submit' name='requeue' data-message-id='{_e(d.message_id)}'>"
            "requeue</button></form></td></tr>"
        )
    return (
        "<table id='dead-letters'><tr><th>link</th><th>seq</th><th>message</th><th>state</th>"
        "<th>last error</th><th>since</th><th></th></tr>" + "".join(rows) + "</table>"
        "<p class='muted'>Requeue sends the claim again with the same identity: the partner"
        " deduplicates it if it did receive it. Each requeue is audited.</p>"
    )


def _handoffs(view: StatusView) -> str:
    if not view.handoffs:
        return ""
    rows = []
    for h in view.handoffs:
        if h.kind is None:
            state, cls = "not configured: handed to no one", "bad" if h.waiting else "muted"
        elif h.failing is not None:
            state, cls = f"failing: {h.failing}", "bad"
        else:
            state, cls = "handing over", "ok"
        since = h.oldest_waiting.isoformat(timespec="seconds") if h.oldest_waiting else "-"
        rows.append(
            f"<tr data-destination='{_e(h.id)}'><td><code>{_e(h.id)}</code></td>"
            f"<td>{_e(h.kind or '-')}</td>"
            f"<td class='{cls}' data-field='state'>{_e(state)}</td>"
            f"<td class='n' data-field='waiting'>{h.waiting}</td>"
            f"<td class='n' data-field='delivered'>{h.delivered}</td>"
            f"<td class='n{' bad' if h.dead else ''}' data-field='dead'>{h.dead}</td>"
            f"<td>{_e(since)}</td></tr>"
        )
    return (
        "<h2>Hand-off</h2><table id='handoff'><tr><th>destination</th><th>kind</th>"
        "<th>state</th><th>waiting</th><th>delivered</th><th>dead</th>"
        "<th>oldest waiting since</th></tr>" + "".join(rows) + "</table>"
        "<p class='muted'>Claims received here, on their way to this controller's own"
        " systems. Dead hand-offs go again with <code>bridge inbox requeue</code>.</p>"
    )


def _certificates(view: StatusView) -> str:
    rows = []
    for cert in view.certificates:
        days = cert.days_left(view.now)
        # The verdict is /readyz's and `bridge status`'s; the page only words it.
        if check_certificate(cert, view.now, view.warning_days).ok:
            status, cls = "valid", "ok"
        elif cert.problem is not None:
            status, cls = cert.problem, "bad"
        elif not cert.valid_at(view.now) or days is None:
            status, cls = "not valid now", "bad"
        else:
            status, cls = f"expires in {days:.0f} days", "warn"
        after = cert.not_after.date().isoformat() if cert.not_after else "-"
        rows.append(
            f"<tr data-certificate='{_e(cert.name)}'><td>{_e(cert.name)}</td>"
            f"<td><code>{_e(cert.path.name)}</code></td><td>{_e(cert.subject)}</td>"
            f"<td>{_e(after)}</td><td class='n'>{'' if days is None else f'{days:.0f}'}</td>"
            f"<td class='{cls}'>{_e(status)}</td></tr>"
        )
    return (
        "<table id='certificates'><tr><th>certificate</th><th>file</th><th>subject</th>"
        "<th>not after</th><th>days left</th><th>status</th></tr>" + "".join(rows) + "</table>"
    )


def _when(view: StatusView, at: datetime | None) -> str:
    if at is None:
        return "-"
    seconds = max(0.0, (view.now - at).total_seconds())
    age = f"{seconds:.0f} s" if seconds < 120 else (
        f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")
    return f"{_e(at.isoformat(timespec='seconds'))} <span class='muted'>({age} ago)</span>"


def _sync(view: StatusView) -> str:
    if not view.sync_out and not view.sync_in:
        return ""
    parts = ["<h2>Circuit and sync</h2>"]
    if view.sync_out:
        rows = []
        for s in view.sync_out:
            circuit = s.circuit or "not running"
            cls = {"closed": "ok", "open": "bad", "probing": "warn"}.get(circuit, "muted")
            if s.confirmed is None:
                reconcile = "<td class='n' data-field='confirmed'>-</td><td>never reconciled</td>"
            else:
                found = (f"missing {s.missing_at_partner}, resent {s.resent}, receipts naming"
                         f" absent audit entries {s.mismatched}")
                bad = " bad" if s.missing_at_partner or s.mismatched else ""
                reconcile = (f"<td class='n' data-field='confirmed'>{s.confirmed}</td>"
                             f"<td class='{bad.strip()}' data-field='reconciled'>"
                             f"{_when(view, s.reconciled)}<br>{_e(found)}</td>")
            rows.append(
                f"<tr data-sync-link='{_e(s.link)}'><td><code>{_e(s.link)}</code></td>"
                f"<td>{_e(s.partner)}</td>"
                f"<td class='{cls}' data-field='circuit'>circuit {_e(circuit)}</td>"
                f"<td class='n' data-field='seq-enqueued'>{s.enqueued}</td>"
                f"<td class='n' data-field='seq-sent'>{s.sent}</td>"
                f"<td class='n' data-field='seq-acknowledged'>{s.acked}</td>"
                f"<td class='n' data-field='seq-contiguous'>{s.acked_contiguous}</td>"
                f"{reconcile}</tr>"
            )
        parts.append(
            "<table id='sync-outbound'><tr><th>link</th><th>partner</th><th>circuit</th>"
            "<th>enqueued up to seq</th><th>sent up to</th><th>acknowledged up to</th>"
            "<th>acknowledged without a gap up to</th><th>partner confirmed up to</th>"
            "<th>last reconcile</th></tr>" + "".join(rows) + "</table>"
        )
    if view.sync_in:
        rows = []
        for i in view.sync_in:
            rows.append(
                f"<tr data-stream='{_e(i.sender)}/{_e(i.stream)}'><td><code>{_e(i.link)}</code>"
                f"</td><td>{_e(i.sender)}</td><td><code>{_e(i.stream)}</code></td>"
                f"<td class='n'>{i.received}</td><td class='n'>{i.highest}</td>"
                f"<td class='n'>{i.contiguous}</td>"
                f"<td class='n{' bad' if i.missing else ''}' data-field='missing'>{i.missing}"
                "</td></tr>"
            )
        parts.append(
            "<table id='sync-inbound'><tr><th>link</th><th>sender</th><th>stream</th>"
            "<th>received</th><th>up to seq</th><th>without a gap up to</th><th>missing</th>"
            "</tr>" + "".join(rows) + "</table>"
        )
    parts.append("<p class='muted'>The same figures as <code>bridge sync status</code>;"
                 " <code>bridge sync reconcile</code> asks the partner again.</p>")
    return "".join(parts)


def _checkpoints(view: StatusView) -> str:
    cp = view.checkpoints
    if cp is None:
        return ""
    if cp.own_size is None:
        own = "<p id='own-checkpoint' class='muted'>No checkpoint of this audit log signed yet.</p>"
    else:
        behind = cp.audit_entries - cp.own_size
        own = (f"<p id='own-checkpoint'>Own newest checkpoint covers <b>{cp.own_size}</b>"
               f" of {cp.audit_entries} audit entries ({behind} not yet covered), signed"
               f" {_when(view, cp.own_issued)}.</p>")
    rows = []
    for p in cp.partners:
        witnessed = (f"size {p.witnessed_size}, cosigned {_when(view, p.witnessed_at)}"
                     if p.witnessed_size is not None else "none yet")
        ours = str(p.cosigned_ours_size) if p.cosigned_ours_size is not None else "none yet"
        if p.refused:
            refused = (f"<td class='bad' data-field='refused'>{p.refused} refused, last"
                       f" {_when(view, p.last_refused_at)}: {_e(p.last_refused_reason)}</td>")
        else:
            refused = "<td class='ok' data-field='refused'>none refused</td>"
        rows.append(
            f"<tr data-partner='{_e(p.partner)}'><td>{_e(p.partner)}</td>"
            f"<td data-field='witnessed'>{witnessed}</td>"
            f"<td class='n' data-field='cosigned-ours'>{_e(ours)}</td>{refused}</tr>"
        )
    return (
        f"<h2>Audit checkpoints</h2>{own}<table id='checkpoints'><tr><th>partner</th>"
        "<th>partner's newest checkpoint cosigned here</th>"
        "<th>our newest checkpoint the partner cosigned (size)</th>"
        "<th>partner checkpoints refused</th></tr>" + "".join(rows) + "</table>"
    )


def render_status(view: StatusView) -> str:
    """The whole page."""
    notice = f"<p class='notice' id='notice'>{_e(view.notice)}</p>" if view.notice else ""
    store = (
        f"<span class='ok'>store reachable</span>, audit chain {view.audit_entries} entries"
        if view.store_ok
        else "<span class='bad'>store not reachable</span>"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{view.refresh_seconds}; url=/'>"
        f"<meta name='operator-token' content='{_e(view.csrf_token)}'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{_e(view.controller)} — ws-fhir-bridge status</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{_e(view.controller)} <span class='muted'>{_e(view.name)}</span></h1>"
        f"<p class='muted'>ws-fhir-bridge {_e(view.version)} · "
        f"{_e(view.now.isoformat(timespec='seconds'))} · {store}</p>"
        f"{notice}<h2>Links</h2>{_links_table(view)}{_sync(view)}"
        f"<h2>Dead letters</h2>{_dead_letters(view)}{_handoffs(view)}"
        f"{_checkpoints(view)}<h2>Certificates</h2>{_certificates(view)}"
        "<p class='muted'>Also here: <a href='/readyz'>/readyz</a> ·"
        " <a href='/metrics'>/metrics</a> · <a href='/healthz'>/healthz</a></p>"
        "</body></html>"
    )


__all__ = ["DeadLetterView", "HandoffView", "LinkView", "StatusView", "depth_chart", "render_status"]
