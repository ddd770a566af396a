"""What an HIS writes in MSH-3, MSH-4 and MSH-10 never reaches a log line or the audit trail
unless it reads as a plain code or control id.

Those fields are the sender's text: an interface that puts a patient's name and ID
number in the sending application or the control id, or terminal control sequences in
the facility, must not have them copied into the bridge's logs or audit entries. A
plain ``HIS|HOSP-A/MSG00001`` is kept as sent; anything else is named by a digest keyed
with the bridge's own key (an unkeyed digest of an ID number gives the number back to
whoever hashes every number), which ``bridge intake label`` works out for an operator.
The ACK's MSH-10 keeps the plain digest of a control id too long to repeat: it goes back
to the HIS that sent the id. A real hospital
bridge with its HL7 v2 reader, MLLP on a real socket; every path that names a message:
accepted, resent, refused by the reader, refused by its visit, unreadable MSH.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from e2e_support import cli
from hl7_feeds import InpatientVisit, OutpatientVisit
from intake_support import eventually, msa, start_intake_pair

from bridge.demo import LINK_OUT
from bridge.ledger import intake as intake_db
from bridge.mapping.hl7v2.header import id_label, text_digest, use_label_key

NAME_AND_ID = "张三 1101011990030745"  # MSH-3.1 holds at most 20 characters
ID_IN_CID = "张三110101199003074512"
ANSI = "F\x1b[31mRED\x1b[0m"
LEAKS = ("张三", "1101011990030745", "\x1b", "[31m", "ZY2026000101", "\u676d\u5dde")
# The plain SHA-256 digests of that text: anyone can compute them from a guess.
UNKEYED = tuple(text_digest(t) for t in (NAME_AND_ID, ID_IN_CID, ANSI, "ZY2026000101"))


def _labels(config: Path, *texts: str) -> list[str]:
    """The labels ``bridge intake label`` gives, as an operator runs it."""
    done = cli("intake", "label", "--config", str(config), "--json", *texts)
    assert done.returncode == 0, done.stderr
    return [item["label"] for item in json.loads(done.stdout)]


def _msh(message: bytes, *, app: str | None = None, facility: str | None = None,
         cid: str | None = None, processing: str | None = None) -> bytes:
    head, _, rest = message.partition(b"\r")
    fields = head.decode("utf-8").split("|")
    for number, value in ((3, app), (4, facility), (10, cid), (11, processing)):
        if value is not None:
            fields[number - 1] = value
    return "|".join(fields).encode("utf-8") + b"\r" + rest


async def test_sender_text_in_msh_reaches_neither_logs_nor_audit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge")
    pair = await start_intake_pair(tmp_path, tls=False, start_insurer=False)
    try:
        visit = InpatientVisit()
        admission = _msh(visit.a01(), app=NAME_AND_ID, cid=ID_IN_CID)
        [accepted] = await pair.send([admission])
        assert msa(accepted)[1] == "AA"
        [again] = await pair.send([admission])  # the stored answer, audited as a copy
        assert again == accepted
        # Another patient admitted to the same stay: refused by its visit.
        other_patient = InpatientVisit(mrn="BA0009999").a01("ZY2026000101")
        [visit_refused] = await pair.send([_msh(other_patient, app=NAME_AND_ID)])
        assert msa(visit_refused)[1] == "AE"
        # A test system's message (MSH-11 T), as the outside tester sent it.
        [test_refused] = await pair.send([_msh(visit.a01("D3"), facility=ANSI,
                                               processing="T")])
        assert msa(test_refused)[1] == "AR"
        # MSH itself unreadable (an FS inside MSH-12): named from what can be read.
        unreadable = _msh(visit.a01(ID_IN_CID + "X"), app=NAME_AND_ID).replace(
            b"|2.5|", b"|2.5\x1c|", 1)
        [msh_refused] = await pair.send([unreadable])
        assert msa(msh_refused)[1] == "AR"
        plain = _msh(InpatientVisit(visit="ZY2026000202").a01("MSG00001"), facility="HOSP-A")
        [plain_ack] = await pair.send([plain])
        assert msa(plain_ack)[1] == "AA"

        entries = [e.record for e in pair.hospital.controller.store.audit_entries()
                   if e.record.action.startswith("hl7.")]
        assert [r.action for r in entries] == ["hl7.receive", "hl7.duplicate", "hl7.reject",
                                               "hl7.reject", "hl7.reject", "hl7.receive"]
        written = [" ".join([r.subject, r.detail or "", *r.categories]) for r in entries]
        written += [r.getMessage() for r in caplog.records]
        for text in written:
            assert not any(leak in text for leak in LEAKS + UNKEYED), text
        # Named by keyed digests that only the bridge's key gives: the operator's command
        # works them out from what the HIS sent.
        config = pair.hospital.controller.config.source
        assert config is not None
        app, facility, cid, ansi, record_no = _labels(
            config, NAME_AND_ID, visit.facility, ID_IN_CID, ANSI, "ZY2026000101")
        assert all(len(label) == 18 and label[0] == "#" for label in (app, facility, cid))
        assert entries[0].subject == entries[1].subject == f"hl7:{app}|{facility}/{cid}"
        # The ACK's MSH-10 carries the plain digest of the control id back to the HIS.
        assert accepted.split(b"|")[9] == f"ACK{text_digest(ID_IN_CID)}".encode()
        assert entries[2].subject == f"hl7:{app}|{facility}/{record_no}"
        assert entries[3].subject == f"hl7:HIS|{ansi}/D3"
        assert entries[5].subject == "hl7:HIS|HOSP-A/MSG00001"  # plain ids are kept
        refusals = [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("HL7 message refused")]
        assert len(refusals) == 3
        assert any(f"hl7:HIS|{ansi}/D3" in m for m in refusals)
    finally:
        await pair.stop()


@pytest.mark.parametrize(("text", "kept"), [
    ("HIS", True), ("HOSP-A^2.16.156.10011.1.5^ISO", True), ("MSG00001", True),
    ("ADT^A01", True), ("", True),
    ("ZY2026000101", False),  # a run of six digits or more: a record or ID number
    ("张三", False), ("HIS 1", False), ("A\x1b[0m", False), ("A\tB", False), ("x" * 65, False),
])
def test_which_sender_ids_are_written_as_sent(text: str, kept: bool) -> None:
    assert (id_label(text) == text) is kept
    if not kept:
        label = id_label(text)
        assert label != "#" + text_digest(text)
        assert len(label) == 18 and label[0] == "#" and label[1:].isalnum()


def test_a_label_depends_on_the_key_and_on_nothing_else() -> None:
    """The same text under the same key is one label (a restart names it alike); under
    another installation's key it is another, and different texts differ."""
    first, second = bytes(range(32)), bytes(range(1, 33))
    use_label_key(first)
    a = id_label(ID_IN_CID)
    assert id_label(ID_IN_CID) == a != id_label(ID_IN_CID[:-1] + "3")
    use_label_key(second)
    assert id_label(ID_IN_CID) != a
    use_label_key(first)
    assert id_label(ID_IN_CID) == a


def test_an_intake_record_is_named_by_the_same_rule() -> None:
    assert intake_db.source_label("visit:12") == "visit:12"
    assert intake_db.source_label(f"hl7:{NAME_AND_ID}|H/{ID_IN_CID}") == \
        f"hl7:{id_label(NAME_AND_ID)}|H/{id_label(ID_IN_CID)}"
    assert intake_db.source_label("hl7:HIS|HOSP-A/MSG00001") == "hl7:HIS|HOSP-A/MSG00001"
    assert intake_db.source_label("visit:张三") == "*"


async def test_a_record_refused_at_routing_is_named_by_the_same_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outpatient visit whose messages carry a name and ID numbers in MSH-3 and
    MSH-10, routed under the message that ended it and refused there (no consent): the
    routing's audit entry and log lines name the record (a visit, by its number) and
    carry nothing the HIS wrote in MSH."""
    caplog.set_level(logging.DEBUG, logger="bridge")
    routes = f"""
[[routes]]
dataset = ["WS445.2"]
links = ["{LINK_OUT}"]
"""
    pair = await start_intake_pair(tmp_path, tls=False, routes=routes)
    try:
        visit = OutpatientVisit()
        sent = [_msh(visit.registration(), app=NAME_AND_ID, cid=f"{ID_IN_CID[:-2]}01"),
                _msh(visit.end(), app=NAME_AND_ID, cid=f"{ID_IN_CID[:-2]}02")]
        assert [msa(a)[1] for a in await pair.send(sent)] == ["AA", "AA"]
        store = pair.hospital.controller.store
        await eventually(lambda: intake_db.list_records(store)[0].state == "refused")
        [record] = intake_db.list_records(store)
        [entry] = [e.record for e in store.audit_entries() if e.record.action == "intake.refused"]
        assert entry.subject == record.label(pair.hospital.controller.label_key)
        entries = [e.record for e in store.audit_entries()]
        written = [" ".join([r.subject, r.detail or "", *r.categories]) for r in entries]
        written += [r.getMessage() for r in caplog.records]
        unkeyed = tuple(text_digest(m.split(b"|")[9].decode()) for m in sent)
        for text in written:
            assert not any(leak in text for leak in LEAKS + UNKEYED + unkeyed), text
    finally:
        await pair.stop()


def test_the_label_command_needs_the_bridge_key(tmp_path: Path) -> None:
    """Before the bridge has made its key there is nothing to name text under: the
    command refuses, naming the setting, and makes no key of its own."""
    from e2e_support import make_workdir

    hospital, _ = make_workdir(tmp_path)
    done = cli("intake", "label", "--config", str(hospital), ID_IN_CID)
    assert done.returncode != 0
    assert "audit.pseudonym_key_file" in done.stderr and "Traceback" not in done.stderr
    assert ID_IN_CID not in done.stderr + done.stdout
    assert not list(tmp_path.rglob("audit-pseudonym.key"))
