"""The insurer's ``bridge serve`` (a real process) against claim-system endpoints that
misbehave the way real HTTP servers do: a redirect instead of an answer, an answer far
larger than anyone needs.

A claim counts as taken only when the configured endpoint itself answers 2xx to the
POST that carried it. A redirect is not that: following it would turn the POST into a
bodiless GET (301/302/303) that some other resource answers 200, or carry the claim to
another origin (307/308). Either way the claim must stay queued and the hand-off fail
with a code naming the redirect.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import Serve, fast_hospital

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


class Misbehaving:
    """One aiohttp server playing several broken claim endpoints, recording every hit."""

    def __init__(self, *, huge_bytes: int = 0) -> None:
        self.port = free_port()
        self.other_port = free_port()
        self.huge_bytes = huge_bytes
        self.hits: list[tuple[str, str, int]] = []  # (origin, method path, body bytes)
        self._runners: list[web.AppRunner] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _record(self, request: web.Request, origin: str) -> int:
        body = await request.read()
        self.hits.append((origin, f"{request.method} {request.path}", len(body)))
        return len(body)

    async def found(self, request: web.Request) -> web.Response:
        await self._record(request, "claims")
        raise web.HTTPFound("/landing")

    async def temporary(self, request: web.Request) -> web.Response:
        await self._record(request, "claims")
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{self.other_port}/elsewhere")

    async def landing(self, request: web.Request) -> web.Response:
        await self._record(request, "claims")
        return web.Response(status=200, text="ok")

    async def elsewhere(self, request: web.Request) -> web.Response:
        await self._record(request, "other-origin")
        return web.Response(status=200, text="ok")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        await self._record(request, "claims")
        resp = web.StreamResponse(status=503)
        resp.content_length = self.huge_bytes
        await resp.prepare(request)
        chunk = b"x" * (1 << 20)
        sent = 0
        try:
            while sent < self.huge_bytes:
                await resp.write(chunk)
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass  # the bridge stopped reading, as it should
        return resp

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/found", self.found)
        app.router.add_post("/temporary", self.temporary)
        app.router.add_route("*", "/landing", self.landing)
        app.router.add_post("/huge", self.huge)
        other = web.Application(client_max_size=64 * 1024 * 1024)
        other.router.add_route("*", "/elsewhere", self.elsewhere)
        for application, port in ((app, self.port), (other, self.other_port)):
            runner = web.AppRunner(application, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


def add_http_destination(config: Path, dest_id: str, url: str, timeout: float = 5) -> None:
    with config.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[[handoff]]\nid = "{dest_id}"\nkind = "http"\nurl = "{url}"\n'
                 f"retry_base_seconds = 0.05\nretry_cap_seconds = 0.3\n"
                 f"timeout_seconds = {timeout}\n")


def bridge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def inbox_list(config: Path) -> list[dict[str, Any]]:
    run = bridge_cli("inbox", "list", "--config", str(config), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)  # type: ignore[no-any-return]


async def hand_offs_settle(config: Path, want: set[str], timeout: float = 40
                           ) -> dict[str, dict[str, Any]]:
    """Wait until every destination in ``want`` has failed or delivered the one claim."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        entries = await asyncio.to_thread(inbox_list, config)
        seen = {h["destination"]: h for e in entries for h in e["handoffs"]}
        if want <= seen.keys() and all(
            seen[d]["state"] == "delivered" or seen[d]["lastError"] for d in want
        ):
            return seen
        assert loop.time() < deadline, f"hand-offs did not settle: {entries}"
        await asyncio.sleep(0.3)


async def send_one_claim(hospital_cfg: Path) -> str:
    record = inpatient_records(1, seed=73)[0]
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        await hospital.controller.put_consent(consent_for(record, consent_id="c-redirect"))
        message_id = (await hospital.submit(record, LINK_OUT)).message_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (row := await hospital.controller.db.get_outbox(message_id)) is None \
                or row.state != "acked":
            assert loop.time() < deadline, "the insurer did not acknowledge the claim"
            await asyncio.sleep(0.1)
    finally:
        await hospital.stop()
    return message_id


async def test_a_redirect_is_a_failed_hand_off_not_a_delivery(tmp_path: Path) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    server = Misbehaving()
    await server.start()
    add_http_destination(insurer_cfg, "moved-302", server.url("/found"))
    add_http_destination(insurer_cfg, "moved-307", server.url("/temporary"))
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    try:
        await send_one_claim(hospital_cfg)
        seen = await hand_offs_settle(insurer_cfg, {"moved-302", "moved-307"})
        await asyncio.sleep(1.0)  # further retries, if any, reach the server meanwhile
    finally:
        insurer.stop()
        await server.stop()

    # The claim never reached another origin, and no bodiless GET stood in for the POST.
    assert [h for h in server.hits if h[0] == "other-origin"] == []
    assert [h for h in server.hits if h[1].startswith("GET")] == []
    for dest, code in (("moved-302", "http-302"), ("moved-307", "http-307")):
        assert seen[dest]["state"] != "delivered", seen
        assert seen[dest]["lastError"] == code, seen
    status = await asyncio.to_thread(bridge_cli, "status", "--config", str(insurer_cfg))
    assert "hand-off moved-302 (http): waiting 1, delivered 0" in status.stdout, status.stdout
    assert status.returncode == 1


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_huge_answer_does_not_grow_the_bridge(tmp_path: Path) -> None:
    """An endpoint that answers with hundreds of megabytes (a proxy's error page gone
    wrong, a log dump): the bridge keeps the first few kilobytes as the last answer and
    stops reading, so its memory does not follow the answer's size."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    server = Misbehaving(huge_bytes=400 << 20)
    await server.start()
    add_http_destination(insurer_cfg, "chatty", server.url("/huge"), timeout=30)
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    assert insurer.proc is not None
    try:
        message_id = await send_one_claim(hospital_cfg)
        before = _peak_rss_kib(insurer.proc.pid)
        seen = await hand_offs_settle(insurer_cfg, {"chatty"}, timeout=60)
        after = _peak_rss_kib(insurer.proc.pid)
        show = await asyncio.to_thread(bridge_cli, "inbox", "show", "--config",
                                       str(insurer_cfg), message_id, "--json")
    finally:
        insurer.stop()
        await server.stop()
    assert seen["chatty"]["lastError"] == "http-503"
    grown_mib = (after - before) / 1024
    assert grown_mib < 64, f"the bridge grew by {grown_mib:.0f} MiB reading a 400 MiB answer"
    answer = json.loads(show.stdout)["handoffs"][0]["lastAnswer"]
    assert answer.startswith("HTTP 503") and len(answer) <= 4096
