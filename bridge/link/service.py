"""Run one controller: the mutual-TLS listener, the HTTP handlers, the dispatchers,
the hand-off workers of ``[[handoff]]`` destinations and, when ``[mllp]`` is
configured, the HL7 v2 listener."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from bridge.errors import listen_error
from bridge.link.dispatcher import Dispatcher
from bridge.link.handoff import HandoffService
from bridge.link.handshakes import HandshakeRecord
from bridge.link.httperrors import answering_malformed_requests
from bridge.link.intake import Router, site_reader
from bridge.link.mllp import HL7Handler, MLLPListener
from bridge.link.node import Controller, Submitted
from bridge.link.server import ReceiverApp
from bridge.link.tlsgate import TLSListener
from bridge.link.witness import AuditWitness
from bridge.logs import event
from bridge.trust.tls import server_context

log = logging.getLogger("bridge.service")


class BridgeService:
    """A running bridge. ``await start()``; ``await stop()`` drains and closes."""

    def __init__(self, controller: Controller, *, poll_interval: float = 1.0) -> None:
        self.controller = controller
        self.receiver = ReceiverApp(controller)
        self.dispatchers: dict[str, Dispatcher] = {
            link.id: Dispatcher(controller, link, poll_interval=poll_interval)
            for link in controller.config.links
            if link.direction == "outbound"
        }
        self._poll = poll_interval
        self._runner: web.AppRunner | None = None
        self._listener: TLSListener | None = None
        self.port: int | None = None
        self.mllp: MLLPListener | None = None
        self.mllp_port: int | None = None
        self.router: Router | None = None
        self.handoff = HandoffService(controller, poll_interval=min(poll_interval, 0.25))
        self.ops: Any = None  # bridge.ops.server.OpsServer when [operations] is configured
        self._destroyer: asyncio.Task[None] | None = None  # destruction after retention
        self.witness = AuditWitness(controller)  # checkpoints exchanged with partners

    async def start(self, *, serve: bool = True) -> None:
        c = self.controller
        # The site overlay is checked first, before anything listens: a broken file is
        # a configuration error naming the file and key.
        reader = site_reader(c.config) if serve and c.config.mllp is not None else None
        if serve:
            tls = c.config.tls
            ctx = server_context(tls.cert, tls.key, tls.ca, crl_file=tls.crl)
            self._runner = web.AppRunner(
                self.receiver.build(),
                access_log=None,
                # A connection must deliver each request head within this time of its
                # handshake or previous response; aiohttp's keep-alive timer counts
                # from there and is not reset by a partial head, so it also cuts off
                # clients that send headers slowly.
                keepalive_timeout=c.config.server.header_timeout_seconds,
                # Content-Encoding is refused (415), never decoded: no decompression
                # of a body the receiver is about to refuse.
                auto_decompress=False,
                # After a 413 or 408 the rest of an unread body is drained for at most
                # this long before the connection closes (aiohttp's default is 10 s, a
                # connection held per refused request).
                lingering_time=2.0,
            )
            await self._runner.setup()
            server = self._runner.server
            assert server is not None
            self._listener = TLSListener(
                answering_malformed_requests(server),
                ctx,
                on_refused=self._tls_refused,
                handshake_timeout=c.config.server.handshake_timeout_seconds,
            )
            host, port = c.config.server.host, c.config.server.port
            try:
                self.port = await self._listener.start(host, port)
            except OSError as exc:
                self._listener = None
                raise listen_error(exc, host, port, self._key("server.port")) from None
            log.info("%s listening on %s:%s (mutual TLS)", c.id, c.config.server.host, self.port)
            mllp = c.config.mllp
            if mllp is not None:
                assert reader is not None
                self.router = Router(c, reader, submit=self.submit, poll_interval=self._poll)
                self.mllp = MLLPListener(
                    c, mllp, handler=HL7Handler(
                        reader, biometric_key_file=c.config.intake.biometric_key_file),
                    ssl_context=ctx if mllp.tls else None,
                    on_refused=self._tls_refused, on_routable=self.router.wake,
                )
                try:
                    self.mllp_port = await self.mllp.start()
                except OSError as exc:
                    self.mllp = None
                    raise listen_error(exc, mllp.host, mllp.port, self._key("mllp.port")) from None
                await self.router.start()
            if c.config.operations is not None:
                from bridge.ops.server import OpsServer

                ops = OpsServer(self, c.config.operations)
                await ops.start(where=self._key("operations.port"))
                self.ops = ops
        await self._take_up_what_was_left()
        for dispatcher in self.dispatchers.values():
            await dispatcher.start()
        from bridge.link.sync import reconcile_periodically

        self._reconcilers = [
            asyncio.create_task(reconcile_periodically(d), name=f"reconcile:{d.link.id}")
            for d in self.dispatchers.values()
            if d.link.reconcile_interval_seconds > 0
        ]
        if any(link.agreement and link.direction in ("inbound", "pull-from")
               for link in c.config.links):
            from bridge.link.destruction import destroy_periodically

            self._destroyer = asyncio.create_task(destroy_periodically(c), name="destruction")
        await self.handoff.start()
        await self.witness.start()

    async def _take_up_what_was_left(self) -> None:
        """On a SQLite store, claims and hand-offs that stopped processes left ``sending``
        go again at once, not when their lease runs out (after ``kill -9``, a minute or
        more), when no other process is sending from the store as this one starts (see
        ``SQLiteStore.hold_dispatch``). While another is, their leases decide: what is
        ``sending`` may be that one's."""
        c = self.controller
        if getattr(c.store, "hold_dispatch", None) is None:
            return  # PostgreSQL: each store's thread finds processes that are gone
        from bridge.ledger.delivery import release_orphaned

        now = c.clock()
        moved = await c.hold_dispatch(lambda: release_orphaned(c.store, now=now))
        if moved is None:
            log.info("%s: another process sends from this store (or this one already"
                     " did): what is being sent is left to its lease", c.config.store.path)
        elif any(moved):
            log.info("%d claim(s) and %d hand-off(s) a stopped process was sending go again"
                     " now", *moved)

    def reload_certificates(self) -> None:
        """Load the TLS certificate, key, CA bundle and CRL, and the signing key, again
        from the configured files (after ``bridge certs rotate`` or ``revoke``): new
        connections, inbound (HTTPS and HL7) and outbound, get the new certificate, and
        every request is checked against the new CRL.
        A file that cannot be loaded leaves everything as it was, and is logged."""
        from bridge.errors import BridgeError
        from bridge.link.node import signers_of
        from bridge.link.tlsgate import probe_presented_certificates
        from bridge.trust.peercheck import PeerCertificateCheck

        c = self.controller
        tls = c.config.tls
        try:
            ctx = server_context(tls.cert, tls.key, tls.ca, crl_file=tls.crl)
            check = PeerCertificateCheck.from_crl_file(tls.crl)
            signer, signers = signers_of(c.config)
        except (BridgeError, OSError, ValueError) as exc:
            log.error("certificates not reloaded: %s", exc)
            return
        try:
            for dispatcher in self.dispatchers.values():
                dispatcher.reload_tls()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("outbound certificates not reloaded: %s", exc)
        probe_presented_certificates(ctx)
        if self._listener is not None:
            self._listener.ssl_context = ctx
        if self.mllp is not None:
            self.mllp.use_context(ctx)
        self.receiver.peer_check = check
        c.signer, c.signers = signer, signers
        log.info("%s reloaded its certificates, CRL and signing key", c.id)

    def _key(self, key: str) -> str:
        source = self.controller.config.source
        return f"{source}: {key}" if source else key

    async def _tls_refused(self, record: HandshakeRecord) -> None:
        """Write one audit row about failed handshakes (bounded per minute by the listener)."""
        c = self.controller
        if record.action == "tls.refused":
            event(
                "certificate_refusal",
                controller=c.id,
                peer=record.subject.removeprefix("peer:"),
                reason=record.detail,
            )
        await c.db.append_audit(
            c.audit(
                record.action,
                subject=record.subject,
                outcome="denied" if record.action == "tls.refused" else "failure",
                detail=record.detail,
                digest_value=record.digest,
            )
        )

    async def submit(
        self, record: dict[str, Any], link_id: str, *, replaces: str | None = None
    ) -> Submitted:
        dispatcher = self.dispatchers.get(link_id)
        if dispatcher is not None:
            await dispatcher.room()
        submitted = await self.controller.submit(record, link_id, replaces=replaces)
        if dispatcher is not None:
            dispatcher.wake(submitted.message_id, queued=submitted.created)
        return submitted

    async def stop(self) -> None:
        for dispatcher in self.dispatchers.values():
            dispatcher.closing = True  # what the router still submits waits for nothing
        await self.witness.stop()
        if self._destroyer is not None:
            self._destroyer.cancel()
            await asyncio.gather(self._destroyer, return_exceptions=True)
            self._destroyer = None
        for task in getattr(self, "_reconcilers", []):
            task.cancel()
        await asyncio.gather(*getattr(self, "_reconcilers", []), return_exceptions=True)
        await self.handoff.stop()
        if self.ops is not None:
            await self.ops.stop()
        if self.mllp is not None:
            await self.mllp.close()
        if self.router is not None:
            await self.router.stop()
        for dispatcher in self.dispatchers.values():
            await dispatcher.stop()
        if self._listener is not None:
            await self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.controller.close()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
