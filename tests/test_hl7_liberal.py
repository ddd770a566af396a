"""Liberal in what it accepts, exact in what it says: over MLLP with a real socket.

A field no mapping reads is checked for structure only: a broken data type there is
accepted (AA), said back as an ERR of severity W, and kept with the stored message. A
field a mapping reads is checked strictly, and the refusal names the HL7 location and
the data elements it was needed for, never a value and never a FHIR path.
"""

from __future__ import annotations

from pathlib import Path

from hl7_feeds import InpatientVisit
from intake_support import after_header, msa, start_intake_pair

from bridge.ledger import intake as intake_db


def _segments(ack: bytes, name: str) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s.startswith(name + "|")]


async def test_unread_fields_are_warnings_and_read_fields_are_strict(tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path, tls=False)
    try:
        visit = InpatientVisit()
        a01 = visit.a01()
        lines = a01.split(b"\r")
        # PID-33 (last update, TS) and PV1-47 (total charges, NM), written as text: no
        # mapping reads them. A Z-segment and a free-text PV1-4 (admission type) too.
        pid = lines[2] + b"|" * (33 - lines[2].count(b"|")) + b"2026-03-01 08:30:00"
        pv1 = lines[3] + "||约12000元".encode()
        loose = b"\r".join([lines[0], lines[1], pid, pv1.replace(b"||||", "|急诊|||".encode(), 1),
                            *lines[4:-1], "ZPV|1|VIP|押金^5000".encode()]) + b"\r"
        [ack] = await pair.send([loose])
        assert msa(ack)[1] == "AA"
        warnings = _segments(ack, "ERR")
        assert [(w[2][:8], w[3].split("^")[0], w[4]) for w in warnings] == [
            ("PID^1^33", "102", "W"), ("PV1^1^47", "102", "W")]
        assert "2026-03-01" not in after_header(ack) and "12000" not in after_header(ack)
        stored = intake_db.warnings_of(pair.hospital.controller.store,
                                       f"HIS|{visit.facility}", visit.prefix + "-A01")
        assert [w.split(" ")[0][:9] for w in stored] == ["PID[1]-33", "PV1[1]-47"]
        # The same text in a field that is read (PV1-44, the admission time): refused.
        strict = visit.a01("STRICT-1").replace(b"|20260301083000|\r", b"|2026-03-01 08:30|\r")
        [ack] = await pair.send([strict])
        assert msa(ack)[1] == "AE"
        [err] = _segments(ack, "ERR")
        assert err[2] == "PV1^1^44^1^1" and err[3].startswith("102^") and err[4] == "E"
        assert "HDSD00.13.057 入院日期时间" in err[8] and "2026-03-01" not in err[8]
        assert "Bundle" not in ack.decode()
    finally:
        await pair.stop()


async def test_a_message_not_meant_for_production_is_refused_and_not_kept(
        tmp_path: Path) -> None:
    """MSH-11 (table 0103) says whether a message is production data. A training (T) or
    debugging (D) message from an HIS test environment must never become a claim: it is
    refused with AR, 202 at MSH-11, and nothing of it is stored."""
    pair = await start_intake_pair(tmp_path, tls=False)
    try:
        visit = InpatientVisit()
        store = pair.hospital.controller.store
        for mode, cid in ((b"T", b"T-1"), (b"D", b"D-1"), (b"", b"E-1"), (b"X^T", b"X-1")):
            message = visit.a01(cid.decode()).replace(b"|" + cid + b"|P|2.5|",
                                                      b"|" + cid + b"|" + mode + b"|2.5|")
            [ack] = await pair.send([message])
            [err] = _segments(ack, "ERR")
            assert (msa(ack)[1], err[2], err[3].split("^")[0]) == ("AR", "MSH^1^11^1", "202")
        assert store.hl7_count() == 0 and intake_db.list_records(store) == []
        [ack] = await pair.send([visit.a01()])  # the production message is taken
        assert msa(ack)[1] == "AA"
    finally:
        await pair.stop()
