"""Property test: senders sharing one outbox, crashing at any point, never move a row
backwards in the state machine, never lose one, and never change a settled outcome.

Two store connections on one SQLite file stand for two sender processes. Each rule is
one step a sender can take (claim, record an outcome, give up, requeue) or a crash
(the sender forgets what it held, the connection is dropped and reopened, and time
moves past its leases). After every step each row's change must be a transition of
the table in :mod:`bridge.ledger.states`; at the end a surviving sender drains the
outbox and every claim is acknowledged exactly once.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import mkdtemp

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bridge.ledger.audit import AuditRecord
from bridge.ledger.errors import TransitionError
from bridge.ledger.sqlite import SQLiteStore
from bridge.ledger.states import TERMINAL, TRANSITIONS, OutboxState

T0 = datetime(2026, 3, 1, tzinfo=UTC)
LINK = "a-to-b"
LEASE = timedelta(seconds=30)


def _audit(action: str, subject: str, t: datetime) -> AuditRecord:
    return AuditRecord(time=t, actor="hospital-a", action=action, subject=subject)


class SharedOutbox(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.path = Path(mkdtemp()) / "outbox.sqlite"
        self.stores = [SQLiteStore(self.path), SQLiteStore(self.path)]
        self.held: list[set[str]] = [set(), set()]
        self.now = T0
        self.ids: list[str] = []
        self.seen: dict[str, tuple[OutboxState, int, bytes | None]] = {}
        self.acked_by: dict[str, int] = {}

    def teardown(self) -> None:
        for store in self.stores:
            store.close()

    @rule(n=st.integers(1, 4))
    def enqueue(self, n: int) -> None:
        for _ in range(n):
            mid = f"m{len(self.ids)}"
            payload = mid.encode()
            self.stores[0].enqueue(
                message_id=mid,
                link=LINK,
                partner="insurer-b",
                payload=payload,
                digest="sha256:" + hashlib.sha256(payload).hexdigest(),
                audit=_audit("claim.enqueue", mid, self.now),
                now=self.now,
            )
            self.ids.append(mid)

    @rule(w=st.integers(0, 1), limit=st.integers(1, 5))
    def claim(self, w: int, limit: int) -> None:
        for row in self.stores[w].claim_due(LINK, now=self.now, limit=limit, lease=LEASE):
            self.held[w].add(row.message_id)
            for other in range(2):
                if other != w:
                    self.held[other].discard(row.message_id)  # its lease was taken over

    def _finish(self, w: int, data: st.DataObject, outcome: str) -> None:
        mid = data.draw(st.sampled_from(sorted(self.held[w])))
        self.held[w].discard(mid)
        store = self.stores[w]
        try:
            if outcome == "ack":
                store.mark_acked(
                    mid,
                    receipt=f"receipt-{mid}".encode(),
                    now=self.now,
                    audit=_audit("claim.ack", mid, self.now),
                )
                self.acked_by[mid] = self.acked_by.get(mid, 0) + 1
            elif outcome == "retry":
                store.mark_retry(
                    mid,
                    next_attempt=self.now,
                    error="transport-error",
                    now=self.now,
                    audit=None,
                    fate_unknown=data.draw(st.booleans()),
                )
            else:
                store.mark_dead(
                    mid,
                    error="gave-up:transport-error",
                    now=self.now,
                    audit=_audit("claim.dead", mid, self.now),
                )
        except TransitionError:
            # Only possible when the row is no longer ``sending`` under this sender: a
            # row it held is settled only once.
            row = store.get_outbox(mid)
            assert row is not None and row.state is not OutboxState.SENDING

    @precondition(lambda self: any(self.held))
    @rule(data=st.data(), outcome=st.sampled_from(["ack", "ack", "retry", "dead"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        w = data.draw(st.sampled_from([i for i in range(2) if self.held[i]]))
        self._finish(w, data, outcome)

    @rule(w=st.integers(0, 1))
    def crash(self, w: int) -> None:
        """The sender dies wherever it was: what it held is forgotten, its connection
        dropped; a new process opens the store."""
        self.held[w].clear()
        self.stores[w].close()
        self.stores[w] = SQLiteStore(self.path)

    @rule(seconds=st.sampled_from([1, 10, 31]))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(data=st.data())
    def operator_requeues(self, data: st.DataObject) -> None:
        dead = [r.message_id for r in self.stores[1].list_outbox(LINK, state="dead", limit=1000)]
        if dead:
            mid = data.draw(st.sampled_from(dead))
            self.stores[1].requeue(mid, now=self.now, audit=_audit("claim.requeue", mid, self.now))

    @invariant()
    def rows_only_move_along_the_table(self) -> None:
        rows = {r.message_id: r for r in self.stores[0].list_outbox(LINK, limit=10_000)}
        assert set(rows) == set(self.ids)  # nothing lost
        for mid, row in rows.items():
            before = self.seen.get(mid)
            if before is not None:
                state, attempts, receipt = before
                if state is OutboxState.ACKED:
                    assert (row.state, row.receipt) == (state, receipt)  # final, unchanged
                if row.state is not state:
                    assert (state, row.state) in TRANSITIONS, (mid, state, row.state)
                if row.state is not OutboxState.QUEUED or state is not OutboxState.DEAD:
                    assert row.attempts >= attempts  # only a requeue resets the count
            self.seen[mid] = (row.state, row.attempts, row.receipt)
        assert all(n == 1 for n in self.acked_by.values())

    @rule()
    def survivor_drains(self) -> None:
        """A sender that does not crash finishes the work: requeue the dead, then claim
        and acknowledge until every claim is acknowledged."""
        store = self.stores[0]
        for r in store.list_outbox(LINK, state="dead", limit=10_000):
            store.requeue(
                r.message_id, now=self.now, audit=_audit("claim.requeue", r.message_id, self.now)
            )
        self.rows_only_move_along_the_table()
        self.now += LEASE + timedelta(seconds=1)
        self.held = [set(), set()]
        for _ in range(len(self.ids) + 1):
            rows = store.claim_due(LINK, now=self.now, limit=100, lease=LEASE)
            if not rows:
                break
            self.rows_only_move_along_the_table()
            for row in rows:
                store.mark_acked(
                    row.message_id,
                    receipt=f"receipt-{row.message_id}".encode(),
                    now=self.now,
                    audit=_audit("claim.ack", row.message_id, self.now),
                )
                self.acked_by[row.message_id] = self.acked_by.get(row.message_id, 0) + 1
            self.rows_only_move_along_the_table()
        states = {r.state for r in store.list_outbox(LINK, limit=10_000)}
        assert states <= {OutboxState.ACKED} and states <= TERMINAL


SharedOutbox.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestSharedOutboxUnderCrashes = SharedOutbox.TestCase
