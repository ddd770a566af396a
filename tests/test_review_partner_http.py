"""What this bridge does with a partner's answers: no redirect is followed, and no
answer is read past a size limit.

The "insurer" here is a hostile HTTPS server holding the insurer's real certificate:
it answers a claim with a redirect to another server (which must never see the
claim), or with an endless body (which must not be read to its end). Deliveries go
through the hospital's real dispatcher over real sockets.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from e2e_support import LINK_OUT, consent_for, make_workdir
from test_e2e_delivery import fast_retries

from bridge.config import load_config
from bridge.demo import INSURER, free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records

CHUNK = 64 * 1024
ENDLESS = 256 * 1024 * 1024


@dataclass
class Hostile:
    mode: str = "redirect"
    trap_hits: int = 0
    claims: int = 0
    sent: list[int] = field(default_factory=list)


def _server_ssl(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(root / "pki" / INSURER / "tls.pem", root / "pki" / INSURER / "tls.key")
    return ctx


async def _serve(app: web.Application, port: int, ctx: ssl.SSLContext) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return runner


@pytest.fixture(params=["redirect", "endless"])
async def hostile(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Hostile, Path, Path]]:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    port = load_config(insurer_cfg).server.port
    trap_port = free_port()
    state = Hostile(mode=str(request.param))

    async def trap(request: web.Request) -> web.Response:
        state.trap_hits += 1
        await request.read()
        return web.Response(status=200, text="{}")

    async def process(request: web.Request) -> web.StreamResponse:
        state.claims += 1
        await request.read()
        raise web.HTTPTemporaryRedirect(f"https://127.0.0.1:{trap_port}/fhir/$process-message")

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Plain streams, so a write after the client hung up fails instead of vanishing.
        state.claims += 1
        written = 0
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                         b"Connection: close\r\n\r\n")
            while written < ENDLESS:
                writer.write(b" " * CHUNK)
                await writer.drain()
                written += CHUNK
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    app = web.Application()
    app.router.add_post("/fhir/$process-message", process)
    trap_app = web.Application()
    trap_app.router.add_post("/fhir/$process-message", trap)
    ctx = _server_ssl(tmp_path)
    runners = [await _serve(trap_app, trap_port, ctx)]
    if state.mode == "redirect":
        runners.append(await _serve(app, port, ctx))
        servers = []
    else:
        # The endless server sits behind a plain TCP relay that counts what actually
        # reaches the hospital's socket (the TLS server's own count would include
        # writes into a connection already gone).
        hidden = free_port()
        servers = [await asyncio.start_server(endless, "127.0.0.1", hidden, ssl=ctx),
                   await asyncio.start_server(_relay(hidden, state), "127.0.0.1", port)]
    try:
        yield state, hospital_cfg, tmp_path
    finally:
        for runner in runners:
            await runner.cleanup()
        for server in servers:
            server.close()
            await server.wait_closed()


def _relay(target: int, state: Hostile) -> Any:
    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        relayed = 0

        async def up() -> None:
            while data := await client_r.read(CHUNK):
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            nonlocal relayed
            while data := await server_r.read(CHUNK):
                client_w.write(data)
                await client_w.drain()
                relayed += len(data)

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            # The client hanging up (or aborting) ends the exchange.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            state.sent.append(relayed)
            for writer in (client_w, server_w):
                writer.close()

    return relay


async def _deliver_one(
    hospital_cfg: Path, seed: int, state: Hostile
) -> tuple[Any, BridgeService]:
    fast_retries(hospital_cfg)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    record = inpatient_records(1, seed=seed)[0]
    await hospital.controller.put_consent(consent_for(record))
    mid = (await hospital.submit(record, LINK_OUT)).message_id
    # The partner is asked at least twice (the claim is retried, never settled by a
    # hostile answer); then the row says why its last attempt failed.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    row = await hospital.controller.db.get_outbox(mid)
    while loop.time() < deadline:
        row = await hospital.controller.db.get_outbox(mid)
        if state.claims >= 2 and row is not None and row.last_error:
            break
        await asyncio.sleep(0.05)
    return row, hospital


async def test_a_partner_answer_is_never_followed_nor_read_past_its_limit(
    hostile: tuple[Hostile, Path, Path],
) -> None:
    state, hospital_cfg, _root = hostile
    row, hospital = await _deliver_one(hospital_cfg, seed=81, state=state)
    try:
        # Each attempt reached the partner and failed, naming why; nothing counts as
        # delivered.
        assert row.state in ("queued", "sending") and row.last_error == "partner-answer-refused"
        assert state.claims >= 2
        # Nothing went where a redirect pointed.
        assert state.trap_hits == 0
        if state.mode == "endless":
            for _ in range(100):  # the server notices the closed connection
                if len(state.sent) >= state.claims:
                    break
                await asyncio.sleep(0.05)
            # Each endless answer was cut off after about the 1 MiB limit (plus what
            # the sockets buffer), not read to its 256 MiB.
            assert len(state.sent) == state.claims
            assert max(state.sent) < 16 * 1024 * 1024, state.sent
    finally:
        await hospital.stop()


def test_the_readiness_check_follows_no_redirect(tmp_path: Path) -> None:
    """``/readyz`` of a hospital whose insurer answers ``metadata`` with a redirect: not
    ready, naming the redirect, and the place it points to is never asked."""
    import json
    import threading

    from ops_support import http, make_site, serve

    site = make_site(tmp_path)
    hits: list[str] = []
    trap_port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runners: list[web.AppRunner] = []

    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://127.0.0.1:{trap_port}/fhir/metadata")

    async def trap(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"resourceType": "CapabilityStatement"})

    async def up() -> None:
        ctx = _server_ssl(tmp_path)
        app, trap_app = web.Application(), web.Application()
        app.router.add_get("/fhir/metadata", moved)
        trap_app.router.add_get("/fhir/metadata", trap)
        runners.append(await _serve(app, site.ports["insurer"], ctx))
        runners.append(await _serve(trap_app, trap_port, ctx))
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(up(), loop).result(timeout=30)
    hospital = serve(site.hospital)
    try:
        status, body = http(site.ops("hospital") + "/readyz")
        report = json.loads(body)
        assert status == 503 and report["ready"] is False
        check = next(c for c in report["checks"] if c["check"] == "partner:insurer-b")
        assert not check["ok"] and "partner-answer-refused" in check["detail"], check
        assert "redirect" in check["detail"]
        assert hits == []
    finally:
        hospital.stop()
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
