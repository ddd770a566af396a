"""Messages arriving together on several MLLP connections: committed together, each
answered on its own, and each AA only once its message is on disk.

Real sockets on 127.0.0.1 and the real SQLite store; what was committed is read back
through a connection of its own to the database file, as another process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_mllp_listener import PLAIN, Bridge, adt, seg, start_bridge

from bridge.link.mllp import HeaderOnlyHandler
from bridge.link.mllp_framer import MLLPFramer, frame

CONNECTIONS = 6


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    b = await start_bridge(tmp_path, PLAIN)
    assert b.service.mllp is not None
    b.service.mllp.handler = HeaderOnlyHandler()
    try:
        yield b
    finally:
        await b.service.stop()


def _slow_groups(b: Bridge) -> list[int]:
    """Record the size of every committed group; the first commit takes a while, so the
    messages of the other connections arrive meanwhile and queue for the next one."""
    assert b.service.mllp is not None
    commit = b.service.mllp._commit
    many = commit._many
    sizes: list[int] = []

    def slow_many(requests: list[dict[str, Any]]) -> list[Any]:
        if not sizes:
            time.sleep(0.3)
        sizes.append(len(requests))
        return many(requests)

    commit._many = slow_many
    return sizes


def _committed(path: Path, sender: str, control_id: str) -> bool:
    """Is the message in the store for a reader outside the bridge?"""
    raw = sqlite3.connect(path)
    try:
        row = raw.execute("SELECT 1 FROM hl7_inbox WHERE sender=? AND control_id=?",
                          (sender, control_id)).fetchone()
        return row is not None
    finally:
        raw.close()


async def _send(b: Bridge, message: bytes, control_id: str) -> tuple[bytes, bool]:
    """Send one message; return its ACK and whether the message was already committed
    when the ACK arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    try:
        writer.write(frame(message))
        await writer.drain()
        framer = MLLPFramer()
        acks: list[bytes] = []
        while not acks:
            data = await asyncio.wait_for(reader.read(65536), timeout=10)
            assert data, "the bridge closed the connection without an answer"
            acks += framer.feed(data)
        committed = await asyncio.to_thread(_committed, b.store.path, "HIS|HOSP-A", control_id)
        return acks[0], committed
    finally:
        writer.close()


async def test_concurrent_messages_are_committed_together_and_each_aa_follows_its_commit(
    bridge: Bridge,
) -> None:
    sizes = _slow_groups(bridge)
    ids = [f"G{i:03d}" for i in range(CONNECTIONS)]
    first = asyncio.create_task(_send(bridge, adt(ids[0]), ids[0]))
    await asyncio.sleep(0.1)  # the first commit is under way
    rest = [asyncio.create_task(_send(bridge, adt(cid), cid)) for cid in ids[1:]]
    answers = [await first] + [await t for t in rest]
    for cid, (ack, committed) in zip(ids, answers, strict=True):
        assert seg(ack, "MSA")[1:3] == ["AA", cid]
        assert committed, f"{cid} was acknowledged before it was committed"
    assert sum(sizes) == CONNECTIONS and max(sizes) > 1  # some were committed together
    assert bridge.store.hl7_count() == CONNECTIONS
    assert bridge.actions().count("hl7.receive") == CONNECTIONS
    assert bridge.store.verify_audit().ok


async def test_a_refused_message_in_a_group_does_not_undo_the_others(bridge: Bridge) -> None:
    sizes = _slow_groups(bridge)
    first = asyncio.create_task(_send(bridge, adt("H000"), "H000"))
    await asyncio.sleep(0.1)
    # In the same group: two messages under one control id with different content
    # (whichever is filed second is refused, AE 205), and messages of their own.
    same = [asyncio.create_task(_send(bridge, adt("H001", extra=extra), "H001"))
            for extra in ("", "PV2|1\r")]
    others = [asyncio.create_task(_send(bridge, adt(cid), cid)) for cid in ("H002", "H003")]
    await first
    same_answers = [await t for t in same]
    other_answers = [await t for t in others]
    assert max(sizes) > 1
    codes = sorted(seg(ack, "MSA")[1] for ack, _ in same_answers)
    assert codes == ["AA", "AE"]
    refused = next(ack for ack, _ in same_answers if seg(ack, "MSA")[1] == "AE")
    assert seg(refused, "ERR")[3].startswith("205^")
    for ack, committed in other_answers:
        assert seg(ack, "MSA")[1] == "AA" and committed
    # Stored once, with the content that was acknowledged; the refusal wrote no message
    # and no receipt of its own, only its hl7.reject.
    accepted = next(i for i, (ack, _) in enumerate(same_answers) if seg(ack, "MSA")[1] == "AA")
    row = bridge.store.hl7_lookup("HIS|HOSP-A", "H001")
    assert row is not None and row.message == adt("H001", extra=("", "PV2|1\r")[accepted])
    assert bridge.store.hl7_count() == 4
    actions = bridge.actions()
    assert actions.count("hl7.receive") == 4 and actions.count("hl7.reject") == 1
    assert bridge.store.verify_audit().ok
