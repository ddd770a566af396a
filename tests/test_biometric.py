"""Biometric elements: a mapping marks an element ``biometric: true`` and the bridge keeps
and sends only a keyed digest of it.

From outside: a site overlay marks an element of the inpatient visit biometric, an HIS
sends the stay over MLLP (mutual TLS), the claim reaches the insurer bridge, and then
every byte either bridge wrote under its folder, and every payload that crossed the
link, is searched for the raw value. Its digest is what the insurer holds, computable
only with the hospital's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hl7_feeds import InpatientVisit
from intake_support import IntakePair, consent, eventually, msa, start_intake_pair

from bridge.cli import main
from bridge.errors import LoadError
from bridge.mapping.hl7v2 import HL7Reader
from bridge.mapping.hl7v2.biometric import DIGEST_CHARS, biometric_digest, protect
from bridge.mapping.hl7v2.message import parse_hl7
from bridge.mapping.hl7v2.spec import parse_path
from bridge.resources import MappingFiles, mappings_dir

PART = "hl7v2/visits/inpatient-adt.yaml"
# What the HIS sends in PID-11.4 here: a palm-vein template reference standing in for a
# biometric element (WS 445 itself defines none), distinctive enough to search for.
TEMPLATE = "PV7TPL-93c1e0d2b4a6f8e1c3d5b7a9"
KEY = bytes(range(32))


def overlay(tmp_path: Path, rule: str = "{path: PID-11.4, transform: string, biometric: true}",
            element: str = "HDSD00.11.102") -> Path:
    """A site directory whose inpatient part file marks ``element`` biometric."""
    site = tmp_path / "site"
    target = site / PART
    target.parent.mkdir(parents=True)
    text = (mappings_dir() / PART).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.startswith(f"  {element}:")]
    assert len(found) == 1, element
    lines[found[0]] = f"  {element}: {rule}\n"
    target.write_text("".join(lines), encoding="utf-8")
    return site


def with_template(message: bytes) -> bytes:
    return message.replace("浙江省".encode(), TEMPLATE.encode())


def expected_digest(key: bytes, value: str) -> str:
    mac = hmac.new(key, b"ws-fhir-bridge biometric v1\x00" + value.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


# --- the digest and the rewrite ------------------------------------------------------------


def test_the_digest_is_keyed_and_fits_a_text_element() -> None:
    digest = biometric_digest(KEY, TEMPLATE)
    assert digest == expected_digest(KEY, TEMPLATE)
    assert len(digest) == DIGEST_CHARS == 43
    assert biometric_digest(bytes(32), TEMPLATE) != digest  # another key, another digest
    assert biometric_digest(KEY, TEMPLATE + "x") != digest


@pytest.mark.control("U13")
def test_protect_replaces_only_the_marked_piece_in_every_repetition() -> None:
    message = with_template(InpatientVisit().a01())
    # A second PID-11 repetition carries another address with its own province.
    message = message.replace(b"^H^", b"^H^~^^^OTHERTPL-1^^^^^", 1)
    paths = [parse_path("PID-11.4", "test")]
    out = protect(message, paths, KEY)
    pid = parse_hl7(out).segment_list("PID")[0]
    assert pid.value(11, 1, 4) == expected_digest(KEY, TEMPLATE)
    assert pid.value(11, 2, 4) == expected_digest(KEY, "OTHERTPL-1")
    assert TEMPLATE.encode() not in out and b"OTHERTPL-1" not in out
    # Everything else is as sent, component by component.
    before, after = parse_hl7(message), parse_hl7(out)
    for seg_a, seg_b in zip(before.segments, after.segments, strict=True):
        for n in range(1, seg_a.field_count + 1):
            if (seg_a.name, n) != ("PID", 11):
                assert seg_a.raw(n) == seg_b.raw(n), (seg_a.name, n)
    assert pid.value(11, 1, 3) == "杭州市"
    # The same message under the same key gives the same bytes (duplicates stay duplicates).
    assert protect(message, paths, KEY) == out


def test_a_whole_field_is_digested_when_the_path_names_the_field() -> None:
    message = with_template(InpatientVisit().a01())
    out = protect(message, [parse_path("PID-11", "test")], KEY)
    raw_field = parse_hl7(message).segment_list("PID")[0].raw(11)
    assert parse_hl7(out).segment_list("PID")[0].raw(11) == expected_digest(KEY, raw_field)


def test_escaped_delimiters_are_digested_as_the_value_they_stand_for() -> None:
    message = InpatientVisit().a01().replace("浙江省".encode(), b"A\\S\\B")
    out = protect(message, [parse_path("PID-11.4", "test")], KEY)
    assert parse_hl7(out).segment_list("PID")[0].value(11, 1, 4) == expected_digest(KEY, "A^B")


def test_gb18030_messages_keep_their_character_set() -> None:
    text = with_template(InpatientVisit().a01()).decode("utf-8")
    text = text.replace("UNICODE UTF-8", "GB 18030-2000")
    out = protect(text.encode("gb18030"), [parse_path("PID-11.4", "test")], KEY)
    decoded = parse_hl7(out)
    assert decoded.charset == "GB 18030-2000"
    assert decoded.segment_list("PID")[0].value(11, 1, 3) == "杭州市"
    assert decoded.segment_list("PID")[0].value(11, 1, 4) == expected_digest(KEY, TEMPLATE)


def test_the_reader_collects_the_marked_paths_of_every_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Marked in the inpatient visit's part file, PID-11.4 is replaced in every message:
    # the DFT^P03 of the same stay carries the same PID-11 without reading it.
    site = overlay(tmp_path)
    reader = HL7Reader(MappingFiles(site))
    assert [p.text for p in reader.biometric_paths] == ["PID-11.4"]
    assert HL7Reader().biometric_paths == ()
    assert main(["mappings", "check", "--site", str(site)]) == 0
    assert "biometric PID-11.4: kept and sent as a keyed digest only" in capsys.readouterr().out


def test_a_json_record_has_marked_elements_digested_at_record_and_group_level() -> None:
    from bridge.mapping.hl7v2.biometric import protect_record

    record = {"dataset": "WS445.10", "elements": {"HDSD00.11.102": TEMPLATE, "X": "kept"},
              "groups": {"diagnoses": [{"HDSD00.11.024": "T2"}, {"HDSD00.11.024": ""}]}}
    marked = {"WS445.10": frozenset({"HDSD00.11.102", "HDSD00.11.024"})}
    out = protect_record(record, marked, KEY)
    assert out["elements"] == {"HDSD00.11.102": expected_digest(KEY, TEMPLATE), "X": "kept"}
    assert out["groups"]["diagnoses"] == [{"HDSD00.11.024": expected_digest(KEY, "T2")},
                                          {"HDSD00.11.024": ""}]
    assert record["elements"]["HDSD00.11.102"] == TEMPLATE  # the input is not changed
    assert protect_record({**record, "dataset": "WS445.1"}, marked, KEY) == {
        **record, "dataset": "WS445.1"}


# --- what a mapping may mark ---------------------------------------------------------------


@pytest.mark.parametrize(("rule", "element", "says"), [
    ("{path: PID-8, transform: code, valueset: hl70001-sex, biometric: true}", "HDSD00.11.109",
     "transform string"),
    ("{path: PID-11.4, transform: string, biometric: 'true'}", "HDSD00.11.102", "true or false"),
    (("{path: PID-3.1, select: {path: PID-3.5, valueset: hl70203-identifier-type, "
      "in: [resident-id-card]}, transform: string, biometric: true}"), "HDSD00.11.048",
     "without select"),
    ("{path: PV1-3.2, transform: string, biometric: true}", "HDSD00.11.083",
     "43-character digest"),
])
def test_a_mark_the_bridge_cannot_honour_names_the_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: str, element: str, says: str,
) -> None:
    site = overlay(tmp_path, rule, element)
    with pytest.raises(LoadError) as bad:
        HL7Reader(MappingFiles(site))
    assert f"{PART}:" in str(bad.value.location) and says in bad.value.message
    assert main(["mappings", "check", "--site", str(site)]) != 0
    out = capsys.readouterr()
    assert says in out.out + out.err and "Traceback" not in out.err


# --- from outside --------------------------------------------------------------------------


def _store_payloads(pair: IntakePair) -> list[bytes]:
    """Every health-data column of both stores, read back through the store."""
    found: list[bytes] = []
    queries = {
        pair.hospital.controller.store: [
            ("hl7_inbox", "SELECT message FROM hl7_inbox", "hl7_inbox.message"),
            ("hl7_inbox", "SELECT record FROM hl7_inbox WHERE record IS NOT NULL",
             "hl7_inbox.record"),
            ("intake_record", "SELECT record FROM intake_record WHERE record IS NOT NULL",
             "intake_record.record"),
            ("visit_part", "SELECT part FROM visit_part", "visit_part.part"),
            ("outbox", "SELECT payload FROM outbox_payload", None),
        ],
        pair.insurer.controller.store: [("inbox", "SELECT payload FROM inbox", None)],
    }
    for store, reads in queries.items():
        for what, sql, context in reads:
            with store.read(what) as tx:
                for (value,) in tx.all(sql):
                    raw = bytes(value)
                    found.append(tx.unseal(raw, context=context) if context else raw)
    return found


@pytest.mark.control("U13")
async def test_a_biometric_element_is_stored_and_sent_only_as_its_digest(
    tmp_path: Path,
) -> None:
    site = overlay(tmp_path)
    pair = await start_intake_pair(tmp_path, intake=f'site = "{site}"\n')
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        from hl7_feeds import standard_charges

        sequence = [with_template(m) for m in (
            visit.a01(), visit.dft("D1", standard_charges()), visit.a03())]
        assert all(TEMPLATE.encode() in m for m in sequence)
        acks = await pair.send(sequence)
        assert [msa(a)[1] for a in acks] == ["AA"] * 3
        # The HIS resends the discharge: the same message, the same digest, a duplicate.
        assert await pair.send([sequence[2]]) == [acks[2]]

        def claims() -> list[dict[str, Any]]:
            with pair.insurer.controller.store.read("inbox") as tx:
                return [orjson.loads(bytes(p)) for (p,) in tx.all("SELECT payload FROM inbox")]

        await eventually(lambda: len(claims()) == 1)
        [claim] = claims()
        payloads = _store_payloads(pair)
    finally:
        await pair.stop()

    key = bytes.fromhex((tmp_path / "biometric.key").read_text().strip())
    assert (tmp_path / "biometric.key").stat().st_mode & 0o777 == 0o600
    digest = expected_digest(key, TEMPLATE)
    patient = next(e["resource"] for e in claim["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    assert patient["address"][0]["state"] == digest  # as it crossed the link
    # Read back through both stores: nowhere the raw value, the digest where it was.
    assert payloads and not [p for p in payloads if TEMPLATE.encode() in p]
    assert sum(digest.encode() in p for p in payloads) >= 5
    # And in the bytes on disk: databases, write-ahead logs, logs, everything written.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in written)
    leaked = [str(p.relative_to(tmp_path)) for p in written if TEMPLATE.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.control("U13")
def test_the_compliance_report_reads_the_marks_from_the_site_in_effect(tmp_path: Path) -> None:
    from e2e_support import make_workdir

    from bridge.compliance.report import build_report, evidence_from_tests
    from bridge.config import load_config

    hospital, _ = make_workdir(tmp_path)

    def u13() -> dict[str, Any]:
        report = build_report(load_config(hospital), evidence_from_tests([]))
        return next(row for row in report["items"] if row["id"] == "U13")

    assert u13()["status"] == "not applicable"
    site = overlay(tmp_path)
    with hospital.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[intake]\nsite = "{site}"\n')
    row = u13()
    assert row["status"] == "met" and "PID-11.4" in row["why"]


@pytest.mark.control("U13")
def test_a_record_pushed_as_json_has_the_marked_element_digested_too(tmp_path: Path) -> None:
    """The same data element is biometric however it arrives: a WS 445 record given to
    ``bridge push`` is digested before it is queued, as an HL7 message is on intake."""
    from compliance_support import samples
    from ops_support import bridge, make_site

    from bridge.config import load_config
    from bridge.ledger import open_store

    site_dir = overlay(tmp_path)
    site = make_site(tmp_path / "pair")
    with site.hospital.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[intake]\nsite = "{site_dir}"\n')
    record = json.loads((samples(site) / "claim-1.json").read_text(encoding="utf-8"))
    record["elements"]["HDSD00.11.102"] = TEMPLATE
    pushed = tmp_path / "claim-template.json"
    pushed.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    run = bridge("consent", "add", "--config", str(site.hospital),
                 str(samples(site) / "consent.json"))
    assert run.returncode == 0, run.stderr
    run = bridge("push", "--config", str(site.hospital), "--link", "claims-to-insurer-b",
                 str(pushed))
    assert run.returncode == 0, run.stderr
    pushed.unlink()  # the operator's own file is not the bridge's to search
    key = bytes.fromhex((site.root / "biometric.key").read_text().strip())
    with open_store(load_config(site.hospital).store) as store, store.read("outbox") as tx:
        [(payload,)] = tx.all("SELECT payload FROM outbox_payload")
    message = json.loads(bytes(payload))
    patient = next(e["resource"] for e in message["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    assert patient["address"][0]["state"] == expected_digest(key, TEMPLATE)
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file()
              and TEMPLATE.encode() in p.read_bytes()]
    assert leaked == []
