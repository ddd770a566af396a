"""End to end: a hospital bridge pushes claims to an insurer bridge over real mutual TLS.

Everything here goes through sockets, TLS handshakes, SQLite files and signatures;
the attacks are made from outside, the way a misconfigured or hostile client would.
"""

from __future__ import annotations

import asyncio
import copy
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import LINK_OUT, Pair, client_ssl, consent_for, start_pair

from bridge.cli import main as cli_main
from bridge.errors import ConsentDenied
from bridge.ledger.sqlite import SQLiteStore
from bridge.messages import collection_of
from bridge.samples import inpatient_records
from bridge.trust.jws import verify_bundle
from bridge.trust.pki import (
    certificate_pem,
    init_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
    private_key_pem,
)

FINAL = {"acked", "rejected", "refused", "dead"}


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path)
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(40, seed=11)


async def wait_final(pair: Pair, message_id: str, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await pair.hospital.controller.db.get_outbox(message_id)
        if row is not None and row.state in FINAL:
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"message not delivered in time; last state {row and row.state}")
        await asyncio.sleep(0.05)


def audit_actions(store_path: Path) -> list[tuple[str, str, str | None]]:
    with SQLiteStore(store_path) as store:
        return [(e.record.action, e.record.outcome, e.record.detail) for e in store.audit_entries()]


def inbox_count(store_path: Path) -> int:
    con = sqlite3.connect(store_path)
    try:
        return int(con.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])
    finally:
        con.close()


async def wait_audit(pair: Pair, action: str, timeout: float = 5.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        entries = [
            e for e in await pair.insurer.controller.db.audit_entries() if e.record.action == action
        ]
        if entries or asyncio.get_running_loop().time() > deadline:
            return entries
        await asyncio.sleep(0.05)


def store_of(pair: Pair, who: str) -> Path:
    svc = pair.hospital if who == "hospital" else pair.insurer
    return Path(svc.controller.config.store.path)


def rewrite_queued(pair: Pair, message_id: str, change: Any, *, created: str | None = None) -> None:
    """Change a queued message in the hospital's store, as someone with the file could:
    ``change`` edits its collection in place; ``created`` backdates the row."""
    con = sqlite3.connect(store_of(pair, "hospital"))
    try:
        (raw,) = con.execute("SELECT payload FROM outbox_payload WHERE message_id=?",
                             (message_id,)).fetchone()
        payload = orjson.loads(raw)
        change(collection_of(payload))
        con.execute("UPDATE outbox_payload SET payload=? WHERE message_id=?",
                    (orjson.dumps(payload), message_id))
        if created is not None:
            con.execute("UPDATE outbox SET created=? WHERE message_id=?", (created, message_id))
        con.commit()
    finally:
        con.close()


# --- the happy path ----------------------------------------------------------------------


@pytest.mark.control("U14", "T2", "T15")
async def test_consented_claim_arrives_minimised_signed_and_receipted(
    pair: Pair, records: list
) -> None:
    record = records[0]
    await pair.hospital.controller.put_consent(consent_for(record))
    sub = await pair.hospital.submit(record, LINK_OUT)
    row = await wait_final(pair, sub.message_id)
    assert row.state == "acked"
    # The hospital's audit names the consent and the rule that permitted the disclosure.
    enqueued = [d for a, _, d in audit_actions(store_of(pair, "hospital")) if a == "claim.enqueue"]
    assert enqueued and enqueued[0].startswith("permit c-1@Consent.provision")

    insurer = pair.insurer.controller
    stored = await insurer.db.inbox_lookup("hospital-a", sub.message_id)
    assert stored is not None
    payload = orjson.loads(stored.payload)
    # The signature the insurer holds verifies against the hospital's key, years later too.
    claims = verify_bundle(
        payload,
        insurer.keyring,
        expected_issuer="hospital-a",
        expected_audience="insurer-b",
        now=datetime.now(UTC) + timedelta(days=400),
        check_time=False,
    )
    assert claims.message_id == sub.message_id
    # Nothing outside the commercial-insurance profile is on the wire.
    profile = insurer.profiles["claims-from-hospital-a"]
    assert profile.minimize(collection_of(payload)).removed == []
    types = {e["resource"]["resourceType"] for e in payload["entry"]}
    assert {"MessageHeader", "Patient", "Claim", "Encounter"} <= types
    patient = next(
        e["resource"] for e in payload["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    for address in patient.get("address", []):
        assert "line" not in address  # street and house number stay at the hospital
    # The hospital holds the insurer's signed receipt naming the insurer's audit entry.
    receipt = orjson.loads(row.receipt)
    assert receipt["signature"]["who"]["identifier"]["value"] == "insurer-b"
    assert receipt == orjson.loads(stored.receipt)


@pytest.mark.control("U1", "U4")
async def test_claim_without_consent_is_refused_and_audited_by_sender(
    pair: Pair, records: list
) -> None:
    with pytest.raises(ConsentDenied):
        await pair.hospital.submit(records[1], LINK_OUT)
    actions = audit_actions(store_of(pair, "hospital"))
    refusals = [(o, d) for a, o, d in actions if a == "claim.refused"]
    assert refusals == [("denied", "consent-denied -@Consent")]
    assert sum((await pair.hospital.controller.db.outbox_counts()).values()) == 0
    assert inbox_count(store_of(pair, "insurer")) == 0


@pytest.mark.control("U3")
async def test_consent_for_another_recipient_does_not_permit(pair: Pair, records: list) -> None:
    await pair.hospital.controller.put_consent(consent_for(records[2], recipient="clinic-x"))
    with pytest.raises(ConsentDenied):
        await pair.hospital.submit(records[2], LINK_OUT)


async def test_resend_yields_original_receipt_and_one_inbox_row(pair: Pair, records: list) -> None:
    record = records[3]
    await pair.hospital.controller.put_consent(consent_for(record))
    sub = await pair.hospital.submit(record, LINK_OUT)
    first = await wait_final(pair, sub.message_id)
    assert first.state == "acked"

    again = await pair.hospital.submit(record, LINK_OUT)  # the HIS sends the same record twice
    assert again.message_id == sub.message_id and not again.created

    receipt = await pair.hospital.dispatchers[LINK_OUT].resend(sub.message_id)
    assert receipt == first.receipt  # byte for byte the receipt of the first delivery
    row = await pair.hospital.controller.db.get_outbox(sub.message_id)
    assert row.state == "acked" and row.receipt == first.receipt
    assert inbox_count(store_of(pair, "insurer")) == 1
    assert await wait_audit(pair, "message.duplicate")


@pytest.mark.control("U1", "U4")
async def test_revoked_consent_stops_a_queued_claim(tmp_path: Path, records: list) -> None:
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        record = records[4]
        await hospital.put_consent(consent_for(record, consent_id="c-revoke"))
        sub = await hospital.submit(record, LINK_OUT)  # queued; nothing is dispatching yet
        await hospital.put_consent(consent_for(record, consent_id="c-revoke", status="inactive"))
        await pair.hospital.start()
        row = await wait_final(pair, sub.message_id)
        assert row.state == "refused"
        assert inbox_count(store_of(pair, "insurer")) == 0
        assert any(
            a == "claim.refused" and d and d.startswith("dispatch:")
            for a, _, d in audit_actions(store_of(pair, "hospital"))
        )
    finally:
        await pair.stop()


async def test_the_dispatcher_forgets_each_claim_at_its_final_state(
    tmp_path: Path, records: list
) -> None:
    """Acknowledged, rejected by the partner, or refused at dispatch: a long-running
    bridge keeps nothing per claim once the claim is settled."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        fine, tampered, revoked = records[30], records[31], records[32]
        for i, record in enumerate((fine, tampered, revoked)):
            await hospital.put_consent(consent_for(record, consent_id=f"c-end-{i}"))
        subs = [await pair.hospital.submit(r, LINK_OUT) for r in (fine, tampered, revoked)]
        dispatcher = pair.hospital.dispatchers[LINK_OUT]
        assert {s.message_id for s in subs} <= set(dispatcher._enqueued_at)

        def overcharge(collection: dict[str, Any]) -> None:
            claim = next(e["resource"] for e in collection["entry"]
                         if e["resource"]["resourceType"] == "Claim")
            claim["total"]["value"] += 10000  # no longer what was signed

        rewrite_queued(pair, subs[1].message_id, overcharge)
        await hospital.put_consent(consent_for(revoked, consent_id="c-end-2", status="inactive"))
        await pair.hospital.start()
        states = [(await wait_final(pair, s.message_id)).state for s in subs]
        assert states == ["acked", "rejected", "refused"]
        assert not {s.message_id for s in subs} & set(dispatcher._enqueued_at)
    finally:
        await pair.stop()


async def test_a_queued_claim_changed_in_the_store_is_asked_about_as_it_is(
    tmp_path: Path, records: list
) -> None:
    """The outbox row is what leaves (signed again once it has waited): a row whose
    payload was changed in the store, keeping the signature value it was queued with,
    here to name a patient nobody has a consent for, is refused at dispatch."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        record = records[6]
        await hospital.put_consent(consent_for(record, consent_id="c-stored"))
        sub = await hospital.submit(record, LINK_OUT)  # queued; nothing is dispatching yet

        def someone_else(collection: dict[str, Any]) -> None:
            for entry in collection["entry"]:
                resource = entry["resource"]
                if resource.get("resourceType") == "Patient":
                    for ident in resource.get("identifier") or []:
                        ident["value"] = f"{ident['value']}-someone-else"

        waited = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        rewrite_queued(pair, sub.message_id, someone_else, created=waited)
        await pair.hospital.start()
        row = await wait_final(pair, sub.message_id)
        assert inbox_count(store_of(pair, "insurer")) == 0
        assert row.state == "refused"
        assert any(
            a == "claim.refused" and d and d.startswith("dispatch:")
            for a, _, d in audit_actions(store_of(pair, "hospital"))
        )
    finally:
        await pair.stop()


async def test_consent_revoked_by_another_process_stops_a_queued_claim(
    tmp_path: Path, records: list
) -> None:
    """The dispatcher takes in consent changes with the rows it claims: a revocation
    written through another process sharing the store stops the claim."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        record = records[5]
        await hospital.put_consent(consent_for(record, consent_id="c-elsewhere"))
        sub = await hospital.submit(record, LINK_OUT)  # queued; nothing is dispatching yet
        other = type(hospital)(hospital.config)  # e.g. the CLI, on the same store
        try:
            await other.put_consent(
                consent_for(record, consent_id="c-elsewhere", status="inactive"))
        finally:
            await other.close()
        await pair.hospital.start()
        row = await wait_final(pair, sub.message_id)
        assert row.state == "refused"
        assert inbox_count(store_of(pair, "insurer")) == 0
    finally:
        await pair.stop()


# --- attacks from outside --------------------------------------------------------------------


async def _post(
    pair: Pair,
    body: bytes,
    *,
    who: str | None = "hospital-a",
    content_type: str = "application/fhir+json",
    ca: Path | None = None,
    cert: tuple[Path, Path] | None = None,
) -> tuple[int, dict[str, Any]]:
    ctx = client_ssl(pair.root, who if cert is None else None, ca=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.post(
            f"{pair.insurer_url}/$process-message",
            data=body,
            headers={"Content-Type": content_type},
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


@pytest.mark.control("T15")
async def test_tampered_payload_is_rejected_and_audited(pair: Pair, records: list) -> None:
    record = records[5]
    await pair.hospital.controller.put_consent(consent_for(record))
    signed, _ = pair.hospital.controller.prepare(record, LINK_OUT)
    tampered = copy.deepcopy(signed)
    claim = next(
        e["resource"] for e in tampered["entry"] if e["resource"]["resourceType"] == "Claim"
    )
    claim["total"]["value"] = claim["total"]["value"] + 10000
    status, outcome = await _post(pair, orjson.dumps(tampered))
    assert status == 403
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "signature-invalid"
    assert inbox_count(store_of(pair, "insurer")) == 0
    rejects = await wait_audit(pair, "message.reject")
    assert rejects and rejects[0].record.outcome == "denied"


async def test_replayed_old_message_is_rejected(pair: Pair, records: list) -> None:
    record = records[6]
    hospital = pair.hospital.controller
    await hospital.put_consent(consent_for(record))
    real_clock = hospital.clock
    hospital.clock = lambda: real_clock() - timedelta(minutes=30)
    try:
        signed, _ = hospital.prepare(record, LINK_OUT)
    finally:
        hospital.clock = real_clock
    status, outcome = await _post(pair, orjson.dumps(signed))
    assert status == 403
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "replay-rejected"
    assert inbox_count(store_of(pair, "insurer")) == 0


async def test_malformed_json_and_wrong_media_type(pair: Pair) -> None:
    status, outcome = await _post(pair, b'{"resourceType": "Bundle", ')
    assert status == 400 and outcome["issue"][0]["expression"][0].startswith("body[")
    status, outcome = await _post(pair, b"{}", content_type="text/plain")
    assert status == 415
    status, outcome = await _post(
        pair, orjson.dumps({"resourceType": "Bundle", "type": "collection"})
    )
    assert status == 400 and outcome["issue"][0]["expression"] == ["Bundle.type"]
    assert inbox_count(store_of(pair, "insurer")) == 0


@pytest.mark.control("T18", "T3")
async def test_certificate_of_unregistered_partner_gets_401(pair: Pair) -> None:
    body = orjson.dumps({"resourceType": "Bundle", "type": "message"})
    status, outcome = await _post(pair, body, who="clinic-x")
    assert status == 401
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "unknown-partner"
    assert await wait_audit(pair, "message.reject")


async def _expect_handshake_refused(pair: Pair, **kwargs: Any) -> None:
    with pytest.raises((aiohttp.ClientError, ConnectionError, OSError)):
        await _post(pair, b"{}", **kwargs)
    refusals = await wait_audit(pair, "tls.refused")
    assert refusals, "a refused handshake must leave an audit record"
    assert refusals[-1].record.outcome == "denied"
    assert inbox_count(store_of(pair, "insurer")) == 0


@pytest.mark.control("U14", "T11")
async def test_client_without_certificate_cannot_connect(pair: Pair) -> None:
    await _expect_handshake_refused(pair, who=None)


async def test_certificate_from_another_ca_is_refused(pair: Pair, tmp_path: Path) -> None:
    other = init_dev_pki(tmp_path / "other-pki", ["hospital-a"])
    files = other.controllers["hospital-a"]
    await _expect_handshake_refused(pair, cert=(files.tls_cert, files.tls_key))


async def test_expired_certificate_is_refused(pair: Pair, tmp_path: Path) -> None:
    pki = pair.root / "pki"
    ca_cert, ca_key = load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key")
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        "hospital-a",
        purpose="tls",
        now=datetime.now(UTC) - timedelta(days=400),
        days=30,
        partner_id="hospital-a",
    )
    cert_file, key_file = tmp_path / "expired.pem", tmp_path / "expired.key"
    cert_file.write_bytes(certificate_pem(cert))
    key_file.write_bytes(private_key_pem(key))
    await _expect_handshake_refused(pair, cert=(cert_file, key_file))


# --- audit -------------------------------------------------------------------------------------


@pytest.mark.control("T10")
async def test_both_audit_chains_verify_and_any_edit_is_detected(
    tmp_path: Path, records: list, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = await start_pair(tmp_path)
    try:
        for i, record in enumerate(records[7:10]):
            await pair.hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            sub = await pair.hospital.submit(record, LINK_OUT)
            assert (await wait_final(pair, sub.message_id)).state == "acked"
    finally:
        await pair.stop()

    for who, cfg in (("hospital", pair.hospital_cfg), ("insurer", pair.insurer_cfg)):
        store = store_of(pair, who)
        assert cli_main(["audit", "verify", "--config", str(cfg)]) == 0
        assert "verified" in capsys.readouterr().out
        con = sqlite3.connect(store)
        count = con.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        assert count >= 3
        victim = count // 2 + 1
        # An operator with write access to the file removes the guard and edits history.
        con.execute("DROP TRIGGER IF EXISTS audit_no_update")
        con.execute("UPDATE audit SET outcome='failure' WHERE seq=?", (victim,))
        con.commit()
        con.close()
        assert cli_main(["audit", "verify", "--store", str(store)]) == 1
        out = capsys.readouterr().out
        assert f"BROKEN at entry {victim}" in out


async def test_revocation_through_another_process_stops_queued_claims(
    tmp_path: Path, records: list
) -> None:
    """Two bridge processes share one store (the CLI, a second worker): a consent
    revoked through one is honoured by the other at dispatch, without a restart."""
    from bridge.config import load_config
    from bridge.link.node import Controller

    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        record = records[12]
        await hospital.put_consent(consent_for(record, consent_id="c-shared"))
        sub = await hospital.submit(record, LINK_OUT)

        other = Controller(load_config(pair.hospital_cfg))
        try:
            assert other.consents.get("c-shared") is not None  # loaded from the store
            await other.put_consent(consent_for(record, consent_id="c-shared", status="inactive"))
        finally:
            await other.close()

        await pair.hospital.start()
        row = await wait_final(pair, sub.message_id)
        assert row.state == "refused"
        assert inbox_count(store_of(pair, "insurer")) == 0
    finally:
        await pair.stop()


@pytest.mark.control("T13")
async def test_signed_but_invalid_fhir_gets_422_naming_the_element(
    pair: Pair, records: list
) -> None:
    """A correctly signed message whose content is not valid FHIR R4 is refused, and
    the OperationOutcome names the element, not its value."""
    from bridge.trust.jws import sign_bundle

    hospital = pair.hospital.controller
    record = records[13]
    await hospital.put_consent(consent_for(record))
    signed, _ = hospital.prepare(record, LINK_OUT)
    message = copy.deepcopy(signed)
    message.pop("signature")
    index = next(
        i for i, e in enumerate(message["entry"]) if e["resource"]["resourceType"] == "Patient"
    )
    message["entry"][index]["resource"]["birthDate"] = "1987-02-30"
    resigned = sign_bundle(
        message,
        hospital.signer,
        issuer="hospital-a",
        audience="insurer-b",
        message_id=message["identifier"]["value"],
        now=datetime.now(UTC),
    )
    status, outcome = await _post(pair, orjson.dumps(resigned))
    assert status == 422
    assert outcome["issue"][0]["expression"] == [f"Bundle.entry[{index}].resource.birthDate"]
    assert "1987-02-30" not in orjson.dumps(outcome).decode()
    assert inbox_count(store_of(pair, "insurer")) == 0


async def test_failures_are_answered_as_operation_outcomes(pair: Pair, records: list) -> None:
    """An unknown path and a failing store both answer with an OperationOutcome; a store
    failure is 503 (try again) and nothing is acknowledged."""
    status, outcome = await _post(pair, b"{}")  # sanity: a real endpoint answers FHIR
    assert outcome["resourceType"] == "OperationOutcome"

    ctx = client_ssl(pair.root, "hospital-a")
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(f"{pair.insurer_url}/Nothing/here") as resp,
    ):
        assert resp.status == 404
        assert orjson.loads(await resp.read())["resourceType"] == "OperationOutcome"

    record = records[14]
    await pair.hospital.controller.put_consent(consent_for(record))
    signed, _ = pair.hospital.controller.prepare(record, LINK_OUT)
    pair.insurer.controller.store.close()  # the insurer's disk is gone
    status, outcome = await _post(pair, orjson.dumps(signed))
    assert status == 503
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "store-error"


@pytest.mark.control("U7")
async def test_disclosure_history_of_one_patient(
    tmp_path: Path, records: list, capsys: pytest.CaptureFixture[str]
) -> None:
    """GB/T 39725 §7 g: the hospital can say who received what about a patient and when,
    from its audit trail, as a table or as FHIR AuditEvent resources."""
    from e2e_support import patient_id

    from bridge.records.fhir import validate_resource

    pair = await start_pair(tmp_path)
    try:
        record = records[15]
        await pair.hospital.controller.put_consent(consent_for(record))
        sub = await pair.hospital.submit(record, LINK_OUT)
        assert (await wait_final(pair, sub.message_id)).state == "acked"
        other = records[16]
        await pair.hospital.controller.put_consent(consent_for(other, consent_id="c-other"))
        other_sub = await pair.hospital.submit(other, LINK_OUT)
        assert (await wait_final(pair, other_sub.message_id)).state == "acked"
    finally:
        await pair.stop()
    system, value = patient_id(record)
    args = [
        "audit",
        "disclosures",
        "--config",
        str(pair.hospital_cfg),
        "--patient",
        f"{system}|{value}",
    ]
    capsys.readouterr()
    assert cli_main(args) == 0
    table = capsys.readouterr().out
    actions = [line.split("\t")[2] for line in table.splitlines()[1:]]
    assert actions == ["consent.put", "claim.enqueue", "claim.ack"]
    assert value not in table  # the identifier itself is never in the trail
    assert cli_main([*args, "--fhir"]) == 0
    bundle = orjson.loads(capsys.readouterr().out)
    validate_resource(bundle)
    ack = bundle["entry"][-1]["resource"]
    # BALP: a DICOM event type (Export), the bridge's own action as subtype.
    assert ack["type"]["code"] == "110106"
    assert ack["subtype"][0]["code"] == "claim.ack" and ack["outcome"] == "0"
    assert {"system": "urn:ws-fhir-bridge:partner", "value": "insurer-b"} in [
        a["who"]["identifier"] for a in ack["agent"]
    ]


async def test_receipt_digests_are_those_of_the_content_signed(
    tmp_path: Path, records: list
) -> None:
    """The digests a receipt is checked against at dispatch are the stored message's own,
    whether this process signed it (kept from signing) or not (computed again)."""
    from bridge.trust.jws import payload_digests

    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        hospital = pair.hospital.controller
        await hospital.put_consent(consent_for(records[0]))
        sub = await pair.hospital.submit(records[0], LINK_OUT)
        row = await hospital.db.get_outbox(sub.message_id)
        payload = orjson.loads(row.payload)
        expected = payload_digests(payload)
        assert hospital.request_digests(payload) == expected  # kept from signing
        assert hospital.request_digests(payload) == expected  # computed again
        # A restarted bridge knows nothing of what it signed before, and gets the same.
        fresh = type(hospital)(hospital.config)
        try:
            assert fresh.request_digests(payload) == expected
        finally:
            await fresh.close()
    finally:
        await pair.stop()
