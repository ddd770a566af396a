"""A field sent with very many repetitions costs work in proportion to its size.

An HIS (or a faulty interface engine) can repeat PID-3 thousands of times within the
listener's size limit. Reading such a message must stay linear in its size: the
mapping rules that pick one repetition (PID-3 of type MR, of type NNCHN) and the
conditions that test every repetition read the field one repetition at a time.
Speed itself is measured in bench/; these tests compare two sizes of the same message
with a factor generous enough for a shared host, and pin that the answer is the same.
"""

from __future__ import annotations

import time

from hl7_feeds import InpatientVisit

from bridge.mapping.hl7v2 import default_reader, parse_hl7

#: One extra PID-3 repetition: a hospital number of type MR, as the real one is.
EXTRA_ID = "X{n}^^^滨江一院^MR~"


def with_identifiers(count: int, *, cid: str = "REPS-1") -> bytes:
    """An admission whose PID-3 carries ``count`` extra identifiers before its own."""
    message = InpatientVisit().a01(cid)
    extra = "".join(EXTRA_ID.format(n=n) for n in range(count)).encode("utf-8")
    return message.replace(b"^NNCHN~", b"^NNCHN~" + extra, 1)


def _seconds(message: bytes, runs: int) -> float:
    reader = default_reader()
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        reader.intake(message, sender="HIS|H")
        best = min(best, time.perf_counter() - began)
        if best > 5:  # quadratic: no need to wait for more runs to know
            break
    return best


def test_reading_a_field_of_many_repetitions_is_linear_in_their_number() -> None:
    small, large = with_identifiers(1_000), with_identifiers(8_000)
    _seconds(small, 1)  # the definitions check remembers faultless texts: warm both
    _seconds(large, 1)
    ratio = _seconds(large, 3) / _seconds(small, 5)
    # Eight times the repetitions: about 8 when linear, about 64 when every repetition
    # read splits the whole field again.
    assert ratio < 24, ratio


def test_the_repetition_a_rule_picks_is_the_same_however_many_come_before() -> None:
    reader = default_reader()
    plain = reader.intake(InpatientVisit().a01("REPS-2"), sender="HIS|H")
    padded = reader.intake(with_identifiers(3_000, cid="REPS-2"), sender="HIS|H")
    assert padded.part is not None and plain.part is not None
    # The identity card (NNCHN) comes first either way; a hospital number (MR) is the
    # first of its type: the first extra one in the padded message.
    assert padded.part.elements["HDSD00.11.048"] == plain.part.elements["HDSD00.11.048"]
    assert plain.part.elements["HDSD00.11.006"] == "BA0001203"
    assert padded.part.elements["HDSD00.11.006"] == "X0"
    assert padded.record == plain.record


def test_a_field_rewritten_in_place_is_read_afresh() -> None:
    msg = parse_hl7(with_identifiers(2))
    pid = msg.segment_list("PID")[0]
    assert pid.value(3, 2, 1) == "X0"
    pid.raw_fields[3] = "A^^^H^MR~B^^^H^MR"
    assert pid.value(3, 2, 1) == "B"
    assert pid.repetitions(3) == ["A^^^H^MR", "B^^^H^MR"]
