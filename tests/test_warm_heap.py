"""A bridge moves what it holds for its lifetime (code, mapping tables, FHIR models and
their validators, loaded by the first claims) out of the cyclic garbage collector's reach
once, after its first messages: full collections then rescan only what came later."""

from __future__ import annotations

import gc
from pathlib import Path

from e2e_support import LINK_OUT, consent_for, start_pair

from bridge.errors import PolicyError
from bridge.link.node import WARM_MESSAGES
from bridge.samples import inpatient_records


async def test_the_heap_is_frozen_once_after_the_first_claims_are_queued(tmp_path: Path) -> None:
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        controller = pair.hospital.controller
        records = inpatient_records(WARM_MESSAGES + 8, seed=7)
        for i, record in enumerate(records):
            await controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        frozen_at: list[int] = []
        queued = 0
        before = gc.get_freeze_count()
        for record in records:
            try:
                sub = await controller.submit(record, LINK_OUT)
            except PolicyError:  # a claim consent holds back counts for nothing
                continue
            queued += sub.created
            # Only gc.freeze adds to the permanent generation; frozen objects freed by
            # their reference counts leave it.
            now = gc.get_freeze_count()
            if now > before:
                frozen_at.append(queued)
            before = now
        assert queued > WARM_MESSAGES
        # Once, when the WARM_MESSAGES-th claim was queued, and never again.
        assert frozen_at == [WARM_MESSAGES]
    finally:
        await pair.insurer.stop()
        await pair.hospital.stop()
