"""Text a client or a partner chooses never becomes a location, an audit subject or a log
line of this bridge's (PROTOCOL P-ERR-2, P-ERR-4).

Member names, path segments, resource ids and a partner's refusal are text the other
side wrote. A request that names a patient in them (``"张三 330108…": 1`` as a member
name, ``PUT Consent/zhangsan 330108…``) is refused as before, and the refusal names the
place (``body#*``, ``Consent``), never the text. The insurer's real listener is spoken to
over mutual TLS with the hospital's certificate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import Pair, client_ssl, start_pair

from bridge.errors import ValidationError
from bridge.link.pull_client import _refusal_text
from bridge.policy.profile import load_link_profile
from bridge.records.fhir import validate_resource
from bridge.trust.checkpoint import CheckpointError, verify_checkpoint

ID_NUMBER = "330108197706081354"
NAMED = f"张三 {ID_NUMBER}"


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    started = await start_pair(tmp_path, start_dispatch=False)
    try:
        yield started
    finally:
        await started.stop()


async def _send(pair: Pair, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    ctx = client_ssl(pair.root, "hospital-a")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.request(method, f"{pair.insurer_url}/{path}", data=body,
                        headers={"Content-Type": "application/fhir+json"}) as resp,
    ):
        return resp.status, await resp.read()


def _audit(pair: Pair) -> list[str]:
    return [orjson.dumps(e.record.to_json_dict()).decode()
            for e in pair.insurer.controller.store.audit_entries()]


def _deep(depth: int, key: str) -> bytes:
    text = b"1"
    for _ in range(depth):
        text = b'{"' + key.encode() + b'":' + text + b"}"
    return text


@pytest.mark.parametrize("body", [
    # A member named twice, named after a patient.
    f'{{"resourceType":"Bundle","{NAMED}":1,"{NAMED}":2}}'.encode(),
    # An integer beyond 2^53 under such a member.
    f'{{"resourceType":"Bundle","{NAMED}":{2**60}}}'.encode(),
    # Nested beyond the limit under long keys of such names.
    _deep(70, NAMED * 20),
], ids=["duplicate", "integer", "nesting"])
async def test_member_names_of_a_message_are_not_repeated(
    pair: Pair, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    before = len(_audit(pair))
    caplog.set_level("DEBUG")
    status, answer = await _send(pair, "POST", "$process-message", body)
    assert status == 400
    outcome = orjson.loads(answer)
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "parse-error"
    assert ID_NUMBER not in answer.decode()
    written = _audit(pair)[before:]
    assert written and all(ID_NUMBER not in text for text in written)
    # However deep the body, what the refusal records stays short.
    assert all(len(text) < 2000 for text in written), [len(t) for t in written]
    assert ID_NUMBER not in caplog.text


async def test_a_consent_id_that_is_no_fhir_id_is_not_the_audit_subject(pair: Pair) -> None:
    before = len(_audit(pair))
    for method, path, body in (
        ("PUT", f"Consent/zhangsan%20{ID_NUMBER}", {"resourceType": "Consent", "id": "other"}),
        ("POST", "Consent", {"resourceType": "Consent", "id": NAMED}),
    ):
        status, answer = await _send(pair, method, path, orjson.dumps(body))
        assert 400 <= status < 500, (status, answer)
        assert ID_NUMBER not in answer.decode()
    written = _audit(pair)[before:]
    assert len(written) == 2 and all(ID_NUMBER not in text for text in written), written


def test_fhir_validation_names_an_unknown_member_by_its_place() -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:x", NAMED: "1"}]}
    with pytest.raises(ValidationError) as info:
        validate_resource(patient)
    assert info.value.location == "Patient.identifier[0].*"
    # A name in element-name form that spells a number is a value too.
    patient["identifier"] = [{"system": "urn:x", f"id{ID_NUMBER}": "1"}]
    with pytest.raises(ValidationError) as info:
        validate_resource(patient)
    assert info.value.location == "Patient.identifier[0].*"
    # A member written as an element name is named (it is a FHIR name, misspelt).
    patient["identifier"] = [{"system": "urn:x", "vaule": "1"}]
    with pytest.raises(ValidationError) as info:
        validate_resource(patient)
    assert info.value.location == "Patient.identifier[0].vaule"


def test_a_profile_names_what_it_leaves_out_by_place_and_selector() -> None:
    profile = load_link_profile("commercial-insurance")
    # Asked twice: a selector named once is named the same again, a value never.
    for _ in range(2):
        outside = profile.check({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p", NAMED: 1, "identifier": [
                {"system": f"urn:oid:{ID_NUMBER}", "value": "x"},
                {"system": "urn:oid:2.16.156.10011.1.13", "value": "y"}]}}]})
        assert "Patient.*" in outside
        assert "Patient.identifier[system=*]" in outside
        assert "Patient.identifier[system=urn:oid:2.16.156.10011.1.13]" in outside
        assert all(ID_NUMBER not in path for path in outside), outside


def test_a_partners_refusal_is_shown_by_its_protocol_code_and_place() -> None:
    def outcome(code: str, where: str) -> bytes:
        return orjson.dumps({"resourceType": "OperationOutcome", "issue": [{
            "severity": "error", "code": "invalid", "expression": [where],
            "details": {"coding": [{"code": code}]}}]})

    assert _refusal_text(400, outcome("search-invalid", "_count")) == (
        "the partner refused (search-invalid at _count)")
    shown = _refusal_text(400, outcome(NAMED + "X" * 5000, f"dx F20.0 {ID_NUMBER}"))
    assert shown == "the partner refused (unlisted-code at -)"
    shown = _refusal_text(400, outcome("parse-error", f"body#zhangsan-{ID_NUMBER}"))
    assert shown == "the partner refused (parse-error at -)"


def test_a_checkpoint_of_another_origin_is_named_by_its_line() -> None:
    note = (f"ws-fhir-bridge/audit/zhangsan-{ID_NUMBER}\n5\n" + "A" * 43 + "=\n"
            "time 2026-12-01T00:00:00.000000+00:00\n\n— hospital-a AAAAAAAA\n")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(note, "hospital-a", [])
    assert ID_NUMBER not in str(info.value)
    assert info.value.location == "checkpoint line 1"
