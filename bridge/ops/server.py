"""The operations port of one running bridge (plain HTTP on loopback).

======================  ==================================================================
``GET /healthz``        200 while the process answers
``GET /readyz``         200 when the store answers, every configured certificate is valid
                        and not within ``certificate_warning_days`` of expiry, and every
                        partner with a ``base_url`` answers ``GET [base]/metadata`` over
                        mutual TLS with its own certificate; else 503. JSON either way,
                        one entry per check.
``GET /metrics``        Prometheus text format (:mod:`bridge.ops.metrics`)
``GET /``               the status page (:mod:`bridge.ops.page`)
``POST /requeue``       put one dead or rejected claim back in the queue (URL-encoded fields
                        ``message_id`` and ``token``); loopback peers only, audited
======================  ==================================================================

With ``auth = "loopback"`` (plain HTTP) every route answers only a request whose ``Host``
names this port by a loopback name, the listen address or one of ``host_names``; any
other gets 403. A web page from elsewhere that the operator's browser shows can reach the
port through a DNS name of its own that resolves to 127.0.0.1 (DNS rebinding), but the
browser then sends that name, so the page can neither read the status page and metrics
nor post. With ``auth = "certificate"`` the browser checks the port's TLS certificate
against the name it asked for, which does the same. The requeue form also carries a
token made when the port opens.

What a request sends is never repeated back or logged: a request the HTTP parser cannot
read gets ``400`` with a fixed text (:class:`PlainRefusals`), a requeue body that is not
the page's form gets ``400`` naming the form, and the status page shows a notice only
from the bridge's own set (:data:`NOTICES`), chosen by its name in the query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import secrets
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.config import OperationsConfig
from bridge.errors import BridgeError, listen_error
from bridge.link.httperrors import MalformedRequests, answering_malformed_requests
from bridge.logs import event
from bridge.ops.certs import CertificateInfo, configured_certificates
from bridge.ops.certs import check as check_certificate
from bridge.ops.history import DepthHistory
from bridge.ops.linkstate import checkpoint_view, circuit_state, sync_views
from bridge.ops.metrics import BridgeMetrics
from bridge.ops.page import DeadLetterView, HandoffView, LinkView, StatusView, render_status

log = logging.getLogger("bridge.ops")

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
#: How long a page or a scrape waits for the store before saying it does not answer.
_STORE_WAIT_SECONDS = 5.0


def accepted_hosts(config: OperationsConfig, port: int) -> frozenset[str]:
    """Every ``Host`` header value (lower case) that names the port listening on ``port``:
    a loopback name or the listen address (unless a wildcard) with this port, or without
    one when it is HTTP's default; each of ``host_names`` as given, and one given without
    a port also with this port (a reverse proxy may pass on its own public name)."""
    names = set(_LOOPBACK_NAMES)
    listen = config.host.lower()
    if listen not in ("0.0.0.0", "::", ""):
        names.add(f"[{listen}]" if ":" in listen else listen)
    accepted = {f"{name}:{port}" for name in names}
    if port == 80:
        accepted |= names
    for name in config.host_names:
        accepted.add(name)
        if name.endswith("]") or ":" not in name:
            accepted.add(f"{name}:{port}")
    return frozenset(accepted)


def host_allowed(header: str | None, accepted: frozenset[str]) -> bool:
    """Whether a ``Host`` header is one of ``accepted`` (:func:`accepted_hosts`)."""
    return bool(header) and str(header).strip().lower() in accepted


class PlainRefusals(MalformedRequests):
    """The operations port's answer to a request its HTTP parser cannot read (or that
    fails in the HTTP layer): the bridge's own sentence as plain text, no byte of the
    request (see :mod:`bridge.link.httperrors`)."""

    __slots__ = ()
    port_name = "the operations port"
    port_log = log

    def refusal(self, status: int, error: BridgeError) -> web.Response:
        return web.Response(status=status, text=f"{error.message}\n")



def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class OpsServer:
    """Serve the operations endpoints of ``service`` (a :class:`BridgeService`)."""

    def __init__(self, service: Any, config: OperationsConfig) -> None:
        self.service = service
        self.controller = service.controller
        self.config = config
        self.metrics = BridgeMetrics(
            self.controller.config, self.controller.store, service=service,
            clock=self.controller.clock,
        )
        self.history = DepthHistory()
        self.token = secrets.token_urlsafe(24)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._tls: Any = None  # the TLS listener with auth = "certificate"
        self._listener: asyncio.Server | None = None  # the plain HTTP one otherwise
        self._accepted_hosts: frozenset[str] = frozenset()  # set once the port is known

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        scheme = "https" if self.config.auth == "certificate" else "http"
        return f"{scheme}://{host}:{self.port}"

    # --- lifecycle ----------------------------------------------------------------------

    def build(self) -> web.Application:
        middlewares = []
        if self.config.auth == "certificate":
            from bridge.ops.access import OperatorGate

            middlewares.append(OperatorGate(self.controller, self.config).middleware())
        else:
            middlewares.append(self._host_gate)
        middlewares.append(_unreadable_body)
        app = web.Application(client_max_size=64 * 1024, middlewares=middlewares)
        app.on_response_prepare.append(_protect)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/", self.status_page)
        app.router.add_post("/requeue", self.requeue)
        return app

    async def start(self, *, where: str = "operations.port") -> None:
        if self.config.auth == "certificate":
            await self._start_tls(where)
            return
        self._runner = web.AppRunner(self.build(), access_log=None)
        await self._runner.setup()
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        try:
            self._listener = await loop.create_server(
                answering_malformed_requests(self._runner.server, PlainRefusals),
                self.config.host, self.config.port, reuse_address=True,
            )
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise listen_error(exc, self.config.host, self.config.port, where) from None
        self.port = int(self._listener.sockets[0].getsockname()[1])
        self._accepted_hosts = accepted_hosts(self.config, self.port)
        self._sampler = asyncio.create_task(self._sample_forever(), name="ops:sampler")
        log.info("operations port on %s", self.url)

    async def _start_tls(self, where: str) -> None:
        """HTTPS for operator certificates (bridge.ops.access), through the same TLS
        listener as the partner port, so failed handshakes are audited alike."""
        from bridge.link.tlsgate import TLSListener
        from bridge.ops.access import operator_context

        ctx = operator_context(self.controller.config, self.config)
        self._runner = web.AppRunner(self.build(), access_log=None,
                                     keepalive_timeout=self.config.idle_timeout_seconds)
        await self._runner.setup()
        assert self._runner.server is not None
        self._tls = TLSListener(answering_malformed_requests(self._runner.server, PlainRefusals),
                                ctx, on_refused=self.service._tls_refused)
        try:
            self.port = await self._tls.start(self.config.host, self.config.port)
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise listen_error(exc, self.config.host, self.config.port, where) from None
        self._sampler = asyncio.create_task(self._sample_forever(), name="ops:sampler")
        log.info("operations port on %s (operator certificates)", self.url)

    async def stop(self) -> None:
        if self._tls is not None:
            await self._tls.close()
            self._tls = None
        if self._sampler is not None:
            self._sampler.cancel()
            try:
                await self._sampler
            except asyncio.CancelledError:
                pass
            self._sampler = None
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        self.metrics.close()

    # --- queue depth history ----------------------------------------------------------------

    def _depths(self) -> dict[str, int]:
        store = self.controller.store
        depths: dict[str, int] = {}
        for link in self.controller.config.links:
            if link.direction == "outbound":
                counts = store.outbox_counts(link.id)
                depths[link.id] = counts.get("queued", 0) + counts.get("sending", 0)
        return depths

    async def sample(self) -> None:
        """Record the current queue depth of every outbound link."""
        try:
            depths = await self.controller.db.call(self._depths)
        except BridgeError as exc:
            log.warning("queue depth sample failed: %s", exc.code)
            return
        self.history.add(time.monotonic(), depths)

    async def _sample_forever(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.config.sample_seconds)

    # --- endpoints ----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "up", "controller": self.controller.id})

    async def metrics_page(self, request: web.Request) -> web.Response:
        try:
            body = await asyncio.wait_for(self.controller.db.call(self.metrics.render),
                                          timeout=_STORE_WAIT_SECONDS)
        except TimeoutError:
            # The figures are read from the store; a store that does not answer makes
            # the scrape fail at once (the target shows as down), not hang.
            return web.Response(status=503, text="the store did not answer within"
                                f" {_STORE_WAIT_SECONDS:.0f} s; the figures are read from it\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = [await self._check_store(), *self._check_certificates()]
        checks.extend(await asyncio.gather(*self._check_partners()))
        ready = all(c["ok"] for c in checks)
        return web.Response(
            status=200 if ready else 503,
            body=orjson.dumps({"ready": ready, "checks": checks}, option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    async def _check_store(self) -> dict[str, Any]:
        try:
            seq, _hash = await asyncio.wait_for(
                self.controller.db.call(self.controller.store.audit_head),
                timeout=_STORE_WAIT_SECONDS,
            )
        except (BridgeError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, BridgeError) else "timeout"
            return {"check": "store", "ok": False, "detail": f"store not reachable: {code}"}
        return {"check": "store", "ok": True, "detail": f"audit chain at entry {seq}"}

    def _check_certificates(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        results = []
        for cert in configured_certificates(self.controller.config):
            results.append(self._certificate_check(cert, now))
        return results

    def _certificate_check(self, cert: CertificateInfo, now: datetime) -> dict[str, Any]:
        verdict = check_certificate(cert, now, self.config.certificate_warning_days)
        result: dict[str, Any] = {"check": f"certificate:{cert.name}", "ok": verdict.ok,
                                  "detail": verdict.detail}
        if verdict.days_left is not None:
            result["days_left"] = round(verdict.days_left, 1)
        return result

    def _check_partners(self) -> list[Any]:
        return [
            self._check_partner(p.id, p.base_url, frozenset(p.tls_fingerprints))
            for p in self.controller.config.partners
            if p.base_url
        ]

    async def _check_partner(
        self, partner_id: str, base_url: str, fingerprints: frozenset[str]
    ) -> dict[str, Any]:
        from bridge.link.dispatcher import classify_exception
        from bridge.link.partner_http import RECEIPT_LIMIT, partner_session, read_answer

        name = f"partner:{partner_id}"
        try:
            session = partner_session(self.controller.config, partner_id,
                                      timeout=self.config.partner_timeout_seconds)
        except (BridgeError, OSError) as exc:
            return {"check": name, "ok": False, "detail": f"cannot build TLS context: {exc}"}
        url = base_url.rstrip("/") + "/metadata"
        try:
            async with session, session.get(url, allow_redirects=False) as resp:
                await read_answer(resp, RECEIPT_LIMIT)
                status = resp.status
        except Exception as exc:  # noqa: BLE001 - every failure is a not-ready answer
            err = classify_exception(exc)
            return {"check": name, "ok": False, "detail": f"{err.code}: {err.message}"}
        if status != 200:
            return {"check": name, "ok": False, "detail": f"metadata answered {status}"}
        return {"check": name, "ok": True, "detail": "answers over mutual TLS"}

    # --- the status page --------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """Everything the page shows from the store (runs on the ledger thread)."""
        store = self.controller.store
        out: dict[str, Any] = {"links": {}, "dead": [], "received": {}, "store_ok": True}
        try:
            for link in self.controller.config.links:
                if link.direction == "outbound":
                    out["links"][link.id] = (
                        store.outbox_counts(link.id),
                        store.highest_contiguous_acked(link.id),
                    )
                    for state in ("dead", "rejected"):
                        out["dead"].extend(store.list_outbox(link.id, state=state, limit=100))
                else:
                    out["received"][link.id] = store.inbox_count(link.partner)
            out["audit"] = store.audit_head()[0]
            out["handoff"] = self._handoff_snapshot()
            out["sync"] = sync_views(self.controller.config, store)
            out["checkpoints"] = checkpoint_view(self.controller.config, store)
        except BridgeError as exc:
            log.warning("status page could not read the store: %s", exc.code)
            out["store_ok"] = False
            out["audit"] = 0
        return out

    def _handoff_snapshot(self) -> list[HandoffView]:
        """Each destination configured, and any no longer configured that still holds
        claims (runs on the ledger thread)."""
        from bridge.ledger.handoff import destination_status, destinations_held

        store = self.controller.store
        kinds: dict[str, str | None] = {d.id: d.kind for d in self.controller.config.handoff}
        for held in destinations_held(store):
            kinds.setdefault(held, None)
        views = []
        for dest_id, kind in kinds.items():
            s = destination_status(store, dest_id, dead_limit=0)
            views.append(HandoffView(
                id=dest_id, kind=kind, waiting=s.counts["queued"] + s.counts["sending"],
                delivered=s.counts["delivered"], dead=s.counts["dead"],
                failing=s.failing.last_error if s.failing is not None else None,
                oldest_waiting=s.oldest_waiting.created if s.oldest_waiting else None,
            ))
        return views

    async def status_page(self, request: web.Request) -> web.Response:
        try:
            snap = await asyncio.wait_for(self.controller.db.call(self._snapshot),
                                          timeout=_STORE_WAIT_SECONDS)
        except TimeoutError:
            log.warning("status page: the store did not answer within %.0f s",
                        _STORE_WAIT_SECONDS)
            snap = {"links": {}, "dead": [], "received": {}, "store_ok": False, "audit": 0}
        now = datetime.now(UTC)
        links: list[LinkView] = []
        dispatchers = getattr(self.service, "dispatchers", {})
        for link in self.controller.config.links:
            if link.direction == "outbound":
                counts, settled = snap["links"].get(link.id, ({}, 0))
                paused = getattr(dispatchers.get(link.id), "paused_reason", None)
                links.append(
                    LinkView(
                        id=link.id,
                        partner=link.partner,
                        direction="outbound",
                        state=f"paused: {paused}" if paused else "running",
                        counts=counts,
                        settled_seq=settled,
                        series=self.history.series(link.id),
                    )
                )
            else:
                links.append(
                    LinkView(
                        id=link.id,
                        partner=link.partner,
                        direction="inbound",
                        state="receiving",
                        received=snap["received"].get(link.id, 0),
                    )
                )
        dead = [
            DeadLetterView(
                link=r.link,
                seq=r.seq,
                message_id=r.message_id,
                state=str(r.state),
                error=r.last_error,
                updated=r.updated,
            )
            for r in sorted(snap["dead"], key=lambda r: (r.link, r.seq))
        ]
        sync_out, sync_in = snap.get("sync", ([], []))
        sync_out = [
            dataclasses.replace(s, circuit=circuit_state(self.service, s.link)) for s in sync_out
        ]
        view = StatusView(
            controller=self.controller.id,
            name=self.controller.config.controller.name,
            version=_version(),
            now=now,
            clock_now=time.monotonic(),
            window=self.history.window,
            store_ok=snap["store_ok"],
            audit_entries=snap["audit"],
            links=links,
            dead_letters=dead,
            certificates=configured_certificates(self.controller.config),
            warning_days=self.config.certificate_warning_days,
            csrf_token=self.token,
            notice=NOTICES.get(request.query.get("notice", "")),
            handoffs=snap.get("handoff", []),
            sync_out=sync_out,
            sync_in=sync_in,
            checkpoints=snap.get("checkpoints"),
        )
        return web.Response(text=render_status(view), content_type="text/html", charset="utf-8")

    @web.middleware
    async def _host_gate(self, request: web.Request,
                         handler: Any) -> web.StreamResponse:
        """Plain HTTP: answer only a ``Host`` that names this port (see the module
        docstring); the refusal says which key lets another name in."""
        if not host_allowed(request.headers.get("Host"), self._accepted_hosts):
            return web.Response(status=403, text="this port answers only to its own address"
                                " and loopback names (operations.host_names adds others)\n")
        response: web.StreamResponse = await handler(request)
        return response

    # --- requeue ------------------------------------------------------------------------------

    def _local_request(self, request: web.Request) -> bool:
        if self.config.auth == "certificate":
            # The operator certificate and its role were checked (bridge.ops.access).
            return True
        if not _is_loopback(request.remote):
            return False
        # The Host was checked by _host_gate; a requeue takes a loopback name only.
        return host_allowed(request.headers.get("Host"),
                            frozenset(f"{name}:{self.port}" for name in _LOOPBACK_NAMES))

    async def requeue(self, request: web.Request) -> web.StreamResponse:
        if not self._local_request(request):
            return web.Response(status=403, text="requeue is for a local operator only\n")
        form = await _requeue_form(request)
        if form is None:
            return web.Response(status=400, text="the requeue form is not read: its fields "
                                "token and message_id are URL-encoded UTF-8 text, each once\n")
        token, message_id = form
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return web.Response(status=403, text="stale or missing form token; reload the page\n")
        c = self.controller
        row = await c.db.get_outbox(message_id) if message_id else None
        if row is None:
            raise web.HTTPSeeOther("/?notice=unknown-message")
        try:
            await c.db.requeue(
                message_id,
                now=c.clock(),
                audit=c.audit(
                    "claim.requeue",
                    subject=message_id,
                    partner=row.partner,
                    detail=f"operator status page from {request.remote}",
                ),
            )
        except BridgeError as exc:
            log.warning("requeue refused by the store: %s", exc.code)
            raise web.HTTPSeeOther(f"/?notice={_REFUSAL_NOTICES.get(exc.code, 'store-refused')}"
                                   ) from None
        event(
            "requeue",
            controller=c.id,
            link=row.link,
            partner=row.partner,
            message_id=message_id,
            seq=row.seq,
            source="operator",
            operator=request.remote,
        )
        dispatcher = getattr(self.service, "dispatchers", {}).get(row.link)
        if dispatcher is not None:
            dispatcher.wake(message_id)
        raise web.HTTPSeeOther("/?notice=requeued")


# The page is never shown inside another site's frame (where a disguised page could
# make the operator press "requeue"), loads nothing but itself (styles and charts are
# inline), posts only to this port, and is not kept in caches.
_PAGE_POLICY = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:;"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


async def _protect(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in _PAGE_POLICY.items():
        response.headers.setdefault(name, value)


#: The notices the status page shows, by the name a requeue's redirect gives in
#: ``?notice=``. Only these texts appear: a name not here shows no notice, so a link
#: from elsewhere cannot put words of its own on the operator's page.
NOTICES: dict[str, str] = {
    "requeued": "Claim requeued; the dispatcher sends it again now.",
    "unknown-message": "Requeue refused: unknown-message (no claim in the outbox has this"
                       " message id).",
    "not-requeueable": "Requeue refused: not-requeueable (the claim is no longer dead or"
                       " rejected; the page shows its state now).",
    "store-refused": "Requeue refused: the store did not take the change (the log names"
                     " why).",
}

#: The notice for a requeue the store refused, by the refusal's code.
_REFUSAL_NOTICES = {
    "outbox-unknown-message": "unknown-message",
    "outbox-illegal-transition": "not-requeueable",
}

_FORM_TYPES = ("", "application/x-www-form-urlencoded")
_FORM_FIELDS = ("token", "message_id")


async def _requeue_form(request: web.Request) -> tuple[str, str] | None:
    """The ``token`` and ``message_id`` of a requeue form, or None when the body is not
    the status page's form: URL-encoded UTF-8 text with each of the two fields once."""
    if request.content_type not in _FORM_TYPES:
        return None
    if (request.charset or "utf-8").lower() not in ("utf-8", "utf8"):
        return None
    # Bytes the HTTP parser cannot read (broken chunks, compressed bytes that do not
    # expand) raise here and are answered by _unreadable_body.
    body = await request.read()
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                       errors="strict", max_num_fields=len(_FORM_FIELDS) + 4)
    except ValueError:  # not UTF-8, an escape that is not, or too many fields
        return None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    values = [fields.get(name, []) for name in _FORM_FIELDS]
    if any(len(v) != 1 for v in values):
        return None
    return values[0][0], values[1][0]


@web.middleware
async def _unreadable_body(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request whose body aiohttp's parser fails on while a handler reads it (a chunk
    size that is not a number, compressed bytes that do not expand, a multipart part
    whose head breaks off) gets ``400`` with a fixed text, the exception's message (which
    quotes the bytes) neither answered nor logged. Only the parser's own errors are
    answered so: any other failure stays a failure (500, logged)."""
    try:
        response: web.StreamResponse = await handler(request)
    except (HttpProcessingError, RequestPayloadError) as exc:
        log.info("unreadable request body from %s refused (%s)", request.remote,
                 type(exc).__name__)
        refused = web.Response(status=400, text="the request body could not be read\n")
        refused.force_close()
        return refused
    return response


def _version() -> str:
    from bridge.cli_common import version_text

    return version_text().removeprefix("ws-fhir-bridge ")


__all__ = ["OpsServer"]
