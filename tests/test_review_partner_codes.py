"""What a partner's refusal may put in the sender's own records: a protocol code, never
text of the partner's choosing.

The "insurer" is an HTTPS server holding the insurer's real certificate that refuses
every claim with 422 and an OperationOutcome of its own making. The hospital's real
dispatcher delivers over real sockets. The partner's code is kept as it is when it is
one of the protocol's (PROTOCOL §7); any other text (here a patient's name, a resident
ID number and a diagnosis, 5,000 characters long) becomes ``unlisted-code`` in the
outbox, the audit chain and the log. The answer itself is kept whole as the outbox's
evidence, as before.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
import re
import ssl
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from e2e_support import LINK_OUT, consent_for, make_workdir
from test_e2e_delivery import fast_retries

import bridge
from bridge.config import load_config
from bridge.demo import INSURER
from bridge.errors import BridgeError
from bridge.link.dispatcher import protocol_codes
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records

ID_NUMBER = "330108197706081354"
HOSTILE = f"Patient 张三 {ID_NUMBER} dx F20.0 " + "X" * 5000


async def _refusing_insurer(root: Path, port: int, code: str) -> web.AppRunner:
    async def process(request: web.Request) -> web.Response:
        await request.read()
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "invalid",
            "details": {"coding": [{"system": "urn:ws-fhir-bridge:error", "code": code}],
                        "text": "refused"}}]}
        return web.Response(status=422, body=orjson.dumps(outcome),
                            content_type="application/fhir+json")

    app = web.Application()
    app.router.add_post("/fhir/$process-message", process)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(root / "pki" / INSURER / "tls.pem", root / "pki" / INSURER / "tls.key")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return runner


@pytest.mark.parametrize(("answered", "kept"), [
    (HOSTILE, "unlisted-code"),
    (ID_NUMBER, "unlisted-code"),
    ("fhir-invalid", "fhir-invalid"),
    # Codes of the protocol answered outside §7's table (§9.4, §8a).
    ("agreement-refused", "agreement-refused"),
    ("sync-invalid", "sync-invalid"),
])
async def test_a_partner_code_is_kept_only_when_it_is_the_protocols(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, answered: str, kept: str
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_retries(hospital_cfg)
    runner = await _refusing_insurer(tmp_path, load_config(insurer_cfg).server.port, answered)
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    caplog.set_level(logging.DEBUG)
    await hospital.start()
    try:
        record = inpatient_records(1, seed=83)[0]
        await hospital.controller.put_consent(consent_for(record))
        mid = (await hospital.submit(record, LINK_OUT)).message_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        row = await hospital.controller.db.get_outbox(mid)
        while loop.time() < deadline and (row is None or row.state != "rejected"):
            await asyncio.sleep(0.05)
            row = await hospital.controller.db.get_outbox(mid)
        assert row is not None and row.state == "rejected"
        assert row.last_error == kept
        entries = [e.record for e in hospital.controller.store.audit_entries()
                   if e.record.action == "claim.rejected"]
        assert [e.detail for e in entries] == [kept]
    finally:
        await hospital.stop()
        await runner.cleanup()
    if kept == "unlisted-code":
        assert ID_NUMBER not in caplog.text
        assert ID_NUMBER not in (row.last_error or "")


def test_every_code_the_protocol_names_is_kept() -> None:
    """A code PROTOCOL.md names, and that one of the bridge's errors answers with, is one
    a sender keeps: none is lost to ``unlisted-code`` because its error class lives in a
    module the list was not made from."""
    for module in pkgutil.walk_packages(bridge.__path__, "bridge."):
        if module.name != "bridge.__main__":  # the command line, run on import
            importlib.import_module(module.name)
    defined: dict[str, str] = {}
    stack: list[type[BridgeError]] = [BridgeError]
    while stack:
        cls = stack.pop()
        defined[cls.code] = cls.__module__
        stack.extend(cls.__subclasses__())
    text = (Path(__file__).resolve().parents[1] / "conformance" / "PROTOCOL.md").read_text(
        encoding="utf-8")
    named = set(re.findall(r"`(?:\d{3} )?([a-z]+(?:-[a-z]+)+)`", text)) & set(defined)
    assert {"agreement-refused", "sync-invalid", "rate-limited", "fhir-invalid"} <= named
    assert named - protocol_codes() == set()
