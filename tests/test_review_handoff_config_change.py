"""A hand-off destination renamed or removed between two runs of ``bridge serve``.

Claims already queued for the old destination are handed to no one: no worker serves a
destination the configuration no longer names. That is the operator's decision to
make, so it must be visible: ``bridge status`` names the destination as no longer
configured, with how many claims wait for it, and exits 1; ``/metrics`` counts them;
``bridge inbox list --destination OLD`` lists them; and ``bridge inbox requeue
--missing --destination NEW`` gives them to the new destination.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from e2e_support import LINK_OUT, consent_for, make_workdir
from handoff_support import ClaimEndpoint, Serve, fast_hospital, wait_for

from bridge.config import load_config
from bridge.demo import free_port
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


def bridge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def destination(dest_id: str, url: str) -> str:
    return (f'\n[[handoff]]\nid = "{dest_id}"\nkind = "http"\nurl = "{url}"\n'
            "retry_base_seconds = 0.05\nretry_cap_seconds = 0.3\ntimeout_seconds = 2\n")


@pytest.mark.battery  # two runs of bridge serve, one after the other
async def test_claims_left_for_a_destination_no_longer_configured_are_reported(
    tmp_path: Path,
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    base = insurer_cfg.read_text(encoding="utf-8") + "\n[operations]\nport = 0\n"
    # First run: the old destination does not answer, so the claims wait for it.
    insurer_cfg.write_text(base + destination("claims-old", f"http://127.0.0.1:{free_port()}/"),
                           encoding="utf-8")
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    ids = []
    try:
        for i, record in enumerate(inpatient_records(3, seed=91)):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)

        async def all_acked() -> bool:
            rows = [await hospital.controller.db.get_outbox(m) for m in ids]
            return all(r is not None and r.state == "acked" for r in rows)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await all_acked():
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
    finally:
        await hospital.stop()
        insurer.stop()

    # Second run: the destination was renamed.
    endpoint = ClaimEndpoint(free_port())
    await endpoint.start()
    insurer_cfg.write_text(base + destination("claims-new", endpoint.url), encoding="utf-8")
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    await insurer.start()
    try:
        status = await asyncio.to_thread(bridge_cli, "status", "--config", str(insurer_cfg))
        assert status.returncode == 1, status.stdout
        assert "hand-off claims-old (no longer configured): waiting 3" in status.stdout, \
            status.stdout
        as_json = json.loads((await asyncio.to_thread(
            bridge_cli, "status", "--config", str(insurer_cfg), "--json")).stdout)
        old = next(d for d in as_json["handoff"] if d["id"] == "claims-old")
        assert old["configured"] is False and old["waiting"] == 3 and old["needs_operator"]

        ops = next(w.removeprefix("operations=") for w in insurer.ready
                   if w.startswith("operations="))
        async with aiohttp.ClientSession() as session, \
                session.get(f"{ops}/metrics") as resp:
            metrics = await resp.text()
        assert 'bridge_handoff_pending{destination="claims-old"} 3.0' in metrics

        listed = await asyncio.to_thread(bridge_cli, "inbox", "list", "--config",
                                         str(insurer_cfg), "--destination", "claims-old",
                                         "--json")
        assert listed.returncode == 0, listed.stderr
        assert {e["messageId"] for e in json.loads(listed.stdout)} == set(ids)

        moved = await asyncio.to_thread(bridge_cli, "inbox", "requeue", "--config",
                                        str(insurer_cfg), "--missing", "--destination",
                                        "claims-new")
        assert moved.returncode == 0, moved.stderr
        await wait_for(lambda: endpoint.got.ids == set(ids), 30,
                       "the claims at the renamed destination")
    finally:
        insurer.stop()
        await endpoint.stop()
