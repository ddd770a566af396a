"""A bridge moves what it holds for its lifetime (code, mapping tables, FHIR models and
their validators, loaded by the first claims) out of the cyclic garbage collector's reach
once, after its first messages: full collections then rescan only what came later."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from e2e_support import LINK_OUT, consent_for, start_pair

from bridge.errors import PolicyError
from bridge.link.node import WARM_MESSAGES, YOUNG_OBJECTS
from bridge.samples import inpatient_records


async def test_the_heap_is_frozen_once_after_the_first_claims_are_queued(tmp_path: Path) -> None:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # the interpreter's default
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        controller = pair.hospital.controller
        records = inpatient_records(WARM_MESSAGES + 8, seed=7)
        for i, record in enumerate(records):
            await controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
        frozen_at: list[int] = []
        thresholds: list[tuple[int, int, tuple[int, ...]]] = []
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
            if not thresholds or thresholds[-1][2] != gc.get_threshold():
                thresholds.append((queued, len(frozen_at), gc.get_threshold()))
        assert queued > WARM_MESSAGES
        # Once, when the WARM_MESSAGES-th claim was queued, and never again.
        assert frozen_at == [WARM_MESSAGES]
        # The youngest generation's threshold is raised at the same moment; the older
        # generations' are left as they were.
        assert thresholds[0][2] == (700, 10, 10)
        assert [t for t in thresholds if t[2] != (700, 10, 10)] == [
            (WARM_MESSAGES, 1, (YOUNG_OBJECTS, 10, 10))]
    finally:
        gc.set_threshold(*saved)
        await pair.insurer.stop()
        await pair.hospital.stop()


@pytest.mark.parametrize("chosen", [(YOUNG_OBJECTS * 4, 20, 30), (0, 10, 10)],
                         ids=["higher", "collection-off"])
async def test_a_threshold_chosen_for_the_process_is_kept(
        tmp_path: Path, chosen: tuple[int, int, int]) -> None:
    """A higher threshold is not lowered, and 0 (automatic collection off) stays off."""
    saved = gc.get_threshold()
    gc.set_threshold(*chosen)
    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        for _ in range(WARM_MESSAGES + 1):
            pair.hospital.controller.handled()
        assert gc.get_threshold() == chosen
    finally:
        gc.set_threshold(*saved)
        await pair.insurer.stop()
        await pair.hospital.stop()
