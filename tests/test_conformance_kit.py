"""The conformance kit, run as a user runs it: against a real ``bridge serve`` process
(every case passes, reports written), and against bridges patched here to bring back
each defect the kit exists to catch (the named case fails, and says why)."""

from __future__ import annotations

import asyncio
import csv
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Pair, set_toml_keys, start_pair
from peer_support import call

from bridge.conformance import kit
from bridge.demo import free_port, write_configs
from bridge.trust.lifecycle import revoke
from bridge.trust.pki import (
    certificate_pem,
    init_dev_pki,
    issue_certificate,
    load_certificate,
    load_private_key,
    private_key_pem,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = {"header_timeout_seconds": 2.0, "body_timeout_seconds": 2.0,
        "handshake_timeout_seconds": 2.0}


def test_the_kit_imports_nothing_of_the_bridge_outside_its_room() -> None:
    probe = (
        "import sys\n"
        "from bridge.conformance import kit, report\n"
        "kit.all_cases()\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    modules = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    ours = [m for m in modules if m.startswith("bridge")]
    assert "bridge.conformance.cases_receiver" in ours
    assert [m for m in ours if m != "bridge" and not m.startswith("bridge.conformance")] == []
    assert not {"aiohttp", "joserfc"} & set(modules)


def test_every_case_traces_to_requirements_and_has_a_description() -> None:
    rows = {r["id"]: r for r in csv.DictReader((ROOT / "conformance" /
                                                "requirements.csv").open(encoding="utf-8"))}
    cases = kit.all_cases()
    assert len({c.id for c in cases}) == len(cases)
    for c in cases:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]+", c.id), c.id
        assert c.requirements and set(c.requirements) <= set(rows), c.id
        assert len(c.description) > 40, c.id
    # Every receiver requirement of the claim push without a reason not to test it (or
    # to test it only in part) has a case.
    covered = kit.coverage(kit.load_requirements(), cases)
    push = ("P-TLS-", "P-MSG-", "P-SIG-", "P-RCV-", "P-RCP-", "P-HTTP-")
    missing = [
        rid for rid, row in rows.items()
        if rid.startswith(push) and row["actor"] in ("receiver", "verifier", "both")
        and not row["why_not_tested"] and not covered[rid]
    ]
    assert missing == []


def test_requirements_command_lists_each_requirement_with_its_cases() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bridge", "conformance", "requirements"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "id-sender-mismatch" in lines["P-MSG-6"]
    assert "tls-no-resumption" in lines["P-TLS-6"]
    assert "(none:" in lines["P-AUD-4"]


# --- against a bridge process ------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A receiving bridge as an operator runs it: ``bridge serve`` in its own process."""
    init_dev_pki(tmp_path / "pki", ["hospital-a", "insurer-b"],
                 now=datetime.now(UTC) - timedelta(days=1))
    # A hospital certificate on the CRL, for the revocation case.
    pki = tmp_path / "pki"
    cert, key = issue_certificate(
        load_certificate(pki / "ca.pem"), load_private_key(pki / "ca.key"),  # type: ignore[arg-type]
        "hospital-a", purpose="tls", now=datetime.now(UTC), partner_id="hospital-a",
    )
    (pki / "revoked.pem").write_bytes(certificate_pem(cert))
    (pki / "revoked.key").write_bytes(private_key_pem(key))
    revoke(pki, pki / "revoked.pem", now=datetime.now(UTC))
    _, insurer_cfg = write_configs(tmp_path, free_port(), free_port())
    set_toml_keys(insurer_cfg, "server", FAST)
    set_toml_keys(insurer_cfg, "tls", {"crl": "pki/crl.pem"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        port = re.search(r"port=(\d+)", ready)
        assert port, ready
        yield tmp_path, f"https://127.0.0.1:{port.group(1)}/fhir"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _kit_args(root: Path, target: str) -> list[str]:
    pki = root / "pki"
    return [
        "--target", target, "--cert", str(pki / "hospital-a" / "tls.pem"),
        "--key", str(pki / "hospital-a" / "tls.key"), "--ca", str(pki / "ca.pem"),
        "--signing-key", str(pki / "hospital-a" / "sign.key"),
        "--receiver-signing-cert", str(pki / "insurer-b" / "sign.pem"),
        "--ca-key", str(pki / "ca.key"),
        "--header-timeout", "2", "--body-timeout", "2", "--handshake-timeout", "2",
        "--revoked-cert", str(pki / "revoked.pem"), "--revoked-key", str(pki / "revoked.key"),
    ]


@pytest.mark.battery
def test_the_whole_kit_passes_against_a_bridge_process(served: tuple[Path, str]) -> None:
    root, target = served
    junit, page = root / "kit.xml", root / "kit.html"
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "conformance", "run", *_kit_args(root, target),
         "--junit", str(junit), "--html", str(page), "--quiet"],
        capture_output=True, text=True, cwd=root, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CONFORMANT:" in done.stdout and "NOT CONFORMANT" not in done.stdout
    suite = ET.parse(junit).getroot()
    names = [tc.get("name") for tc in suite.iter("testcase")]
    assert sorted(names) == sorted(c.id for c in kit.select_cases())
    assert suite.get("failures") == suite.get("errors") == suite.get("skipped") == "0"
    text = page.read_text(encoding="utf-8")
    # One page, nothing fetched from elsewhere; each requirement with its cases and the
    # exchanges as evidence.
    assert not re.search(r"<(script|link|img)\b", text)
    assert 'id="id-sender-mismatch"' in text and "sender-mismatch" in text
    assert '<tr class="pass"><td>P-MSG-6</td>' in text
    assert "403 Forbidden" in text


def test_a_required_case_failing_is_exit_1_and_a_bad_target_exit_2(
    served: tuple[Path, str],
) -> None:
    root, target = served
    args = _kit_args(root, target)
    # The kit's own signing key is not the one the target holds for hospital-a: cases
    # expecting acceptance fail, and the run says so.
    stray = root / "stray"
    init_dev_pki(stray, ["hospital-a"])
    i = args.index("--signing-key")
    args[i + 1] = str(stray / "hospital-a" / "sign.key")
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "conformance", "run", *args, "--quiet",
         "--case", "sig-valid-claim", "--case", "id-sender-mismatch"],
        capture_output=True, text=True, cwd=root, timeout=60, check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  sig-valid-claim" in done.stdout
    assert "expected 200 with a receipt, got 403" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "bridge", "conformance", "run", *args, "--case", "no-such-case"],
        capture_output=True, text=True, cwd=root, timeout=30, check=False,
    )
    assert bad.returncode == 2 and "no-such-case" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- against bridges with the defects back -----------------------------------------------


def _config(pair: Pair, **changes: Any) -> kit.KitConfig:
    pki = pair.root / "pki"
    params: dict[str, Any] = {
        "target": pair.insurer_url,
        "cert": pki / "hospital-a" / "tls.pem",
        "key": pki / "hospital-a" / "tls.key",
        "ca": pki / "ca.pem",
        "signing_key": pki / "hospital-a" / "sign.key",
        "signing_cert": pki / "hospital-a" / "sign.pem",
        "receiver_signing_cert": pki / "insurer-b" / "sign.pem",
        "ca_key": pki / "ca.key",
        "header_timeout": 2.0,
        "body_timeout": 2.0,
        "handshake_timeout": 2.0,
    }
    params.update(changes)
    return kit.KitConfig(**params)


async def _run(pair: Pair, ids: Sequence[str], **changes: Any) -> dict[str, kit.Result]:
    results = await call(kit.run, _config(pair, **changes), kit.select_cases(ids))
    return {r.case.id: r for r in results}


@pytest.fixture
async def patched_pair(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A pair started after the test's monkeypatches (the listener reads them at start)."""
    p = await start_pair(tmp_path, start_dispatch=False,
                         insurer_config={"server": dict(FAST)})
    try:
        yield p
    finally:
        await p.stop()


async def test_kit_cases_pass_on_this_bridge_in_process(patched_pair: Pair) -> None:
    ids = ["tls-no-resumption", "tls-resumption-after-expiry", "id-sender-mismatch",
           "id-wrong-receiver", "id-event", "id-message-identity", "idem-concurrent",
           "sig-extra-header", "tls-unregistered-partner", "tls-groups-refused",
           "exh-slow-headers", "sync-sequence-headers", "sync-held", "sync-collision",
           "sync-collision-reported", "sig-unsigned-content"]
    results = await _run(patched_pair, ids)
    assert {k: (r.status, r.detail) for k, r in results.items() if not r.passed} == {}


async def _run_on_a_new_pair(tmp_path: Path, ids: Sequence[str]) -> dict[str, kit.Result]:
    """The kit's cases ``ids`` against a pair started now (after the test's patches)."""
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        return await _run(pair, ids)
    finally:
        await pair.stop()


def _fails(results: dict[str, kit.Result], case_id: str, *words: str) -> None:
    result = results[case_id]
    assert result.status == "fail", (result.status, result.detail)
    for word in words:
        assert word in result.detail, result.detail


async def test_defect_1_tls_sessions_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener keeps OpenSSL's session-id cache, and the per-request certificate
    # check is gone: a resumed session then carries an expired certificate's claims.
    from bridge.trust import tls
    from bridge.trust.identity import certificate_identity
    from bridge.trust.peercheck import PeerCertificateCheck

    monkeypatch.setattr(tls, "disable_session_cache", lambda ctx: None)
    monkeypatch.setattr(PeerCertificateCheck, "check",
                        lambda self, der, now: certificate_identity(der))
    pair = await start_pair(tmp_path, start_dispatch=False, insurer_config={"server": FAST})
    try:
        results = await _run(pair, ["tls-no-resumption", "tls-certificate-per-request",
                                    "tls-resumption-after-expiry"])
    finally:
        await pair.stop()
    _fails(results, "tls-no-resumption", "resumed a TLS 1.2 session")
    _fails(results, "tls-certificate-per-request", "expected 401 certificate-rejected")
    _fails(results, "tls-resumption-after-expiry", "accepted over a session resumed")


async def test_defect_2_and_3_message_header_not_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import server

    monkeypatch.setattr(server, "check_addressing", lambda envelope, *, peer, receiver: None)
    results = await _run_on_a_new_pair(tmp_path, ["id-sender-mismatch", "id-wrong-receiver"])
    _fails(results, "id-sender-mismatch", "expected 403 sender-mismatch", "got 200")
    _fails(results, "id-wrong-receiver", "expected 403 wrong-receiver", "got 200")


async def test_defect_4_other_events_stored_as_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import server

    monkeypatch.setattr(server, "ACCEPTED_EVENTS",
                        frozenset({"claim-submit", "receipt", "claim-cancel"}))
    results = await _run_on_a_new_pair(tmp_path, ["id-event"])
    _fails(results, "id-event", "expected 400 unsupported-event", "got 200")


async def test_defect_5_identities_that_are_not_canonical_uuids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge import messages

    monkeypatch.setattr(messages, "MESSAGE_ID_PATTERN", re.compile(r"urn:[a-z]+:.+"))
    results = await _run_on_a_new_pair(tmp_path, ["id-message-identity"])
    _fails(results, "id-message-identity", "expected 400 parse-error")


async def test_defect_6_in_progress_before_the_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The in-progress check moved in front of signature verification: a forged copy of
    # a message in flight is told 409 instead of 403.
    from bridge.errors import InFlightError
    from bridge.link import server

    pair = await start_pair(tmp_path, start_dispatch=False)
    receiver = pair.insurer.receiver
    real_verify = server.verify_bundle

    def verify_after_flight_check(bundle: Any, keyring: Any, **kw: Any) -> Any:
        key = (kw["expected_issuer"], bundle["identifier"]["value"])
        if key in receiver._in_flight:
            raise InFlightError("in progress", location="Bundle.identifier")
        return real_verify(bundle, keyring, **kw)

    monkeypatch.setattr(server, "verify_bundle", verify_after_flight_check)
    # A slow store keeps the valid copy in flight while the forged copies arrive (a fast
    # one can finish before they do, and the race the case looks for never happens).
    real_accept = receiver._accept

    async def slow_accept(*args: Any, **kw: Any) -> Any:
        await asyncio.sleep(0.5)
        return await real_accept(*args, **kw)

    monkeypatch.setattr(receiver, "_accept", slow_accept)
    try:
        results = await _run(pair, ["idem-concurrent"])
    finally:
        await pair.stop()
    _fails(results, "idem-concurrent", "forged copies got", "409")


async def test_defect_7_unencoded_payload_jws_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.trust import jws

    monkeypatch.setattr(jws, "_HEADER_TYPES", {**jws._HEADER_TYPES, "crit": list, "b64": bool,
                                                "typ": str, "x5c": list, "jku": str})
    results = await _run_on_a_new_pair(tmp_path, ["sig-extra-header"])
    _fails(results, "sig-extra-header", "expected 403 signature-invalid at "
           "Bundle.signature.data#b64")


async def test_unsigned_content_in_the_signature_element_was_stored_as_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before PROTOCOL 1.3's step 15 a receiver checked only who's value: an extension,
    # onBehalfOf or another `when` inside Bundle.signature, which no signature covers,
    # was accepted and stored with the claim as evidence.
    from bridge.trust import jws

    def who_value_only(signature: dict[str, Any], header: dict[str, Any]) -> None:
        who = (signature.get("who") or {}).get("identifier") or {}
        if who.get("value") != header["iss"]:
            raise jws.SignatureError("who", location="Bundle.signature.who")

    monkeypatch.setattr(jws, "_exactly_as_signed", who_value_only)
    results = await _run_on_a_new_pair(tmp_path, ["sig-unsigned-content"])
    _fails(results, "sig-unsigned-content", "expected 403 signature-invalid", "got 200")


async def test_defect_8_metadata_for_any_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import server
    from bridge.link.capability import capability_statement

    async def open_metadata(self: Any, request: Any) -> Any:
        return server.web.Response(body=server.orjson.dumps(capability_statement(self.c, None)),
                                   content_type=server.FHIR_JSON)

    def gate(receiver: Any) -> Any:
        @server.web.middleware
        async def no_gate(request: Any, handler: Any) -> Any:
            return await handler(request)

        return no_gate

    monkeypatch.setattr(server.ReceiverApp, "metadata", open_metadata)
    monkeypatch.setattr(server, "peer_gate", gate)
    results = await _run_on_a_new_pair(tmp_path, ["tls-unregistered-partner"])
    _fails(results, "tls-unregistered-partner", "expected 401 unknown-partner", "got 200")


async def test_defect_9_groups_and_slow_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every group OpenSSL offers, and a header timeout far longer than the one the
    # operator states to the kit.
    from bridge.trust import tls

    monkeypatch.setattr(tls, "INTERMEDIATE_GROUPS",
                        ("X25519", "prime256v1", "secp384r1", "secp521r1", "X448",
                         "ffdhe2048", "ffdhe3072"))
    pair = await start_pair(tmp_path, start_dispatch=False,
                            insurer_config={"server": {"header_timeout_seconds": 30.0}})
    try:
        results = await _run(pair, ["tls-groups-refused", "exh-slow-headers"],
                             header_timeout=1.0)
    finally:
        await pair.stop()
    _fails(results, "tls-groups-refused", "with only P-521 got 200")
    _fails(results, "exh-slow-headers", "kept its connection")


async def test_a_refused_body_holding_its_connection_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's default: after a 413 the unread body is drained for 10 s, the
    # connection held all that time for a request already refused.
    from aiohttp import web

    real = web.AppRunner

    def lingering(app: Any, **kwargs: Any) -> Any:
        return real(app, **{**kwargs, "lingering_time": 10.0})

    monkeypatch.setattr(web, "AppRunner", lingering)
    pair = await start_pair(tmp_path, start_dispatch=False, insurer_config={"server": FAST})
    try:
        results = await _run(pair, ["exh-body-size"])
    finally:
        await pair.stop()
    _fails(results, "exh-body-size", "still open 4 s after 413")


# --- receivers that passed the kit before its cases were sharpened -------------------------


async def test_a_replay_window_wider_than_the_protocols_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window of 50 minutes behind and 9 ahead: the probes an hour old and ten minutes
    # ahead are still refused, the ones just outside ±300 s are not.
    from bridge.trust import jws

    real = jws._claims

    def wide(header: Any, entry: Any, payload: Any, audience: Any, now: Any, window: Any,
             check_time: bool, loc: str) -> Any:
        return real(header, entry, payload, audience, now, timedelta(minutes=9), check_time, loc)

    monkeypatch.setattr(jws, "_claims", wide)
    results = await _run_on_a_new_pair(tmp_path, ["sig-replay-window"])
    _fails(results, "sig-replay-window", "expected 403 replay-rejected", "got 200")
    assert results["sig-replay-window"].evidence[-1].label.startswith("iat 315 s")


async def test_addressing_checked_only_against_known_parties_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receiver that takes any party it knows as sender or receiver.
    from bridge.link import server
    from bridge.messages import check_addressing

    known = {"hospital-a", "insurer-b"}

    def loose(envelope: Any, *, peer: str, receiver: str) -> None:
        check_addressing(envelope, peer=envelope.sender if envelope.sender in known else peer,
                         receiver=envelope.receiver if envelope.receiver in known else receiver)

    monkeypatch.setattr(server, "check_addressing", loose)
    results = await _run_on_a_new_pair(tmp_path, ["id-sender-mismatch", "id-wrong-receiver"])
    _fails(results, "id-sender-mismatch", "expected 403 sender-mismatch", "got 200")
    _fails(results, "id-wrong-receiver", "expected 403 wrong-receiver", "got 200")
    # The probes naming an unknown party were refused: the known ones were not.
    assert results["id-sender-mismatch"].evidence[-1].label == "sender names the target itself"
    assert results["id-wrong-receiver"].evidence[-1].label == "addressed to the sender itself"


async def test_a_sequence_number_without_its_stream_ignored_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import sync

    real = sync.read_sequence

    def lenient(headers: Any) -> Any:
        return None if "Bridge-Stream" not in headers else real(headers)

    monkeypatch.setattr(sync, "read_sequence", lenient)
    results = await _run_on_a_new_pair(tmp_path, ["sync-sequence-headers"])
    _fails(results, "sync-sequence-headers", "expected 400 sync-invalid at Bridge-Stream")
    assert results["sync-sequence-headers"].evidence[-1].label == "number only"


async def test_a_receipt_naming_the_digest_of_the_other_form_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receipt's request-digest is that of appendix A's form for a claim signed over
    # RFC 8785's (the sample claim's integral decimals make the two differ).
    import dataclasses

    from bridge.conformance.envelope import sha256_digest, signed_payload, v1_canonical
    from bridge.link import server

    real = server.verify_bundle

    def other_form(bundle: Any, *args: Any, **kwargs: Any) -> Any:
        claims = real(bundle, *args, **kwargs)
        return dataclasses.replace(
            claims, payload_digest=sha256_digest(signed_payload(bundle, v1_canonical)))

    monkeypatch.setattr(server, "verify_bundle", other_form)
    results = await _run_on_a_new_pair(tmp_path, ["sig-valid-claim"])
    _fails(results, "sig-valid-claim", "request-digest is not the digest of what was sent")


async def test_an_accepted_claim_receipted_fatal_error_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.link import server

    real = server.make_receipt
    monkeypatch.setattr(server, "make_receipt",
                        lambda **kwargs: real(**{**kwargs, "outcome": "fatal-error"}))
    results = await _run_on_a_new_pair(tmp_path, ["sig-valid-claim"])
    _fails(results, "sig-valid-claim", "says fatal-error, not ok")


def test_a_failed_optional_case_checking_a_shall_is_not_conformant() -> None:
    # tls-revoked runs only when the kit is given a revoked certificate; once run, a
    # receiver that accepted that certificate (P-TLS-2, a SHALL) is not conformant. A
    # skipped one, or a failed SHOULD, leaves the verdict alone.
    by_id = {c.id: c for c in kit.CASES}
    passed = kit.Result(by_id["sig-valid-claim"], "pass", "", 0.1)

    def result(case_id: str, status: str) -> kit.Result:
        return kit.Result(by_id[case_id], status, "", 0.1)

    assert not by_id["tls-revoked"].required
    assert not kit.conformant([passed, result("tls-revoked", "fail")])
    assert not kit.conformant([passed, result("batch-entries", "error")])
    assert kit.conformant([passed, result("tls-revoked", "skip")])
    assert kit.conformant([passed, result("tls-handshake-timeout", "fail")])  # a SHOULD
    assert not kit.conformant([result("sig-valid-claim", "skip")])


async def test_err_no_5xx_passes_on_this_bridge_with_every_odd_claim_refused(
        patched_pair: Pair) -> None:
    # Each of the ~650 mutated claims (unsigned, or not valid FHIR: a value of another
    # JSON type, or an empty one) is refused 4xx.
    results = await _run(patched_pair, ["err-no-5xx"])
    assert results["err-no-5xx"].passed, results["err-no-5xx"].detail


async def test_a_held_identity_answered_before_its_signature_is_checked_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receiver that answers a message identity it holds from its inbox without
    # checking the new request's signature: the original receipt for anyone's bytes.
    from bridge.link import server

    real = server.verify_bundle
    held: dict[str, Any] = {}

    def cached(bundle: Any, *args: Any, **kwargs: Any) -> Any:
        identity = (bundle.get("identifier") or {}).get("value")
        if identity in held:
            return held[identity]
        held[identity] = claims = real(bundle, *args, **kwargs)
        return claims

    monkeypatch.setattr(server, "verify_bundle", cached)
    results = await _run_on_a_new_pair(tmp_path, ["idem-same-content"])
    _fails(results, "idem-same-content", "expected 403 signature-invalid", "got 200")
    assert results["idem-same-content"].evidence[-1].label == "again, unsigned"


async def test_content_profile_passes_on_this_bridge_for_every_selection_rule(
        patched_pair: Pair) -> None:
    results = await _run(patched_pair, ["content-profile"])
    assert results["content-profile"].passed, results["content-profile"].detail
    labels = [e.label for e in results["content-profile"].evidence]
    assert "Patient.identifier (medical-record number)" in labels
    assert "Patient.telecom (e-mail)" in labels


async def test_a_profile_check_blind_to_selection_by_system_kind_or_url_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver checks which elements arrive but not which entries of them: an
    # identifier of another system, an e-mail, an extension of another URL pass.
    from bridge.policy.profile import LinkProfile

    real = LinkProfile.check

    def elements_only(self: LinkProfile, bundle: dict[str, Any]) -> list[str]:
        return [p for p in real(self, bundle) if "[system=" not in p and "[url=" not in p]

    monkeypatch.setattr(LinkProfile, "check", elements_only)
    results = await _run_on_a_new_pair(tmp_path, ["content-profile"])
    _fails(results, "content-profile", "expected 403 profile-denied", "got 200")
    assert results["content-profile"].evidence[-1].label == (
        "Patient.identifier (medical-record number)")


async def test_a_receiver_taking_chunked_bodies_past_its_limit_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The declared length is still checked; a chunked body is read up to 64 times the
    # limit (aiohttp's client_max_size raised).
    from aiohttp import web

    real = web.Application

    def roomy(*args: Any, **kwargs: Any) -> Any:
        if "client_max_size" in kwargs:
            kwargs["client_max_size"] *= 64
        return real(*args, **kwargs)

    monkeypatch.setattr(web, "Application", roomy)
    results = await _run_on_a_new_pair(tmp_path, ["exh-body-size"])
    result = results["exh-body-size"]
    assert not result.passed, result.detail
    assert result.evidence[-1].label == "chunked over the limit"


async def test_a_certificate_naming_two_partners_taken_as_the_first_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receiver that binds a certificate naming two partners to the first it lists.
    from cryptography import x509 as x

    from bridge.errors import UnknownPartner
    from bridge.trust import identity, tls

    real = identity.certificate_identity

    def first_named(der: bytes) -> Any:
        try:
            return real(der)
        except UnknownPartner:
            cert = x.load_der_x509_certificate(der)
            uris = tuple(cert.extensions.get_extension_for_class(
                x.SubjectAlternativeName).value.get_values_for_type(x.UniformResourceIdentifier))
            named = [u.removeprefix(identity.PARTNER_URI_PREFIX) for u in uris
                     if u.startswith(identity.PARTNER_URI_PREFIX)]
            return identity.CertIdentity(
                fingerprint_sha256=identity.fingerprint_sha256(der), common_name=None,
                dns_names=(), uri_sans=uris, partner_id=named[0],
                not_after=cert.not_valid_after_utc, not_before=cert.not_valid_before_utc,
                serial_number=cert.serial_number, issuer=cert.issuer.rfc4514_string())

    monkeypatch.setattr(identity, "certificate_identity", first_named)
    monkeypatch.setattr(tls, "certificate_identity", first_named)
    identity.peer_identity.cache_clear()
    results = await _run_on_a_new_pair(tmp_path, ["tls-unregistered-partner"])
    _fails(results, "tls-unregistered-partner", "expected 401 unknown-partner")
    assert results["tls-unregistered-partner"].evidence[-1].label.startswith("two-partners")


async def test_a_receiver_taking_empty_values_as_absent_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The models read null, "", [] and {} as an element left out: without the check on
    # the received bytes and validation's own rule against empty values, such a claim is
    # stored and receipted as it came.
    from bridge.link import server
    from bridge.records import fhir

    monkeypatch.setattr(server, "empty_value", lambda body, data: None)
    monkeypatch.setattr(fhir, "_first_empty", lambda node, path: None)
    monkeypatch.setattr(fhir, "_holds_empty", lambda node: False)
    results = await _run_on_a_new_pair(tmp_path, ["err-no-5xx"])
    _fails(results, "err-no-5xx", "200 for a claim that is not valid FHIR")
