"""The MLLP framer: bytes in, messages out, no sockets and no HL7 knowledge."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.link.mllp_framer import FrameTooLarge, MissingStartBlock, MLLPFramer, frame

ADT = (
    "MSH|^~\\&|HIS|HOSP-A^2.16.156.10011.1.5^ISO|BRIDGE|HOSP-A|20260301083000+0800||ADT^A01^ADT_A01|"
    "MSG00001|P|2.5||||||UNICODE UTF-8\r"
    "EVN|A01|20260301083000+0800\r"
    "PID|1||1234567^^^HOSP-A^MR||张^三||19800101|M\r"
    "PV1|1|I|W01^101^1\r"
).encode()
ORU = b"MSH|^~\\&|LIS|HOSP-A|BRIDGE|HOSP-A|20260301090000||ORU^R01|LAB-77|P|2.5\rOBX|1|NM|GLU||5.4\r"


def test_whole_in_halves_and_one_byte_at_a_time_give_the_same_message() -> None:
    wire = frame(ADT)
    assert MLLPFramer().feed(wire) == [ADT]
    f = MLLPFramer()
    half = len(wire) // 2
    assert f.feed(wire[:half]) == []
    assert f.in_frame
    assert f.feed(wire[half:]) == [ADT]
    f = MLLPFramer()
    out: list[bytes] = []
    for i in range(len(wire)):
        out += f.feed(wire[i : i + 1])
    assert out == [ADT]
    assert not f.in_frame and f.discarded_bytes == 0


def test_split_between_fs_and_cr_is_not_a_message_yet() -> None:
    wire = frame(ADT)
    f = MLLPFramer()
    assert f.feed(wire[:-1]) == []  # FS arrived, CR not yet
    assert f.feed(wire[-1:]) == [ADT]


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    wire = frame(ADT) + frame(ORU) + frame(ADT)
    assert MLLPFramer().feed(wire) == [ADT, ORU, ADT]


def test_bytes_outside_frames_are_discarded_and_counted() -> None:
    f = MLLPFramer()
    noise = b"\r\nGET / HTTP/1.1\r\n"
    assert f.feed(noise + frame(ADT) + b"xx" + frame(ORU) + b"\x1c\r") == [ADT, ORU]
    assert f.discarded_bytes == len(noise) + 2 + 2


def test_a_new_start_block_abandons_the_partial_frame() -> None:
    f = MLLPFramer()
    assert f.feed(b"\x0bMSH|partial" + frame(ORU)) == [ORU]
    assert f.aborted_frames == 1


def test_fs_not_followed_by_cr_is_content() -> None:
    body = b"MSH|^~\\&|A|B\x1cC"
    assert MLLPFramer().feed(b"\x0b" + body + b"\x1c\r") == [body]
    f = MLLPFramer()
    assert f.feed(b"\x0bMSH|^~\\&|A|B\x1c") == []
    assert f.feed(b"C\x1c\r") == [body]


def test_each_frame_start_is_counted_however_the_bytes_arrive() -> None:
    # A listener times each frame from its start block: a restart (VT inside a frame)
    # and a frame following another in the same chunk are new frames.
    wire = frame(b"MSH|A") + b"\x0bMSH|partial" + frame(b"MSH|B") + b"\x0bMSH|C"
    for size in (len(wire), 7, 1):
        framer = MLLPFramer()
        seen = []
        for i in range(0, len(wire), size):
            framer.feed(wire[i:i + size])
            seen.append(framer.frames_started)
        assert framer.frames_started == 4 and framer.in_frame
        assert seen == sorted(seen)


def test_an_empty_frame_is_a_message_to_answer() -> None:
    # Its sender waits for an answer as for any other frame (the listener refuses it AR).
    f = MLLPFramer()
    assert f.feed(b"\x0b\x1c\r" + frame(ORU)) == [b"", ORU]
    assert f.empty_frames == 1


def _events(wire: bytes, size: int) -> list[object]:
    """Events of ``wire`` fed ``size`` bytes at a time, errors as (type, head)."""
    f = MLLPFramer()
    out: list[object] = []
    for i in range(0, len(wire), size):
        for event in f.events(wire[i:i + size]):
            out.append(event if isinstance(event, bytes) else (type(event), event.head))
    return out


@pytest.mark.parametrize("size", [10_000, 7, 2, 1])
def test_a_message_without_its_start_block_is_an_error_to_answer(size: int) -> None:
    # An HIS that forgets the VT still ends its message and waits for the answer.
    wire = b"\r\n" + ORU + b"\x1c\r" + frame(ADT) + ORU + b"\x1c\r"
    assert _events(wire, size) == [(MissingStartBlock, b"\r\n" + ORU), ADT,
                                   (MissingStartBlock, ORU)]
    error = MLLPFramer().events(ORU + b"\x1c\r")[0]
    assert isinstance(error, MissingStartBlock) and error.ack_code == "AR"
    with pytest.raises(MissingStartBlock):
        MLLPFramer().feed(ORU + b"\x1c\r")


def test_only_the_first_bytes_of_a_message_without_start_block_are_held() -> None:
    f = MLLPFramer()
    for _ in range(100):
        assert f.events(b"OBX|1|ST|X||" + b"y" * 1000 + b"\r") == []
    assert f.holds_unframed
    [error] = f.events(b"\x1c\r")
    assert isinstance(error, MissingStartBlock) and len(error.head) == MLLPFramer.HEAD_BYTES
    assert not f.holds_unframed


def test_framing_the_peer_got_wrong_without_an_answer_is_counted() -> None:
    f = MLLPFramer()
    assert f.events(b"GET / HTTP/1.1\r\n\r\n" + frame(ORU)) == [ORU]
    assert f.unframed_dropped == 1
    assert f.events(b"\r\n\x1c\r") == []  # an end block with nothing before it
    assert f.stray_end_blocks == 1 and f.unframed_messages == 0
    assert f.events(b"\x1c") == [] and f.events(b"\x0b") == []  # a lone FS, then a frame
    assert f.unframed_dropped == 2


def test_oversized_frame_raises_then_resynchronises_on_the_next_start_block() -> None:
    f = MLLPFramer(max_message_bytes=len(ORU))
    big = frame(ORU + b"OBX|2|NM|GLU||5.5\r")
    with pytest.raises(FrameTooLarge) as info:
        f.feed(frame(ORU) + big + frame(ORU))
    err = info.value
    assert err.messages == [ORU]  # what completed before the oversized frame
    assert err.head.startswith(b"MSH|") and err.ack_code == "AR"
    assert f.feed(b"") == [ORU]  # what followed it
    assert f.oversized_frames == 1
    assert f.buffered == 0


def test_oversized_frame_is_detected_before_it_ends_and_memory_stays_bounded() -> None:
    f = MLLPFramer(max_message_bytes=100)
    events = f.events(b"\x0b" + b"A" * 60)
    assert events == []
    events = f.events(b"B" * 60)
    assert len(events) == 1 and isinstance(events[0], FrameTooLarge)
    assert f.buffered == 0
    # The rest of the oversized frame is dropped up to its end block: it was answered.
    assert f.events(b"C" * 500 + b"\x1c\r") == []
    assert f.unframed_messages == 0 and f.stray_end_blocks == 0
    assert f.events(frame(b"MSH|ok")) == [b"MSH|ok"]


def test_oversized_frame_byte_by_byte_gives_one_error() -> None:
    f = MLLPFramer(max_message_bytes=10)
    events = []
    for b in frame(ORU) + frame(b"MSH|small"):
        events += f.events(bytes([b]))
    assert [type(e) for e in events] == [FrameTooLarge, bytes]
    assert events[1] == b"MSH|small"


@given(st.lists(st.binary(min_size=1, max_size=200).filter(lambda b: b"\x0b" not in b and b"\x1c" not in b),
                min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
def test_any_chunking_yields_the_same_messages(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(m) for m in messages)
    f = MLLPFramer()
    out: list[bytes] = []
    i = 0
    for size in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        out += f.feed(wire[i : i + size])
        i += size
    out += f.feed(wire[i:])
    assert out == messages


def test_frame_refuses_content_that_would_break_framing() -> None:
    with pytest.raises(ValueError):
        frame(b"MSH|\x0b")
    with pytest.raises(ValueError):
        frame(b"MSH|\x1c\r")


def test_framer_module_is_free_of_io_imports() -> None:
    code = (
        "import sys, bridge.link.mllp_framer\n"
        "bad = {'asyncio', 'aiohttp', 'ssl', 'sqlite3', 'bridge.mapping'} & set(sys.modules)\n"
        "print(sorted(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@given(st.lists(st.tuples(st.booleans(),
                          st.binary(min_size=1, max_size=200).filter(
                              lambda b: b"\x0b" not in b and b"\x1c" not in b and b.strip())),
                min_size=1, max_size=5),
       st.integers(min_value=1, max_value=50))
def test_messages_with_and_without_start_block_come_out_the_same_in_any_chunks(
    messages: list[tuple[bool, bytes]], size: int
) -> None:
    wire = b"".join(frame(m) if framed else m + b"\x1c\r" for framed, m in messages)
    expected = [m if framed else (MissingStartBlock, m) for framed, m in messages]
    assert _events(wire, size) == expected
    assert _events(wire, len(wire)) == expected
