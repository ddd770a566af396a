"""Review finding on the consent API: a partner may submit consents naming itself, but
must not replace a consent it did not submit (the hospital's own, or another
recipient's) by reusing its id."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import Pair, client_ssl, consent_for, start_pair

from bridge.samples import inpatient_records
from bridge.trust.jws import Signer, sign_detached_bytes


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path)
    try:
        yield p
    finally:
        await p.stop()


async def _call(
    pair: Pair, method: str, path: str, body: bytes, *, who: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    url = f"https://127.0.0.1:{pair.hospital.port}/fhir/{path}"
    ctx = client_ssl(pair.root, who)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.request(
            method, url, data=body, headers={"Content-Type": "application/fhir+json", **headers}
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_partner_cannot_overwrite_a_consent_naming_someone_else(pair: Pair) -> None:
    record = inpatient_records(1, seed=43)[0]
    hospital = pair.hospital.controller
    # The hospital's own consent for another recipient.
    await hospital.put_consent(consent_for(record, consent_id="his-5", recipient="insurer-c"))
    original = (await hospital.db.get_consent("his-5")).resource

    takeover = consent_for(record, consent_id="his-5", recipient="insurer-b")
    body = orjson.dumps(takeover)
    pki = pair.root / "pki" / "insurer-b"
    signer = Signer.from_files(pki / "sign.key", pki / "sign.pem")
    for method, path in (("PUT", "Consent/his-5"), ("POST", "Consent")):
        signature = sign_detached_bytes(
            body,
            signer,
            issuer="insurer-b",
            audience="hospital-a",
            message_id="Consent/his-5",
            now=datetime.now(UTC),
        )
        status, outcome = await _call(
            pair, method, path, body, who="insurer-b", headers={"X-Signature": signature}
        )
        assert status == 403, (method, status, outcome)
        assert outcome["resourceType"] == "OperationOutcome"
    assert (await hospital.db.get_consent("his-5")).resource == original
