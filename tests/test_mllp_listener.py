"""The MLLP listener of a running bridge: real sockets on 127.0.0.1, real TLS, real SQLite."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from e2e_support import client_ssl, make_workdir
from hl7_feeds import InpatientVisit
from leaving_support import WAYS, leave

from bridge.config import load_config
from bridge.demo import HOSPITAL
from bridge.errors import ConfigError, MappingError, ParseError
from bridge.ledger import intake as intake_db
from bridge.ledger.sqlite import SQLiteStore
from bridge.link.mllp import HeaderOnlyHandler, HL7Handler, default_handler
from bridge.link.mllp_framer import MLLPFramer, frame
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.mapping.hl7v2 import Intake
from bridge.mapping.hl7v2.header import MSHHeader, read_msh
from bridge.trust.pki import init_dev_pki

ADT = (
    "MSH|^~\\&|HIS|HOSP-A|BRIDGE|HOSP-A|20260301083000+0800||ADT^A01^ADT_A01|MSG00001|P|2.5"
    "||||||UNICODE UTF-8\r"
    "EVN|A01|20260301083000+0800\r"
    "PID|1||1234567^^^HOSP-A^MR||张^三||19800101|M\r"
    "PV1|1|I|W01^101^1\r"
).encode()


def adt(control_id: str, *, facility: str = "HOSP-A", extra: str = "") -> bytes:
    return (
        ADT.replace(b"MSG00001", control_id.encode()).replace(
            b"|HIS|HOSP-A|", f"|HIS|{facility}|".encode()
        )
        + extra.encode()
    )


@dataclass
class Bridge:
    root: Path
    service: BridgeService

    @property
    def port(self) -> int:
        assert self.service.mllp_port is not None
        return self.service.mllp_port

    @property
    def store(self) -> SQLiteStore:
        return self.service.controller.store

    def actions(self) -> list[str]:
        return [e.record.action for e in self.store.audit_entries()]


async def start_bridge(root: Path, mllp: str | None) -> Bridge:
    hospital_cfg, _ = make_workdir(root)
    if mllp is not None:
        with hospital_cfg.open("a", encoding="utf-8") as fh:
            fh.write("\n[mllp]\n" + mllp)
    service = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await service.start()
    return Bridge(root, service)


PLAIN = 'host = "127.0.0.1"\nport = 0\ntls = false\nmax_message_bytes = 4096\n'


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    b = await start_bridge(tmp_path, PLAIN)
    # Listener semantics, whichever message types the HL7 v2 room maps: the messages
    # are stored unmapped. The room itself is exercised by the tests at the end.
    assert b.service.mllp is not None
    b.service.mllp.handler = HeaderOnlyHandler()
    try:
        yield b
    finally:
        await b.service.stop()


async def exchange(
    port: int,
    chunks: list[bytes],
    expect: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    pause: float = 0.0,
) -> list[bytes]:
    """Write ``chunks`` as separate TCP writes; read until ``expect`` ACK frames arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        framer = MLLPFramer()
        acks: list[bytes] = []
        while len(acks) < expect:
            data = await asyncio.wait_for(reader.read(65536), timeout=10)
            if not data:
                break
            acks += framer.feed(data)
        return acks
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def seg(ack: bytes, name: str) -> list[str]:
    for s in ack.decode().split("\r"):
        if s.startswith(name + "|"):
            return s.split("|")
    raise AssertionError(f"no {name} segment in ACK")


async def test_message_is_acknowledged_after_it_is_stored(bridge: Bridge) -> None:
    [ack] = await exchange(bridge.port, [frame(ADT)], 1)
    assert seg(ack, "MSA")[1:3] == ["AA", "MSG00001"]
    row = bridge.store.hl7_lookup("HIS|HOSP-A", "MSG00001")
    assert row is not None and row.message == ADT and row.ack == ack
    assert bridge.store.hl7_count() == 1
    receive = [e for e in bridge.store.audit_entries() if e.record.action == "hl7.receive"]
    assert len(receive) == 1 and receive[0].seq == row.audit_seq
    assert bridge.store.verify_audit().ok


async def test_repeat_gets_the_original_ack_byte_for_byte_and_is_stored_once(
    bridge: Bridge,
) -> None:
    [first] = await exchange(bridge.port, [frame(ADT)], 1)
    await asyncio.sleep(0.01)  # a later clock: a freshly built ACK would differ
    [again] = await exchange(bridge.port, [frame(ADT)], 1)
    assert again == first
    assert bridge.store.hl7_count() == 1
    assert bridge.actions().count("hl7.duplicate") == 1


async def test_same_control_id_with_other_content_is_refused(bridge: Bridge) -> None:
    await exchange(bridge.port, [frame(ADT)], 1)
    [ack] = await exchange(bridge.port, [frame(adt("MSG00001", extra="PV2|1\r"))], 1)
    assert seg(ack, "MSA")[1:3] == ["AE", "MSG00001"]
    err = seg(ack, "ERR")
    assert err[2] == "MSH^1^10^1" and err[3].startswith("205^")
    assert "different content" in err[8]
    assert bridge.store.hl7_count() == 1
    row = bridge.store.hl7_lookup("HIS|HOSP-A", "MSG00001")
    assert row is not None and row.message == ADT


async def test_same_control_id_from_another_sender_is_another_message(bridge: Bridge) -> None:
    acks = await exchange(bridge.port, [frame(ADT) + frame(adt("MSG00001", facility="HOSP-B"))], 2)
    assert [seg(a, "MSA")[1] for a in acks] == ["AA", "AA"]
    assert bridge.store.hl7_count() == 2


async def test_unparseable_bytes_get_ar_with_err_and_nothing_is_stored(bridge: Bridge) -> None:
    [ack] = await exchange(bridge.port, [frame(b"this is not HL7 at all")], 1)
    assert seg(ack, "MSA")[1] == "AR"
    err = seg(ack, "ERR")
    assert err[3].startswith("100^") and "MSH" in err[8]
    assert "not HL7" not in ack.decode()
    [ack] = await exchange(bridge.port, [frame(adt(""))], 1)
    assert seg(ack, "MSA")[1] == "AR" and seg(ack, "ERR")[2] == "MSH^1^10^1"
    assert bridge.store.hl7_count() == 0
    assert bridge.actions() == ["hl7.reject", "hl7.reject"]


@pytest.mark.parametrize("wire", [
    pytest.param(b"\x0b\x1c\r", id="empty frame"),
    pytest.param(b"\x0b \r\n\x1c\r", id="whitespace-only frame"),
])
async def test_a_frame_without_a_message_gets_ar_with_err_and_a_log_line(
    bridge: Bridge, caplog: pytest.LogCaptureFixture, wire: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    acks = await exchange(bridge.port, [wire + frame(adt("NEXT-1"))], 2)
    assert seg(acks[0], "MSA")[1:3] == ["AR", ""]
    err = seg(acks[0], "ERR")
    assert err[3].startswith("100^") and "MSH" in err[8]
    assert seg(acks[1], "MSA")[1:3] == ["AA", "NEXT-1"]  # the connection carries on in step
    assert bridge.actions() == ["hl7.reject", "hl7.receive"]
    assert any("HL7 message refused" in r.getMessage() for r in caplog.records)


async def test_a_message_without_its_start_block_gets_ar_naming_the_framing(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    unframed = adt("NOVT-1") + b"\x1c\r"
    acks = await exchange(bridge.port, [unframed + frame(adt("NEXT-2"))], 2)
    assert seg(acks[0], "MSA")[1:3] == ["AR", "NOVT-1"]
    err = seg(acks[0], "ERR")
    assert err[7] == "mllp-no-start-block" and "start block" in err[8]
    assert seg(acks[1], "MSA")[1:3] == ["AA", "NEXT-2"]
    assert bridge.store.hl7_lookup("HIS|HOSP-A", "NOVT-1") is None
    rejects = [e.record for e in bridge.store.audit_entries() if e.record.action == "hl7.reject"]
    assert [r.detail for r in rejects] == ["mllp-no-start-block@MLLP frame"]
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.mllp"]
    assert any("HL7 message refused" in m and "start block" in m for m in lines)
    assert not any("张" in m or "1234567" in m for m in lines)


async def test_framing_that_cannot_be_answered_is_logged_never_its_bytes(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    # A frame abandoned by a new start block, bytes with neither start nor end block,
    # an end block after nothing: none of them is a message the peer waits on.
    wire = (b"\x0b" + adt("LOST-1")[:40] + frame(adt("OK-1")) + adt("LOST-2") + b"\r\n"
            + frame(adt("OK-2")) + b"\r\x1c\r")
    acks = await exchange(bridge.port, [wire], 2)
    assert [seg(a, "MSA")[1:3] for a in acks] == [["AA", "OK-1"], ["AA", "OK-2"]]
    # A frame, and then bytes outside any, the peer closes without ending.
    for tail in (b"\x0b" + adt("CUT-1")[:60], adt("CUT-2")):
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(tail)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
    await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.mllp"]
    warned = "\n".join(m for m in lines if "MLLP connection" in m)
    assert "frame(s) abandoned by a new start block" in warned
    assert "run(s) of bytes outside any frame dropped" in warned
    assert "end block(s) (FS CR) outside any frame ignored" in warned
    assert "closed by the peer with a frame not ended" in warned
    assert "closed by the peer after bytes outside any frame" in warned
    assert not any(x in warned for x in ("LOST", "CUT", "张", "HOSP-A", "MSH"))
    assert bridge.store.hl7_count() == 2


async def test_message_split_over_many_tcp_writes(bridge: Bridge) -> None:
    wire = frame(adt("SPLIT-1"))
    chunks = [wire[i : i + 7] for i in range(0, len(wire), 7)]
    [ack] = await exchange(bridge.port, chunks, 1, pause=0.002)
    assert seg(ack, "MSA")[1:3] == ["AA", "SPLIT-1"]
    stored = bridge.store.hl7_lookup("HIS|HOSP-A", "SPLIT-1")
    assert stored is not None and stored.message == adt("SPLIT-1")


async def test_two_messages_in_one_write_get_two_acks_in_order(bridge: Bridge) -> None:
    wire = b"".join(frame(adt(f"ORDER-{i}")) for i in range(5))
    acks = await exchange(bridge.port, [wire], 5)
    assert [seg(a, "MSA")[2] for a in acks] == [f"ORDER-{i}" for i in range(5)]
    assert bridge.store.hl7_count() == 5


async def test_half_closed_client_still_gets_its_acks(bridge: Bridge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(frame(adt("EOF-1")) + frame(adt("EOF-2")))
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), timeout=10)  # until the bridge closes
    writer.close()
    acks = MLLPFramer().feed(data)
    assert [seg(a, "MSA")[1:3] for a in acks] == [["AA", "EOF-1"], ["AA", "EOF-2"]]


async def test_oversized_frame_gets_ar_and_the_connection_carries_on(bridge: Bridge) -> None:
    big = adt("BIG-1", extra="NTE|1||" + "x" * 5000 + "\r")
    acks = await exchange(bridge.port, [frame(big) + frame(adt("SMALL-1"))], 2)
    assert seg(acks[0], "MSA")[1:3] == ["AR", "BIG-1"]
    assert seg(acks[1], "MSA")[1:3] == ["AA", "SMALL-1"]
    assert bridge.store.hl7_count() == 1


@pytest.mark.parametrize(("field", "sent", "held"), [
    ("10", b"|MSG00001|", b"|MSG00001\x1c|"),
    ("12", b"|P|2.5|", b"|P|2.5\x1c|"),
    ("4", b"|HIS|HOSP-A|", b"|HIS|HOSP-A\x1c|"),
    ("3", b"|HIS|HOSP-A|", b"|\x1cHIS|HOSP-A|"),
])
async def test_msh_field_holding_a_framing_byte_is_refused_ar_and_always_answered(
    bridge: Bridge, field: str, sent: bytes, held: bytes
) -> None:
    # An FS not followed by CR is content to the framer; the ACK echoes MSH fields, so
    # the message is refused before anything is stored, and the answer can be framed.
    message = ADT.replace(sent, held, 1)
    for _ in range(2):  # a resend is answered the same way
        [ack] = await exchange(bridge.port, [frame(message)], 1)
        assert b"\x1c" not in ack and b"\x0b" not in ack
        assert seg(ack, "MSA")[1] == "AR"
        assert seg(ack, "ERR")[2] == f"MSH^1^{field}^1" and seg(ack, "ERR")[3].startswith("102^")
    if field == "10":
        assert seg(ack, "MSA")[2] == "MSG00001\\X1C\\"
        assert seg(ack, "MSH")[9] == "ACKMSG00001\\X1C\\"
    assert bridge.store.hl7_count() == 0
    [ok] = await exchange(bridge.port, [frame(adt("AFTER-1"))], 1)
    assert seg(ok, "MSA")[1:3] == ["AA", "AFTER-1"]


async def test_an_answer_that_cannot_be_framed_closes_the_connection_saying_why(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    listener = bridge.service.mllp
    assert listener is not None

    async def unframeable(event: object, peer: str) -> bytes:
        return b"MSH|^~\\&|B|H\rMSA|AA|\x1c\r"

    listener.handle = unframeable  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(frame(ADT))
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, not hung
    finally:
        writer.close()
    reasons = [r.getMessage() for r in caplog.records if r.name == "bridge.mllp"]
    assert any("closed: the answer could not be built (ValueError)" in m for m in reasons)
    assert not any("张" in m or "MSG00001" in m for m in reasons)


async def _header_only_bridge(root: Path, extra: str) -> Bridge:
    b = await start_bridge(root, PLAIN + extra)
    assert b.service.mllp is not None
    b.service.mllp.handler = HeaderOnlyHandler()
    return b


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the bridge closes the connection within ``seconds`` (reading ACKs away)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout=seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


@pytest.mark.parametrize("how", ["whole", "trickle", "restart"])
async def test_a_frame_not_ended_in_time_is_dropped_and_the_connection_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    b = await _header_only_bridge(tmp_path, "frame_timeout_seconds = 0.5\n")
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        loop = asyncio.get_running_loop()
        began = loop.time()
        partial = frame(adt("SLOW-1"))[:-2]  # no end block
        if how == "trickle":  # a byte at a time keeps the line busy, not the frame alive
            for i in range(8):
                writer.write(partial[i:i + 1])
                await asyncio.sleep(0.1)
            partial = partial[8:]
        if how == "restart":
            # A start block abandoning the unended frame does not start the clock again:
            # restarting it every 0.2 s for 4 s, the peer is cut off after about 0.5 s.
            closed = False
            while not closed and loop.time() - began < 4:
                writer.write(partial)
                closed = await _closed_within(reader, 0.2)
            assert closed and loop.time() - began < 2.5, loop.time() - began
        else:
            writer.write(partial)
            assert await _closed_within(reader, 10)
        assert loop.time() - began >= 0.5
        writer.close()
        assert b.store.hl7_count() == 0
        reasons = [r.getMessage() for r in caplog.records if r.name == "bridge.mllp"]
        assert any("a frame was not ended within 0.5 s" in m for m in reasons)
        assert not any("SLOW-1" in m or "张" in m for m in reasons)
        [ack] = await exchange(b.port, [frame(adt("FAST-1"))], 1)  # others carry on
        assert seg(ack, "MSA")[1:3] == ["AA", "FAST-1"]
    finally:
        await b.service.stop()


async def test_a_connection_idle_between_messages_stays_open_by_default(tmp_path: Path) -> None:
    b = await _header_only_bridge(tmp_path, "frame_timeout_seconds = 0.3\n")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        framer = MLLPFramer()
        for n in range(2):
            writer.write(frame(adt(f"IDLE-{n}")))
            [ack] = framer.feed(await asyncio.wait_for(reader.read(65536), timeout=10))
            assert seg(ack, "MSA")[1:3] == ["AA", f"IDLE-{n}"]
            # Longer than the frame timeout, with no frame in progress: kept open.
            assert not await _closed_within(reader, 1.0)
        writer.close()
    finally:
        await b.service.stop()


async def test_a_connection_idle_past_the_idle_timeout_is_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = await _header_only_bridge(tmp_path, "idle_timeout_seconds = 0.5\n")
    caplog.set_level(logging.INFO, logger="bridge.mllp")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        framer = MLLPFramer()
        loop = asyncio.get_running_loop()
        for n in range(3):  # messages closer together than the timeout keep it open
            writer.write(frame(adt(f"BUSY-{n}")))
            [ack] = framer.feed(await asyncio.wait_for(reader.read(65536), timeout=10))
            assert seg(ack, "MSA")[1] == "AA"
            await asyncio.sleep(0.25)
        answered = loop.time()
        assert await _closed_within(reader, 10)
        assert loop.time() - answered >= 0.2
        writer.close()
        assert any("idle for 0.5 s" in r.getMessage() for r in caplog.records)
    finally:
        await b.service.stop()


@pytest.mark.parametrize("line", [
    "frame_timeout_seconds = 0", "frame_timeout_seconds = -1", "frame_timeout_seconds = 7200",
    "idle_timeout_seconds = -5", 'idle_timeout_seconds = "long"',
])
def test_timeouts_out_of_range_are_config_errors_naming_file_and_key(
    tmp_path: Path, line: str
) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write("\n[mllp]\n" + PLAIN + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(hospital_cfg)
    key = line.split(" ", 1)[0]
    assert str(hospital_cfg) in str(info.value.location)
    assert f"mllp.{key}" in str(info.value.location)


async def test_store_that_cannot_commit_gets_no_aa(bridge: Bridge) -> None:
    # The commit itself fails (after the audit append and the ACK were built).
    raw = sqlite3.connect(bridge.store.path)
    raw.execute(
        "CREATE TRIGGER hl7_full BEFORE INSERT ON hl7_inbox"
        " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    raw.commit()
    raw.close()
    [ack] = await exchange(bridge.port, [frame(adt("LOST-1"))], 1)
    assert seg(ack, "MSA")[1] == "AE" and seg(ack, "ERR")[3].startswith("207^")
    assert bridge.store.hl7_count() == 0
    assert "hl7.receive" not in bridge.actions()  # rolled back with the row


async def test_closed_store_gets_no_aa(bridge: Bridge) -> None:
    bridge.store.close()
    [ack] = await exchange(bridge.port, [frame(adt("LOST-2"))], 1)
    assert seg(ack, "MSA")[1] == "AE" and seg(ack, "ERR")[3].startswith("207^")
    with SQLiteStore(bridge.store.path) as reopened:
        assert reopened.hl7_count() == 0


class _MappingFails(HeaderOnlyHandler):
    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        raise MappingError("date of birth is not a valid date", location="PID-7")


async def test_mapping_error_gives_ae_naming_the_field_without_its_value(bridge: Bridge) -> None:
    assert bridge.service.mllp is not None
    bridge.service.mllp.handler = _MappingFails()
    [ack] = await exchange(bridge.port, [frame(ADT)], 1)
    assert seg(ack, "MSA")[1:3] == ["AE", "MSG00001"]
    err = seg(ack, "ERR")
    assert err[2] == "PID^1^7^1" and "PID-7" in err[8]
    assert "19800101" not in ack.decode() and "张" not in ack.decode()
    assert bridge.store.hl7_count() == 0


class _Explodes(HeaderOnlyHandler):
    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        raise KeyError("PID-5 value 张三")


async def test_handler_bug_gives_ae_207_and_no_value(bridge: Bridge) -> None:
    assert bridge.service.mllp is not None
    bridge.service.mllp.handler = _Explodes()
    [ack] = await exchange(bridge.port, [frame(ADT)], 1)
    assert seg(ack, "MSA")[1] == "AE" and seg(ack, "ERR")[3].startswith("207^")
    assert "张" not in ack.decode()
    assert bridge.store.hl7_count() == 0


async def test_facility_outside_the_allow_list_gets_ar(tmp_path: Path) -> None:
    b = await start_bridge(tmp_path, PLAIN + 'allowed_facilities = ["HOSP-A"]\n')
    assert b.service.mllp is not None
    b.service.mllp.handler = HeaderOnlyHandler()
    try:
        other = adt("FAC-1", facility="CLINIC-X^1.2.3^ISO")
        mine = adt("FAC-2", facility="HOSP-A^2.16.156.10011.1.5^ISO")
        acks = await exchange(b.port, [frame(other) + frame(mine)], 2)
        assert seg(acks[0], "MSA")[1] == "AR" and seg(acks[0], "ERR")[2] == "MSH^1^4^1"
        assert seg(acks[1], "MSA")[1] == "AA"
        assert b.store.hl7_count() == 1
        reject = [e for e in b.store.audit_entries() if e.record.action == "hl7.reject"]
        assert reject[0].record.outcome == "denied"
    finally:
        await b.service.stop()


# --- TLS -------------------------------------------------------------------------------------

TLS = 'host = "127.0.0.1"\nport = 0\ntls = true\n'


@pytest.fixture
async def tls_bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    b = await start_bridge(tmp_path, TLS)
    assert b.service.mllp is not None
    b.service.mllp.handler = HeaderOnlyHandler()
    try:
        yield b
    finally:
        await b.service.stop()


async def test_tls_client_with_a_valid_certificate_is_acknowledged(tls_bridge: Bridge) -> None:
    ctx = client_ssl(tls_bridge.root, HOSPITAL)  # the hospital's own HIS
    [ack] = await exchange(tls_bridge.port, [frame(ADT)], 1, ssl_context=ctx)
    assert seg(ack, "MSA")[1:3] == ["AA", "MSG00001"]
    assert tls_bridge.store.hl7_count() == 1


@pytest.mark.parametrize("who", ["insurer-b", "clinic-x"])
async def test_a_partner_certificate_cannot_inject_hl7(tls_bridge: Bridge, who: str) -> None:
    """A certificate from the trusted CA issued to someone else (a partner, an
    unregistered party) gets no acknowledgement, nothing is stored, and it is audited."""
    try:
        acks = await exchange(
            tls_bridge.port, [frame(ADT)], 1, ssl_context=client_ssl(tls_bridge.root, who)
        )
    except (ConnectionError, ssl.SSLError, OSError):
        acks = []
    assert acks == []
    assert tls_bridge.store.hl7_count() == 0
    for _ in range(200):
        if "mllp.refused" in tls_bridge.actions():
            break
        await asyncio.sleep(0.02)
    refused = [
        e.record for e in tls_bridge.store.audit_entries() if e.record.action == "mllp.refused"
    ]
    assert refused and refused[0].outcome == "denied"


def _send_and_leave(port: int, ctx: ssl.SSLContext, message: bytes, way: str) -> None:
    """Send one whole framed message at once after the handshake and go away ``way``
    without reading the ACK."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        tls.sendall(frame(message))
        leave(tls, way)


async def test_tls_messages_sent_before_leaving_are_taken_once_when_sent_again(
    tls_bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender that leaves without its ACK sends the message again: the first copy is
    stored whole or not at all, the second gets AA, and each message is stored once."""
    ctx = client_ssl(tls_bridge.root, HOSPITAL)
    ways = list(WAYS) * 4
    messages = [adt(f"LEFT{n:04d}") for n in range(len(ways))]
    await asyncio.gather(*(asyncio.to_thread(_send_and_leave, tls_bridge.port, ctx, m, way)
                           for m, way in zip(messages, ways, strict=True)))
    await asyncio.sleep(0.3)
    for n, message in enumerate(messages):
        [ack] = await exchange(tls_bridge.port, [frame(message)], 1, ssl_context=ctx)
        assert seg(ack, "MSA")[1:3] == ["AA", f"LEFT{n:04d}"]
    assert tls_bridge.store.hl7_count() == len(messages)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def _refused(bridge: Bridge, ctx: ssl.SSLContext) -> None:
    try:
        acks = await exchange(bridge.port, [frame(ADT)], 1, ssl_context=ctx)
    except (ConnectionError, ssl.SSLError, OSError):
        acks = []
    assert acks == []
    for _ in range(200):
        if "tls.refused" in bridge.actions():
            break
        await asyncio.sleep(0.02)
    refusals = [e for e in bridge.store.audit_entries() if e.record.action == "tls.refused"]
    assert refusals and refusals[0].record.outcome == "denied"
    assert bridge.store.hl7_count() == 0


async def test_tls_client_without_certificate_is_refused_and_audited(tls_bridge: Bridge) -> None:
    await _refused(tls_bridge, client_ssl(tls_bridge.root, None))


async def test_tls_client_from_another_ca_is_refused_and_audited(
    tls_bridge: Bridge, tmp_path: Path
) -> None:
    other = init_dev_pki(tmp_path / "other-pki", [HOSPITAL])
    ctx = ssl.create_default_context(cafile=str(tls_bridge.root / "pki" / "ca.pem"))
    files = other.controllers[HOSPITAL]
    ctx.load_cert_chain(files.tls_cert, files.tls_key)
    await _refused(tls_bridge, ctx)


async def test_plain_client_on_the_tls_port_gets_nothing(tls_bridge: Bridge) -> None:
    try:
        acks = await exchange(tls_bridge.port, [frame(ADT)], 1)
    except (ConnectionError, OSError):
        acks = []
    assert acks == []
    assert tls_bridge.store.hl7_count() == 0


# --- configuration ---------------------------------------------------------------------------


async def test_without_an_mllp_section_nothing_else_listens(tmp_path: Path) -> None:
    b = await start_bridge(tmp_path, None)
    try:
        assert b.service.mllp is None and b.service.mllp_port is None
        assert b.service.controller.config.mllp is None
    finally:
        await b.service.stop()


def test_plaintext_mllp_on_a_public_address_is_a_config_error(tmp_path: Path) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write('\n[mllp]\nhost = "0.0.0.0"\ntls = false\n')
    with pytest.raises(ConfigError) as info:
        load_config(hospital_cfg)
    assert "mllp" in str(info.value.location)


# --- wiring to the HL7 v2 room -----------------------------------------------------------------


class _RecordHandler(HeaderOnlyHandler):
    """Maps every message to a fixed front-sheet record; refuses one without PID."""

    def prepare(self, message: bytes, header: MSHHeader) -> Intake:
        if b"PID|" not in message:
            raise ParseError("required segment missing", location="PID", hl7_code="100")
        return Intake(message=None, message_type=header.type_and_event,
                      record={"dataset": "WS445.10",
                              "elements": {"HDSD00.11.048": "110101198001010011"}},
                      visit=None, part=None, facility=header.facility_id)


async def test_handler_record_is_stored_and_audited_with_a_pseudonym(bridge: Bridge) -> None:
    assert bridge.service.mllp is not None
    bridge.service.mllp.handler = _RecordHandler()
    no_pid = adt("NOPID-1").replace(
        b"PID|1||1234567^^^HOSP-A^MR||\xe5\xbc\xa0^\xe4\xb8\x89||19800101|M\r", b""
    )
    acks = await exchange(bridge.port, [frame(ADT) + frame(no_pid)], 2)
    assert seg(acks[0], "MSA")[1:3] == ["AA", "MSG00001"]
    row = bridge.store.hl7_lookup("HIS|HOSP-A", "MSG00001")
    assert row is not None and row.record is not None
    assert orjson.loads(row.record)["dataset"] == "WS445.10"
    [receive] = [e for e in bridge.store.audit_entries() if e.record.action == "hl7.receive"]
    assert receive.record.patient is not None and receive.record.patient.startswith("pp:")
    assert "WS445.10" in receive.record.categories
    # Refused by the handler's parser: answered from what MSH says, naming the segment.
    assert seg(acks[1], "MSA")[1:3] == ["AR", "NOPID-1"]
    assert seg(acks[1], "ERR")[2] == "PID^1" and seg(acks[1], "ERR")[3].startswith("100^")
    assert bridge.store.hl7_count() == 1


def test_the_default_handler_is_the_hl7v2_room() -> None:
    assert isinstance(default_handler(), HL7Handler)


async def test_real_room_unsupported_message_type_gets_ar_200_naming_msh9(tmp_path: Path) -> None:
    b = await start_bridge(tmp_path, PLAIN)
    try:
        zzz = adt("ZZZ-1").replace(b"ADT^A01^ADT_A01", b"ZZZ^Z99")
        [ack] = await exchange(b.port, [frame(zzz)], 1)
        assert seg(ack, "MSA")[1:3] == ["AR", "ZZZ-1"]
        err = seg(ack, "ERR")
        assert err[2].startswith("MSH^1^9") and err[3].startswith("200^")
        assert "张" not in ack.decode() and "19800101" not in ack.decode()
        assert b.store.hl7_count() == 0
        [reject] = [e for e in b.store.audit_entries() if e.record.action == "hl7.reject"]
        assert reject.record.detail is not None and reject.record.detail.startswith(
            "mapping-error@MSH"
        )
    finally:
        await b.service.stop()


async def test_real_room_unreadable_message_gets_ar(tmp_path: Path) -> None:
    b = await start_bridge(tmp_path, PLAIN)
    try:
        broken = b"MSH|^~\\&|HIS|HOSP-A|B|C|2026||ADT^A01|BAD-1|P|2.5||||||GB 18030-2000\rPID|1||"
        [ack] = await exchange(b.port, [frame(broken + b"\xff\xff\r")], 1)
        assert seg(ack, "MSA")[1:3] == ["AR", "BAD-1"]
        err = seg(ack, "ERR")
        assert err[2].startswith("PID^1^3") and err[3].endswith("^HL70357")
        assert b.store.hl7_count() == 0
    finally:
        await b.service.stop()


@pytest.mark.parametrize("facility", ["东莞市人民医院", "東莞市人民醫院"])
async def test_real_room_takes_gbk_whatever_bytes_its_characters_are_made_of(
    tmp_path: Path, facility: str
) -> None:
    # In GBK 東 is 96 7C: its trail byte is the field separator. Simplified or
    # traditional, the message is the same to the HIS and gets the same answer.
    assert ("東".encode("gbk")[1:] == b"|") and b"|" not in "东".encode("gbk")
    visit = InpatientVisit(facility=f"{facility}^47011235-7^L")
    message = visit.a01(cid="GBK-1").decode("utf-8").replace("UNICODE UTF-8", "GBK")
    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        [ack] = await exchange(b.port, [frame(message.encode("gbk"))], 1)
        segments = ack.decode("gbk").split("\r")
        msa = next(s for s in segments if s.startswith("MSA|")).split("|")
        assert msa[1:3] == ["AA", "GBK-1"], segments
        assert segments[0].split("|")[5] == f"{facility}^47011235-7^L"  # MSH-6 = their MSH-4
        row = b.store.hl7_lookup(f"HIS|{facility}^47011235-7^L", "GBK-1")
        assert row is not None and row.record is not None
    finally:
        await b.service.stop()


async def test_real_room_reads_hex_and_formatting_escapes_and_refuses_others_ae(
    tmp_path: Path,
) -> None:
    # PID-5 as some HIS write it: 王 as hex data in the message's UTF-8, the given
    # name with highlighting around one character.
    read = InpatientVisit(family="\\XE78E8B\\", given="\\H\\建\\N\\国").a01(cid="ESC-1")
    unreadable = InpatientVisit(family="\\Z42\\王", prefix="V2").a01(cid="ESC-2")
    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        ok, refused = await exchange(b.port, [frame(read) + frame(unreadable)], 2)
        assert seg(ok, "MSA")[1:3] == ["AA", "ESC-1"]
        [visit] = intake_db.list_visits(b.store)
        [part] = intake_db.visit_parts(b.store, visit.id)
        assert part.elements["HDSD00.11.110"] == "王建国"
        assert seg(refused, "MSA")[1:3] == ["AE", "ESC-2"]
        err = seg(refused, "ERR")
        assert err[2].startswith("PID^1^5") and err[3].startswith("102^")
        assert "Z42" not in refused.decode() and "王" not in refused.decode()
        assert b.store.hl7_lookup(f"HIS|{visit_facility()}", "ESC-2") is None
    finally:
        await b.service.stop()


def visit_facility() -> str:
    return InpatientVisit().facility


GOLDEN = Path(__file__).parent / "golden" / "hl7v2"


async def test_real_room_maps_stores_and_refuses_a_bad_field_without_its_value(
    tmp_path: Path,
) -> None:
    raw = (GOLDEN / "adt_a01-01.hl7").read_bytes()
    expected = orjson.loads((GOLDEN / "adt_a01-01.expected.json").read_bytes())
    pid = next(
        line for line in raw.replace(b"\r\n", b"\r").split(b"\r") if line.startswith(b"PID|")
    )
    birth = pid.split(b"|")[7]
    header = read_msh(raw)
    bad = raw.replace(pid, pid.replace(b"|" + birth + b"|", b"|" + birth[:4] + b"XX|"), 1)
    bad = bad.replace(f"|{header.control_id}|".encode(), b"|BAD-DOB|", 1)
    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        ok, refused = await exchange(b.port, [frame(raw) + frame(bad)], 2)
        assert seg(ok, "MSA")[1:3] == ["AA", header.control_id]
        row = b.store.hl7_lookup(header.sender, header.control_id)
        assert row is not None and row.record is not None and orjson.loads(row.record) == expected
        assert seg(refused, "MSA")[1:3] == ["AE", "BAD-DOB"]
        err = seg(refused, "ERR")
        assert err[2].startswith("PID^1^7") and err[3].startswith("102^")
        assert birth[:4] + b"XX" not in refused
        assert b.store.hl7_count() == 1
    finally:
        await b.service.stop()
