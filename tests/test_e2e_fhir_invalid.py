"""Claims that are not valid FHIR R4 are refused on the wire, naming where (PROTOCOL §7).

The receiver is a real ``bridge serve`` process with the dev PKI; the client is the
conformance peer (standard-library TLS and JOSE, written from PROTOCOL.md) posting
signed claims that differ from a valid one in one element: a JSON number where FHIR's
JSON form is a string (``Claim.created``, ``Claim.billablePeriod.start``), a string
where it is a boolean or a number, a Period that ends before it starts (invariant
per-1), an id beyond 64 characters. Each gets 422 ``fhir-invalid`` naming the JSON
path, no receipt, nothing stored, and the answer does not echo the value.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops_support import serve
from peer_support import call
from reliability_support import inbox_ids
from test_e2e_batch import _insurer, _peer

MARK = "110101199003074512"


def _resource(message: dict[str, Any], rtype: str) -> tuple[int, dict[str, Any]]:
    for i, entry in enumerate(message["entry"]):
        if entry["resource"]["resourceType"] == rtype:
            return i, entry["resource"]
    raise AssertionError(rtype)


def _set(rtype: str, path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], str]:
    def change(message: dict[str, Any]) -> str:
        i, node = _resource(message, rtype)
        for step in path[:-1]:
            node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
        node[path[-1]] = value
        return f"Bundle.entry[{i}].resource" + "".join(
            f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)
    return change


def _reversed_period(message: dict[str, Any]) -> str:
    i, claim = _resource(message, "Claim")
    claim["billablePeriod"] = {"start": "2026-03-09", "end": "2026-03-01"}
    return f"Bundle.entry[{i}].resource.billablePeriod"


CASES: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("Claim.created a number", _set("Claim", ("created",), 1.5)),
    ("Claim.billablePeriod.start a number",
     _set("Claim", ("billablePeriod", "start"), 1.5)),
    ("Claim.billablePeriod.start an integer",
     _set("Claim", ("billablePeriod", "start"), int(MARK[:8]))),
    ("Patient.birthDate an integer", _set("Patient", ("birthDate",), int(MARK[6:14]))),
    ("Patient.active a string", _set("Patient", ("active",), "true")),
    ("Patient.active a number", _set("Patient", ("active",), 1)),
    ("Claim.item[0].sequence a string", _set("Claim", ("item", 0, "sequence"), "1")),
    ("Claim.billablePeriod end before start", _reversed_period),
    ("Patient.id of 65 characters", _set("Patient", ("id",), "a" * 65)),
]


async def test_invalid_primitives_and_reversed_periods_get_422_naming_the_path(
        tmp_path: Path) -> None:
    _, insurer_cfg = _insurer(tmp_path)
    insurer = await asyncio.to_thread(serve, insurer_cfg)
    store = tmp_path / "insurer-b" / "bridge.sqlite"
    try:
        peer = _peer(tmp_path, insurer_cfg)
        # The unchanged claim is accepted: the refusals below are the change's.
        answer = await call(peer.send, peer.signed_claim())
        assert answer.status == 200, answer.outcome
        stored = inbox_ids(store)
        for label, change in CASES:
            message = peer.claim()
            where = change(message)
            answer = await call(peer.send, peer.sign(message))
            assert answer.status == 422, (label, answer.status)
            assert answer.outcome is not None and answer.outcome.code == "fhir-invalid", label
            assert answer.outcome.expression == (where,), (label, answer.outcome)
            body = answer.response.body.decode("utf-8", "replace")
            assert MARK[:8] not in body and MARK[6:14] not in body, label
            assert json.loads(body)["resourceType"] == "OperationOutcome"
        assert inbox_ids(store) == stored
    finally:
        await asyncio.to_thread(insurer.stop)
    assert not [line for line in insurer.log_lines() if "Traceback" in line]
