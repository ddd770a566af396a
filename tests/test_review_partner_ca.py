"""Each partner is bound to the CA that issues its certificates.

The hospital trusts two CAs: its own (which issued the platform's certificate) and the
insurer's (the insurer runs its own CA). The insurer's CA issues a certificate naming
the platform; presented to the hospital's real listener, it must not pass for the
platform. A configuration that trusts several CAs without binding every partner to
one is refused at start, naming the key.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from pull_support import HOSPITAL, INSURER, PLATFORM, write_site

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.trust.pki import init_dev_pki


def _two_cas(root: Path) -> Path:
    """The insurer's own CA, which also (wrongly) issues a certificate naming the
    platform; the hospital's bundle trusts both CAs."""
    init_dev_pki(root / "pki-insurer", [INSURER, PLATFORM],
                 now=datetime.now(UTC) - timedelta(days=1))
    bundle = root / "pki" / "bundle.pem"
    bundle.write_bytes((root / "pki" / "ca.pem").read_bytes()
                       + (root / "pki-insurer" / "ca.pem").read_bytes())
    return bundle


def _configure(cfg: Path, *, bind: bool) -> None:
    text = cfg.read_text(encoding="utf-8").replace('ca = "pki/ca.pem"', 'ca = "pki/bundle.pem"', 1)
    if bind:
        text = text.replace(f'id = "{PLATFORM}"\n', f'id = "{PLATFORM}"\ntls_ca = "pki/ca.pem"\n', 1)
        text = text.replace(f'id = "{INSURER}"\n',
                            f'id = "{INSURER}"\ntls_ca = "pki-insurer/ca.pem"\n', 1)
    cfg.write_text(text, encoding="utf-8")


async def _search(port: int, root: Path, cert_dir: Path) -> tuple[int, dict[str, object]]:
    ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.pem"))
    ctx.load_cert_chain(cert_dir / "tls.pem", cert_dir / "tls.key")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(f"https://127.0.0.1:{port}/fhir/Patient",
                    params={"identifier": "urn:oid:2.16.156.10011.1.3|110101199001010011"}) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def test_a_certificate_from_another_partners_ca_is_not_that_partner(tmp_path: Path) -> None:
    cfg, _platform_cfg, port = write_site(tmp_path)
    _two_cas(tmp_path)
    _configure(cfg, bind=True)
    service = BridgeService(Controller(load_config(cfg)), poll_interval=0.05)
    await service.start()
    try:
        # The insurer's CA vouching for the platform: nobody.
        status, outcome = await _search(port, tmp_path, tmp_path / "pki-insurer" / PLATFORM)
        assert status == 401, outcome
        issue = outcome["issue"][0]  # type: ignore[index]
        assert issue["details"]["coding"][0]["code"] == "unknown-partner"
        assert issue["expression"] == ["tls.peer_certificate.issuer"]
        # The platform's own certificate, from the CA bound to it, still works.
        status, outcome = await _search(port, tmp_path, tmp_path / "pki" / PLATFORM)
        assert status == 200, outcome
        refused = [e.record for e in service.controller.store.audit_entries()
                   if e.record.action == "message.reject"]
        assert [r.detail for r in refused] == ["unknown-partner@tls.peer_certificate.issuer"]
    finally:
        await service.stop()


def test_several_trusted_cas_need_every_partner_bound(tmp_path: Path) -> None:
    cfg, _platform_cfg, _port = write_site(tmp_path)
    _two_cas(tmp_path)
    _configure(cfg, bind=False)
    with pytest.raises(ConfigError) as caught:
        Controller(load_config(cfg))
    assert caught.value.location == f"partners.{PLATFORM}.tls_ca"


async def test_a_sender_accepts_the_partners_server_only_from_the_partners_ca(
    tmp_path: Path,
) -> None:
    from e2e_support import LINK_OUT, consent_for, make_workdir

    from bridge.samples import inpatient_records

    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    # The hospital binds the insurer to a CA that did not issue the insurer's server
    # certificate (the insurer's real certificate comes from the shared CA, which the
    # hospital's bundle still trusts).
    init_dev_pki(tmp_path / "pki-other", [INSURER], now=datetime.now(UTC) - timedelta(days=1))
    text = hospital_cfg.read_text(encoding="utf-8")
    hospital_cfg.write_text(text.replace(
        f'id = "{INSURER}"\n', f'id = "{INSURER}"\ntls_ca = "pki-other/ca.pem"\n', 1),
        encoding="utf-8")
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    try:
        record = inpatient_records(1, seed=84)[0]
        await hospital.controller.put_consent(consent_for(record))
        mid = (await hospital.submit(record, LINK_OUT)).message_id
        dispatcher = hospital.dispatchers[LINK_OUT]
        for _ in range(100):
            if dispatcher.stats.certificate_faults:
                break
            await asyncio.sleep(0.05)
        assert dispatcher.stats.certificate_faults >= 1
        assert (await hospital.controller.db.get_outbox(mid)).state != "acked"
        assert await insurer.controller.db.inbox_lookup(HOSPITAL, mid) is None
    finally:
        await hospital.stop()
        await insurer.stop()
