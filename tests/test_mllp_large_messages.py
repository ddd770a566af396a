"""A message at the listener's size limit does not stop the bridge answering others.

A hospital bridge with its real HL7 v2 reader, MLLP on a real socket: while one
connection's message of about ``max_message_bytes`` (PID-3 repeated a hundred thousand
times) is being read, another connection is answered. The reader is held inside its
work until the other answer has arrived, so the test shows where the work runs, not
how fast a shared host happens to be.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from hl7_feeds import InpatientVisit
from intake_support import msa, start_intake_pair

from bridge.mapping.hl7v2 import Intake
from bridge.mapping.hl7v2.header import MSHHeader

LIMIT = 1024 * 1024  # the default max_message_bytes


def at_the_limit(cid: str) -> bytes:
    """An admission as close to ``LIMIT`` bytes as PID-3 repetitions take it."""
    message = InpatientVisit().a01(cid)
    one = "X0000^^^滨江一院^MR~".encode()
    count = (LIMIT - len(message)) // len(one)
    padded = message.replace(b"^NNCHN~", b"^NNCHN~" + one * count, 1)
    assert LIMIT - len(one) < len(padded) <= LIMIT
    return padded


async def test_others_are_answered_while_a_message_at_the_size_limit_is_read(
    tmp_path: Path,
) -> None:
    pair = await start_intake_pair(tmp_path, tls=False, start_insurer=False)
    listener = pair.hospital.mllp
    assert listener is not None
    reader = listener.handler
    reading = threading.Event()
    others_answered = threading.Event()
    held: dict[str, bool] = {}

    class HeldReader:
        """The real reader, held in the large message until the other answer is in."""

        def protect(self, message: bytes, header: MSHHeader) -> bytes:
            return reader.protect(message, header)

        def prepare(self, message: bytes, header: MSHHeader) -> Intake:
            if len(message) > LIMIT // 2:
                reading.set()
                held["others_answered"] = others_answered.wait(timeout=10)
            return reader.prepare(message, header)

    listener.handler = HeldReader()
    try:
        large = asyncio.create_task(pair.send([at_the_limit("BIG-1")]))
        assert await asyncio.to_thread(reading.wait, 20)
        [small] = await pair.send([InpatientVisit(visit="ZY2026000102", prefix="SMALL").a01()])
        others_answered.set()
        assert msa(small)[1:3] == ["AA", "SMALL-A01"]
        [answer] = await asyncio.wait_for(large, timeout=60)
        assert msa(answer)[1:3] == ["AA", "BIG-1"], answer.decode()
        assert held == {"others_answered": True}
    finally:
        others_answered.set()
        await pair.stop()
