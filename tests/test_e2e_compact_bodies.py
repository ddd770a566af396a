"""Bodies written compactly, as a partner's serialiser writes them, from outside.

A body that is byte for byte the receiver's own compact writing of what it parsed is read
with fewer checks (bridge.messages.read_json); these bodies sit on either side of that
line. The receiver is a real ``bridge serve`` process; the client is the conformance peer
posting raw bytes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from ops_support import serve
from peer_support import call
from test_e2e_batch import _insurer, _peer

from bridge.conformance.peer import Answer, Peer


def _compact(message: dict[str, object]) -> bytes:
    return orjson.dumps(message)


def _insert(body: bytes, after: bytes, member: bytes) -> bytes:
    """``member`` (``"name":value``) added as the first member of the object that opens
    right after the first ``after`` in ``body``."""
    at = body.index(after) + len(after)
    assert body[at:at + 1] == b"{"
    return body[:at + 1] + member + b"," + body[at + 1:]


def _post(peer: Peer, body: bytes) -> Answer:
    with peer.connect() as conn:
        return peer.post_message(conn, body)


async def test_compact_bodies_are_judged_as_any_other(tmp_path: Path) -> None:
    _, insurer_cfg = _insurer(tmp_path)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    try:
        peer = _peer(tmp_path, insurer_cfg)
        good = _compact(peer.signed_claim())
        # The compact writing itself: accepted.
        answer = await call(_post, peer, good)
        assert answer.status == 200, answer.response.body[:300]

        refused = {
            # A name written twice, plainly, with an escape, or deep inside.
            "top": _insert(_compact(peer.signed_claim()), b"", b'"type":"message"'),
            "escaped": _insert(_compact(peer.signed_claim()), b"", b'"\\u0074ype":"message"'),
            "solidus": _insert(_compact(peer.signed_claim()), b'"eventCoding":',
                               b'"sys\\/tem":"x","sys/tem":"y"'),
            "nested": _insert(_compact(peer.signed_claim()), b'"resource":',
                              b'"resourceType":"MessageHeader"'),
            # An integer beyond 2^53 - 1, compact, where a number may stand.
            "integer": _insert(_compact(peer.signed_claim()), b'"eventCoding":',
                               b'"x":9007199254740993'),
            "negative": _insert(_compact(peer.signed_claim()), b'"eventCoding":',
                                b'"x":[-12345678901234567]'),
            # Beyond 64 bits (a JSON parser may read it as a double): still an integer.
            "wide": _insert(_compact(peer.signed_claim()), b'"eventCoding":',
                            b'"x":18446744073709551616'),
        }
        for name, body in refused.items():
            assert orjson.dumps(orjson.loads(body)) != body or name in ("integer", "negative", "wide")
            answer = await call(_post, peer, body)
            assert answer.status == 400, (name, answer.status)
            text = answer.response.body.decode("utf-8", "replace")
            want = ("integer beyond" if name in ("integer", "negative", "wide")
                    else "a member name appears twice")
            assert want in text, (name, text[:400])
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]
