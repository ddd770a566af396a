"""The sender checks who it is talking to before a byte of a claim leaves.

A server holding a certificate from the same trusted CA, valid for the host name, but
issued to another controller (a consortium CA, a hijacked address) must receive
nothing; the link pauses and the hospital's audit trail says why.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from e2e_support import LINK_OUT, consent_for, make_workdir

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records
from bridge.trust.tls import server_context


async def test_claim_is_not_sent_to_a_server_that_is_not_the_partner(tmp_path: Path) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    port = load_config(insurer_cfg).server.port
    pki = tmp_path / "pki"

    # An impostor on the insurer's address with clinic-x's (otherwise valid) certificate.
    seen: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.Response(status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = server_context(pki / "clinic-x" / "tls.pem", pki / "clinic-x" / "tls.key", pki / "ca.pem")
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx)
    await site.start()

    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        record_ = inpatient_records(1, seed=71)[0]
        await hospital.controller.put_consent(consent_for(record_))
        sub = await hospital.submit(record_, LINK_OUT)
        dispatcher = hospital.dispatchers[LINK_OUT]
        for _ in range(100):
            if dispatcher.paused_reason is not None:
                break
            await asyncio.sleep(0.05)
        assert dispatcher.paused_reason is not None
        assert seen == []  # not a single request reached the impostor
        row = await hospital.controller.db.get_outbox(sub.message_id)
        assert row.state in ("queued", "sending") and row.receipt is None
        paused = [
            e.record
            for e in await hospital.controller.db.audit_entries()
            if e.record.action == "link.paused"
        ]
        assert paused and paused[0].detail == "tls-certificate-fault@TLS.server-certificate"
    finally:
        await hospital.stop()
        await runner.cleanup()
