"""The outbox state table and the backoff schedule."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from bridge.ledger.errors import TransitionError
from bridge.ledger.states import (
    TERMINAL,
    TRANSITIONS,
    OutboxState,
    check_transition,
    next_attempt,
)

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)


def test_delivery_paths_are_allowed() -> None:
    for a, b in [("queued", "sending"), ("sending", "acked"), ("sending", "queued"),
                 ("sending", "rejected"), ("sending", "dead"), ("sending", "refused"),
                 ("queued", "refused"), ("dead", "queued"), ("rejected", "queued"),
                 ("sending", "sending")]:
        check_transition(a, b)


@pytest.mark.parametrize(("a", "b"), [
    ("acked", "queued"), ("acked", "sending"), ("acked", "dead"),
    ("queued", "acked"), ("queued", "dead"), ("queued", "rejected"),
    ("refused", "queued"), ("refused", "sending"), ("dead", "sending"),
    ("rejected", "acked"),
])
def test_illegal_transitions_raise(a: str, b: str) -> None:
    with pytest.raises(TransitionError) as info:
        check_transition(a, b)
    assert info.value.code == "outbox-illegal-transition"


def test_unknown_state_raises() -> None:
    with pytest.raises(TransitionError):
        check_transition("queued", "lost")


def test_nothing_leaves_acked_or_refused() -> None:
    for (a, _b) in TRANSITIONS:
        assert a not in (OutboxState.ACKED, OutboxState.REFUSED)
    # Every terminal state is one the dispatcher never claims from.
    assert all((t, OutboxState.SENDING) not in TRANSITIONS for t in TERMINAL)


def test_backoff_full_jitter_within_growing_cap() -> None:
    rng = random.Random(7)
    for attempts, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (8, 60.0), (10_000, 60.0)]:
        waits = [(next_attempt(attempts, now=NOW, rng=rng) - NOW).total_seconds()
                 for _ in range(300)]
        assert all(0 <= w < ceiling for w in waits)
        # Full jitter spreads over the whole range rather than clustering at the top.
        assert min(waits) < ceiling * 0.1 and max(waits) > ceiling * 0.9


def test_backoff_is_deterministic_given_rng() -> None:
    a = next_attempt(4, now=NOW, rng=random.Random(1), base=1, cap=30)
    b = next_attempt(4, now=NOW, rng=random.Random(1), base=1, cap=30)
    assert a == b and NOW <= a < NOW + timedelta(seconds=8)


def test_backoff_rejects_naive_now() -> None:
    with pytest.raises(ValueError):
        next_attempt(1, now=datetime(2026, 3, 1), rng=random.Random(1))


def test_core_ledger_modules_do_not_import_async_or_network() -> None:
    code = ("import sys, bridge.ledger.states, bridge.ledger.audit, bridge.ledger.sqlite; "
            "bad = {'asyncio', 'aiohttp', 'ssl'} & set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
