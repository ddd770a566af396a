"""The kit as a receiver, checking this bridge's dispatcher as a sender: what arrives
(identity, envelope, signature, labels) and how it retries (503, 409, 429 and a timeout
retried with the same content, a 422 never) — and that a dispatcher retrying a
definitive refusal is caught."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_support import LINK_OUT, consent_for
from peer_support import call

from bridge.config import load_config
from bridge.conformance import kit
from bridge.conformance.sender_role import ReceiverConfig
from bridge.demo import free_port, write_configs
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records
from bridge.trust.pki import init_dev_pki


async def _run_against_dispatcher(root: Path) -> dict[str, kit.Result]:
    init_dev_pki(root / "pki", ["hospital-a", "insurer-b"])
    port = free_port()
    hospital_cfg, _ = write_configs(root, free_port(), port)
    text = hospital_cfg.read_text(encoding="utf-8")
    # Short timeouts and backoff so that the script (503, 409, 429, a held answer, 200)
    # plays out in seconds.
    text = text.replace('purpose = "HPAYMT"\n', 'purpose = "HPAYMT"\nrequest_timeout_seconds = 1.0\n'
                        "retry_base_seconds = 0.2\nretry_cap_seconds = 0.5\n", 1)
    hospital_cfg.write_text(text, encoding="utf-8")
    pki = root / "pki"
    config = ReceiverConfig(
        cert=pki / "insurer-b" / "tls.pem", key=pki / "insurer-b" / "tls.key", ca=pki / "ca.pem",
        signing_key=pki / "insurer-b" / "sign.key", signing_cert=pki / "insurer-b" / "sign.pem",
        sender_signing_cert=pki / "hospital-a" / "sign.pem", port=port, stall=2.0, wait=40.0,
        quiet_period=3.0,
    )
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    listening = call(kit.run_sender, config, kit.select_cases(role="sender"),
                     ready=lambda _port: loop.call_soon_threadsafe(started.set))
    task = asyncio.ensure_future(listening)
    await asyncio.wait_for(started.wait(), 10)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        for record in inpatient_records(2, seed=5):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{id(record)}"))
            await hospital.submit(record, LINK_OUT)
        results = await task
    finally:
        await hospital.stop()
    return {r.case.id: r for r in results}


@pytest.mark.battery
async def test_this_dispatcher_passes_the_sender_cases(tmp_path: Path) -> None:
    results = await _run_against_dispatcher(tmp_path)
    assert set(results) == {c.id for c in kit.select_cases(role="sender")}
    assert {k: r.detail for k, r in results.items() if not r.passed} == {}
    measures = results["snd-retry-transient"].measures
    assert set(measures) == {"after_503_s", "after_409_s", "after_429_s", "after_stall_s"}
    assert measures["after_stall_s"] >= 0.9  # the sender waited for its timeout


@pytest.mark.battery
async def test_a_dispatcher_retrying_a_definitive_refusal_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import dispatcher

    original = dispatcher._is_transient

    def refusals_retried(exc: BaseException) -> bool:
        # A dispatcher that retries a partner's definitive refusal as if it were a blip.
        return isinstance(exc, dispatcher.PartnerRejected) or original(exc)

    monkeypatch.setattr(dispatcher, "_is_transient", refusals_retried)
    results = await _run_against_dispatcher(tmp_path)
    assert not results["snd-no-retry-definitive"].passed
    assert "arrived" in results["snd-no-retry-definitive"].detail
    assert results["snd-signature"].passed
