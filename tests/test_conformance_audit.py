"""An outsider holding only PROTOCOL.md checks the bridge's audit evidence: the
checkpoint and inclusion proof of receipts the insurer returned, a consistency proof between checkpoints fetched over the
link, and a cosignature the bridge takes or refuses (§6.2, §9.5-9.7)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LINK_OUT, Pair, consent_for, start_pair
from peer_support import call, make_peer

from bridge.conformance import auditlog as A
from bridge.conformance import protocol as P
from bridge.ledger import tree
from bridge.samples import inpatient_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path)
    try:
        yield p
    finally:
        await p.stop()


async def delivered_receipts(pair: Pair, n: int) -> list[dict[str, Any]]:
    """Receipts the insurer returned for ``n`` claims the hospital sent (as received)."""
    out = []
    for i, record in enumerate(inpatient_records(n, seed=9)):
        await pair.hospital.controller.put_consent(consent_for(record, consent_id=f"k-{i}"))
        mid = (await pair.hospital.submit(record, LINK_OUT)).message_id
        for _ in range(400):
            row = await pair.hospital.controller.db.get_outbox(mid)
            if row is not None and row.state == "acked":
                break
            await asyncio.sleep(0.05)
        assert row is not None and row.receipt is not None
        out.append(json.loads(row.receipt))
    return out


def test_the_outside_verifier_imports_nothing_of_the_bridge() -> None:
    probe = ("import sys\nimport bridge.conformance.auditlog\n"
             "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('bridge'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.split()
    assert [m for m in out if m != "bridge" and not m.startswith("bridge.conformance")] == []


async def test_receipts_prove_inclusion_and_checkpoints_extend(pair: Pair) -> None:
    peer = make_peer(pair)
    cert = peer.receiver_signing_certificate
    assert cert is not None
    trees = [A.receipt_tree(r, "insurer-b", cert) for r in await delivered_receipts(pair, 3)]
    assert [t.size for t in trees] == sorted({t.size for t in trees})

    def fetch(after: int) -> Any:
        with peer.connect() as conn:
            return conn.request("GET", peer.path(f"$audit-checkpoint?from={after}"),
                                headers={"Accept": P.FHIR_JSON})

    # The newest checkpoint, and the proof that it extends the first receipt's.
    answer = await call(fetch, trees[0].size)
    assert answer.status == 200
    params = A.parameters(answer.json())
    latest = A.read_checkpoint(params["checkpoint"], "insurer-b", cert)
    assert latest.size >= trees[-1].size
    assert A.consistency_holds(trees[0].size, latest.size, trees[0].root, latest.root,
                               A.proof_of(params.get("consistency")))
    assert not A.consistency_holds(trees[0].size, latest.size, trees[1].root, latest.root,
                                   A.proof_of(params.get("consistency")))

    def cosign(note: str) -> Any:
        body = json.dumps({"resourceType": "Parameters",
                           "parameter": [{"name": "checkpoint", "valueString": note}]})
        with peer.connect() as conn:
            return conn.request("POST", peer.path("$audit-cosign"), body.encode(),
                                {"Content-Type": P.FHIR_JSON})

    seconds = int(datetime.now(UTC).timestamp())
    good = A.cosign(latest, peer.signing_key, "hospital-a", seconds)
    assert (await call(cosign, good)).status == 200
    kept = tree.cosigned_checkpoints(pair.insurer.controller.store)
    assert [(c, size) for c, size, _ in kept] == [("hospital-a", latest.size)]
    # A cosignature over a checkpoint the bridge never issued is refused.
    forged = A.Tree(latest.origin, latest.size, latest.root,
                    latest.text.replace(f"\n{latest.size}\n", f"\n{latest.size + 1}\n"),
                    latest.note.replace(f"\n{latest.size}\n", f"\n{latest.size + 1}\n"))
    refused = await call(cosign, A.cosign(forged, peer.signing_key, "hospital-a", seconds))
    assert refused.status == 422 and refused.outcome is not None
    assert refused.outcome.code == "checkpoint-invalid"
