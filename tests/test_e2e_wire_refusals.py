"""What a partner chooses to send never reaches this bridge's answers, log lines, audit
log or metrics, and every refusal on the partner port is an OperationOutcome, from
outside: a real ``bridge serve`` process with the dev PKI, a client speaking TLS and
JOSE from PROTOCOL.md (the conformance peer).

The text sent is a newline followed by a forged log line holding a name and an ID
number: named back, it would forge a line in the text log and put the values in the
append-only audit log for good.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e_support import client_ssl
from ops_support import Serve, http, serve
from peer_support import call
from test_e2e_batch import _batch, _insurer, _ops_url, _peer, _post_batch, _statuses
from test_review_config_mistakes import _edit, _init, _refused

from bridge.config import load_config
from bridge.conformance.envelope import JWSOptions, sign_detached
from bridge.conformance.peer import Peer, PeerConnection
from bridge.errors import MAX_PATH, ParseError
from bridge.link.node import Controller
from bridge.link.server import refusal_detail
from bridge.link.witness import AuditWitness

NAME = "张三"
ID_NUMBER = "110101199003074512"
FORGED = f"x\n2026-12-07T00:00:00.000Z WARNING forged line {NAME} {ID_NUMBER}"
FHIR_JSON = "application/fhir+json"
#: Sync streams the insurer takes from one partner in these tests (server.max_streams_per_partner).
STREAMS = 6


def _audit(store: Path) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return [(str(a), str(s), str(d or "")) for a, s, d in con.execute(
            "SELECT action, subject, detail FROM audit ORDER BY seq")]
    finally:
        con.close()


def _outcome(body: bytes) -> tuple[str, list[str]]:
    doc = json.loads(body)
    assert doc["resourceType"] == "OperationOutcome", doc
    issue = doc["issue"][0]
    return issue["details"]["coding"][0]["code"], issue.get("expression", [])


def _assert_nothing_sent_kept(insurer: Serve, store: Path, *answers: bytes) -> None:
    """No answer, log line or audit entry carries the name, the ID number or a line the
    sender made; the log has no line the bridge did not write."""
    for answer in answers:
        text = answer.decode("utf-8")
        assert NAME not in text and ID_NUMBER not in text and "forged" not in text, text
    log = insurer.log.read_text(encoding="utf-8")
    assert NAME not in log and ID_NUMBER not in log and "forged" not in log, log
    for line in log.splitlines():
        assert line[:4].isdigit() and line[4] == "-", f"a line the bridge did not write: {line!r}"
    for entry in _audit(store):
        kept = " ".join(entry)
        assert NAME not in kept and ID_NUMBER not in kept and "\n" not in kept, entry


@dataclass
class Insurer:
    process: Serve
    peer: Peer
    store: Path
    config: Path
    hospital_config: Path


@pytest.fixture
def insurer(tmp_path: Path) -> Iterator[Insurer]:
    """The insurer as ``bridge serve``, fresh; the peer is hospital-a."""
    hospital_cfg, insurer_cfg = _insurer(tmp_path, max_batch_entries=4,
                                         max_batch_bytes=2_000_000,
                                         max_streams_per_partner=STREAMS)
    process = serve(insurer_cfg)
    try:
        yield Insurer(process, _peer(tmp_path, insurer_cfg),
                      tmp_path / "insurer-b" / "bridge.sqlite", insurer_cfg, hospital_cfg)
    finally:
        process.stop()
    assert not [line for line in process.log_lines() if "Traceback" in line]


def _post(conn: PeerConnection, peer: Peer, tail: str, body: bytes,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    response = conn.request("POST", peer.path(tail), body,
                            {"Content-Type": FHIR_JSON, **(headers or {})})
    return response.status, response.body


async def test_a_signature_header_member_is_named_as_star(insurer: Insurer) -> None:
    """A protected header with a member named with a newline, a name and an ID number,
    in a claim's Bundle.signature and in a consent's X-Signature: 403 naming ``*``."""
    process, peer, store = insurer.process, insurer.peer, insurer.store
    options = JWSOptions(extra_headers={FORGED: 1})
    claim = peer.signed_claim(sign={"options": options})
    consent = json.dumps({"resourceType": "Consent", "id": "hospital-a.c1",
                          "status": "active"}).encode()
    signature = sign_detached(consent, peer.signing_key, iss="hospital-a", aud="insurer-b",
                              iat=int(time.time()), msgid="Consent/hospital-a.c1",
                              options=options)
    # An unsigned member of Bundle.signature with such a name.
    loose = peer.signed_claim()
    loose["signature"][FORGED] = 1
    with await call(peer.connect) as conn:
        message = await call(peer.post_message, conn, claim)
        consent_answer = await call(_post, conn, peer, "Consent", consent,
                                    {"X-Signature": signature})
        loose_answer = await call(peer.post_message, conn, loose)
    assert message.response.status == 403
    assert _outcome(message.response.body) == ("signature-invalid",
                                               ["Bundle.signature.data#*"])
    assert consent_answer[0] == 403
    assert _outcome(consent_answer[1]) == ("signature-invalid", ["X-Signature#*"])
    assert loose_answer.response.status == 403
    assert _outcome(loose_answer.response.body) == ("signature-invalid", ["Bundle.signature.*"])
    process.stop()
    _assert_nothing_sent_kept(process, store, message.response.body, consent_answer[1],
                              loose_answer.response.body)
    rejects = [e for e in _audit(store) if e[0] == "message.reject"]
    assert ("signature-invalid@Bundle.signature.data#*" in [d for _a, _s, d in rejects]), rejects
    assert ("signature-invalid@X-Signature#*" in [d for _a, _s, d in rejects]), rejects
    assert ("signature-invalid@Bundle.signature.*" in [d for _a, _s, d in rejects]), rejects


async def test_an_unknown_expect_is_an_operation_outcome_and_audited(insurer: Insurer) -> None:
    process, peer, store = insurer.process, insurer.peer, insurer.store
    expect = f"{ID_NUMBER} {NAME}".encode().decode("latin-1")
    answers = []
    for path in (peer.path("$process-message"), peer.path("metadata"), "/nowhere"):
        with await call(peer.connect) as conn:
            response = await call(conn.request, "POST" if "process" in path else "GET", path,
                                  b"{}", {"Content-Type": FHIR_JSON, "Expect": expect})
        assert response.status == 417, (path, response.status, response.body)
        assert str(response.header("Content-Type")).startswith(FHIR_JSON)
        assert _outcome(response.body) == ("expectation-failed", ["Expect"]), path
        answers.append(response.body)
    # 100-continue is what Expect is for: a client waiting for it sends its claim.
    tls = client_ssl(insurer.config.parent, "hospital-a")
    async with aiohttp.ClientSession() as session, session.post(
            peer.base_url + "/$process-message", data=json.dumps(peer.signed_claim()),
            headers={"Content-Type": FHIR_JSON}, ssl=tls, expect100=True) as answer:
        assert answer.status == 200, await answer.text()
    # A certificate that is no partner's is refused as such, Expect or not.
    stranger = client_ssl(insurer.config.parent, "clinic-x")
    async with aiohttp.ClientSession() as session, session.post(
            peer.base_url + "/$process-message", data=b"{}", ssl=stranger,
            headers={"Content-Type": FHIR_JSON, "Expect": "bogus"}) as answer:
        assert answer.status == 401, await answer.text()
        assert _outcome(await answer.read())[0] == "unknown-partner"
    process.stop()
    _assert_nothing_sent_kept(process, store, *answers)
    refused = [e for e in _audit(store) if e[2] == "expectation-failed@Expect"]
    assert len(refused) == 3, _audit(store)
    assert [e[1] for e in refused] == ["$process-message", "metadata", "unrouted"]
    assert sum("expectation-failed" in line for line in process.log_lines()) >= 3


async def test_a_body_that_breaks_off_is_refused_at_once(insurer: Insurer) -> None:
    """A chunked claim whose chunk size is not a number (an ID number in its place) is
    answered 400 parse-error at once, naming the body, rather than left waiting for the
    rest; nothing of it is logged or audited."""
    process, peer, store = insurer.process, insurer.peer, insurer.store
    tls = client_ssl(insurer.config.parent, "hospital-a")
    reader, writer = await asyncio.open_connection(peer.host, peer.port, ssl=tls,
                                                   server_hostname="localhost")
    try:
        writer.write(f"POST {peer.path('$process-message')} HTTP/1.1\r\nHost: {peer.host}\r\n"
                     f"Content-Type: {FHIR_JSON}\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(f"{ID_NUMBER}zz\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1 << 16), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert _outcome(body) == ("parse-error", ["body"]), body
    process.stop()
    _assert_nothing_sent_kept(process, store, answer)
    # The rest of the body read away fails as well: logged by its type, as the peer's.
    assert not [line for line in process.log_lines() if "Traceback" in line or " ERROR " in line]


async def test_streams_are_link_ids_and_bounded_per_partner(insurer: Insurer) -> None:
    """A stream that is an ID number is refused; a partner gets at most the configured
    number of streams, and one more is refused naming the header, alone and in a batch;
    none of it is a metric."""
    process, peer, store = insurer.process, insurer.peer, insurer.store
    with await call(peer.connect) as conn:
        refused = await call(peer.post_message, conn, peer.signed_claim(),
                             headers={"Bridge-Stream": ID_NUMBER, "Bridge-Sequence": "1"})
        assert refused.response.status == 400
        assert _outcome(refused.response.body) == ("sync-invalid", ["Bridge-Stream"])
        for n in range(STREAMS):
            taken = await call(peer.post_message, conn, peer.signed_claim(),
                               headers={"Bridge-Stream": f"link-{n}", "Bridge-Sequence": "1"})
            assert taken.response.status == 200, (n, taken.response.body)
        again = await call(peer.post_message, conn, peer.signed_claim(),
                           headers={"Bridge-Stream": "link-3", "Bridge-Sequence": "2"})
        assert again.response.status == 200
        extra = await call(peer.post_message, conn, peer.signed_claim(),
                           headers={"Bridge-Stream": f"link-{STREAMS}", "Bridge-Sequence": "1"})
        assert extra.response.status == 400
        assert _outcome(extra.response.body) == ("sync-invalid", ["Bridge-Stream"])
        status, answer = await call(_post_batch, peer, conn,
                                    _batch([peer.signed_claim()], first_seq=1))
    # The batch helper names its entries' stream claims-out, one stream too many.
    assert status == 200 and _statuses(answer) == [400], answer
    outcome = answer["entry"][0]["response"]["outcome"]["issue"][0]
    assert outcome["details"]["coding"][0]["code"] == "sync-invalid"
    assert outcome["expression"] == ["Bundle.entry[0].extension"]
    code, metrics = await asyncio.to_thread(http, _ops_url(insurer.config) + "/metrics")
    assert code == 200
    streams = {line.split('stream="')[1].split('"')[0] for line in metrics.splitlines()
               if line.startswith("bridge_sync_inbound_highest_seq{")}
    assert streams == {f"link-{n}" for n in range(STREAMS)}, streams
    process.stop()
    _assert_nothing_sent_kept(process, store, refused.response.body)


async def test_sync_held_refuses_an_unknown_parameter_by_label(insurer: Insurer) -> None:
    process, peer, store = insurer.process, insurer.peer, insurer.store

    def held(*extra: dict[str, Any]) -> bytes:
        return json.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "stream", "valueString": "claims-to-insurer-b"},
            {"name": "from", "valueInteger": 1}, {"name": "to", "valueInteger": 2}, *extra,
        ]}, ensure_ascii=False).encode()

    correlation = {"X-Correlation-Id": f"urn:uuid:{uuid.uuid4()}"}
    with await call(peer.connect) as conn:
        unknown = await call(_post, conn, peer, "$sync-held",
                             held({"name": FORGED, "valueString": ID_NUMBER}), correlation)
        named = await call(_post, conn, peer, "$sync-held",
                           held({"name": "count", "valueInteger": 3}), correlation)
        stream = await call(_post, conn, peer, "$sync-held", json.dumps(
            {"resourceType": "Parameters", "parameter": [
                {"name": "stream", "valueString": ID_NUMBER},
                {"name": "from", "valueInteger": 1}, {"name": "to", "valueInteger": 2}]}
        ).encode(), correlation)
        good = await call(_post, conn, peer, "$sync-held", held(), correlation)
    assert unknown[0] == 400 and _outcome(unknown[1]) == ("sync-invalid", ["Parameters.*"])
    assert named[0] == 400 and _outcome(named[1]) == ("sync-invalid", ["Parameters.count"])
    assert stream[0] == 400 and _outcome(stream[1]) == ("sync-invalid", ["Parameters.stream"])
    assert good[0] == 200, good
    process.stop()
    _assert_nothing_sent_kept(process, store, unknown[1], stream[1])
    assert [e[2] for e in _audit(store) if e[0] == "sync.refused"] == [
        "sync-invalid@Parameters.*", "sync-invalid@Parameters.count",
        "sync-invalid@Parameters.stream"]


async def test_a_fresh_bridge_has_no_checkpoint_yet_and_a_bad_query_is_the_callers(
        insurer: Insurer, caplog: pytest.LogCaptureFixture) -> None:
    """The first question to a new bridge: 404 no-checkpoint, logged at INFO; the
    partner's witness takes it as nothing to check yet. A bad ``from`` or another
    parameter is 400 naming it, a refusal (audited), never an ERROR of the bridge."""
    process, peer, store = insurer.process, insurer.peer, insurer.store
    assert _audit(store) == []
    with await call(peer.connect) as conn:
        first = await call(peer.get, conn, "$audit-checkpoint")
    assert first.status == 404
    assert _outcome(first.body) == ("no-checkpoint", ["$audit-checkpoint"])
    hospital = Controller(load_config(insurer.hospital_config))
    with caplog.at_level(logging.INFO, logger="bridge"):
        results = await AuditWitness(hospital).run_once()
    assert [(r.partner, r.fault, r.checkpoint) for r in results] == [("insurer-b", None, None)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "no audit checkpoint yet" in caplog.text
    with await call(peer.connect) as conn:
        bad = await call(peer.get, conn, "$audit-checkpoint?from=x1")
        twice = await call(peer.get, conn, "$audit-checkpoint?from=1&from=2")
        other = await call(peer.get, conn,
                           "$audit-checkpoint?from=0&%E5%BC%A0%E4%B8%89=110101199003074512")
        named = await call(peer.get, conn, "$audit-checkpoint?size=3")
        after = await call(peer.get, conn, "$audit-checkpoint?from=0")
    assert bad.status == 400 and _outcome(bad.body) == ("parse-error", ["from"])
    assert twice.status == 400 and _outcome(twice.body) == ("parse-error", ["from"])
    assert other.status == 400 and _outcome(other.body) == ("parse-error", ["*"])
    assert named.status == 400 and _outcome(named.body) == ("parse-error", ["size"])
    with await call(peer.connect) as conn:
        cosign = await call(_post, conn, peer, "$audit-cosign", json.dumps(
            {"resourceType": "Parameters", "parameter": [
                {"name": "checkpoint", "valueString": "x"},
                {"name": FORGED, "valueString": ID_NUMBER}]}).encode())
    assert cosign[0] == 400 and _outcome(cosign[1]) == ("parse-error", ["Parameters.*"])
    # The refusals are audited: the log is no longer empty, and has a checkpoint.
    assert after.status == 200, after.body
    assert json.loads(after.body)["parameter"][0]["name"] == "checkpoint"
    process.stop()
    _assert_nothing_sent_kept(process, store, bad.body, other.body, cosign[1])
    assert [e[2] for e in _audit(store) if e[1] == "$audit-checkpoint"] == [
        "parse-error@from", "parse-error@from", "parse-error@*", "parse-error@size"]
    assert [e[2] for e in _audit(store) if e[1] == "$audit-cosign"] == [
        "parse-error@Parameters.*"]
    log = process.log_lines()
    assert not [line for line in log if " ERROR " in line], log
    assert [line for line in log if "no-checkpoint" in line or "none yet" in line], log


def test_an_outbound_link_id_with_six_digits_in_a_row_is_a_configuration_error(
        tmp_path: Path) -> None:
    """Such an id would go out as the claims' stream, which every receiver refuses
    (P-SYNC-2): the bridge says so when it reads the file, not with every claim refused."""
    config = _init(tmp_path)
    text = config.read_text(encoding="utf-8")
    link = re.search(r'^\[\[links\]\]\nid = "([^"]+)"', text, re.MULTILINE)
    assert link is not None, text
    _edit(config, f'id = "{link.group(1)}"', 'id = "claims-20261207"')
    line = _refused(config, "links[0].id")
    assert "six digits" in line


def test_a_refusal_detail_is_one_bounded_line() -> None:
    """What an audit entry keeps of a refusal: its code and place, with any control
    character escaped and the place cut to the bound, whatever a location came to hold."""
    detail = refusal_detail(ParseError("x", location=f"body#{FORGED}{'a' * 400}"))
    assert detail.startswith("parse-error@body#x\\x0a2026-12-07")
    assert "\n" not in detail and len(detail) <= len("parse-error@") + MAX_PATH
    assert detail.endswith("...")
