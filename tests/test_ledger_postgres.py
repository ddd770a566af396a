"""The PostgreSQL store shared by several workers: threads and processes, each with its own
connection, against the real local server (one fresh schema per test).

What is proved here is what SQLite cannot offer and the bridge relies on when several
processes share the work: gapless per-link sequence numbers, claims taken once, one
audit chain, and an inbox that stores a message once however many deliveries race.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_support import PGSchema, fresh_schema

from bridge.config import load_config
from bridge.errors import ConfigError, StoreError
from bridge.ledger import open_store
from bridge.ledger.audit import AuditEntry, AuditRecord
from bridge.ledger.postgres import OWNER_GRACE, OWNER_HOLD, PostgresStore

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
WORKERS = 4


def rec(action: str, subject: str) -> AuditRecord:
    return AuditRecord(time=T0, actor="hospital-a", action=action, subject=subject,
                       categories=["health-payment"])


def run_together(n: int, work: Callable[[int, threading.Barrier], Any]) -> list[Any]:
    """Run ``work(i, barrier)`` in ``n`` threads started at once; re-raise the first error."""
    barrier = threading.Barrier(n, timeout=30)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = work(i, barrier)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def pg() -> Iterator[PGSchema]:
    """A fresh schema name on the test server, dropped after the test."""
    yield from fresh_schema()


@pytest.fixture
def stores(pg: PGSchema) -> Iterator[list[PostgresStore]]:
    """One store per worker, each on its own connection, all on one schema."""
    opened = [PostgresStore(pg.dsn, schema=pg.schema, worker_id=f"w{i}") for i in range(WORKERS)]
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def test_concurrent_enqueue_gives_gapless_unique_seqs_and_one_chain(
        stores: list[PostgresStore]) -> None:
    per_worker = 200

    def work(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        for k in range(per_worker):
            mid = f"w{i}-{k}"
            stores[i].enqueue(message_id=mid, link="a-to-b", partner="insurer-b", payload=b"p",
                              digest="d", audit=rec("claim.enqueue", mid), now=T0)

    run_together(WORKERS, work)
    rows = stores[0].list_outbox("a-to-b", limit=10_000)
    assert sorted(r.seq for r in rows) == list(range(1, WORKERS * per_worker + 1))
    # Each worker's own messages keep the order it enqueued them in.
    for i in range(WORKERS):
        mine = [r for r in sorted(rows, key=lambda r: r.seq) if r.message_id.startswith(f"w{i}-")]
        assert [r.message_id for r in mine] == [f"w{i}-{k}" for k in range(per_worker)]
    report = stores[1].verify_audit()
    assert report.ok and report.count == WORKERS * per_worker


def test_racing_enqueues_of_the_same_ids_store_each_once_without_gaps(
        stores: list[PostgresStore]) -> None:
    ids = [f"m{k}" for k in range(50)]

    def work(i: int, barrier: threading.Barrier) -> list[int]:
        barrier.wait()
        return [stores[i].enqueue(message_id=m, link="a-to-b", partner="insurer-b",
                                  payload=b"same", digest="d", audit=rec("claim.enqueue", m),
                                  now=T0).seq for m in ids]

    seen = run_together(WORKERS, work)
    # Every worker was told the same sequence number for each id: one row per id.
    assert all(s == seen[0] for s in seen)
    assert sorted(seen[0]) == list(range(1, len(ids) + 1))
    assert stores[0].outbox_counts()["queued"] == len(ids)
    assert stores[0].verify_audit().count == len(ids)


def test_concurrent_claims_take_every_message_exactly_once(
        stores: list[PostgresStore]) -> None:
    total = 400
    for k in range(total):
        stores[0].enqueue(message_id=f"m{k:03d}", link="a-to-b", partner="insurer-b",
                          payload=b"p", digest="d", audit=rec("claim.enqueue", f"m{k}"), now=T0)

    def work(i: int, barrier: threading.Barrier) -> list[str]:
        taken: list[str] = []
        barrier.wait()
        while True:
            rows = stores[i].claim_due("a-to-b", now=T0 + timedelta(seconds=1), limit=7,
                                       lease=timedelta(minutes=5))
            if not rows:
                return taken
            assert [r.seq for r in rows] == sorted(r.seq for r in rows)
            for r in rows:
                stores[i].mark_acked(r.message_id, receipt=b"r", now=T0,
                                     audit=rec("claim.ack", r.message_id))
                taken.append(r.message_id)

    taken = run_together(WORKERS, work)
    claims = Counter(m for batch in taken for m in batch)
    assert len(claims) == total and set(claims.values()) == {1}
    assert stores[0].outbox_counts()["acked"] == total
    assert stores[0].highest_contiguous_acked("a-to-b") == total
    assert all(r.attempts == 1 for r in stores[0].list_outbox("a-to-b", limit=total))
    # The work was shared: more than one worker claimed something.
    assert sum(1 for batch in taken if batch) > 1
    assert stores[0].verify_audit().count == 2 * total


def test_a_claim_goes_first_to_the_process_that_queued_it(stores: list[PostgresStore]) -> None:
    """A process running the link's dispatcher keeps the claims it queued for
    OWNER_GRACE; after that, or for claims queued by a process that dispatches nothing
    (the CLI), any process takes them, and none is taken twice."""
    owner, other, cli = stores[0], stores[1], stores[2]
    owner.dispatch_here("a-to-b")
    other.dispatch_here("a-to-b")
    for k in range(3):
        owner.enqueue(message_id=f"own{k}", link="a-to-b", partner="insurer-b", payload=b"p",
                      digest="d", audit=rec("claim.enqueue", f"own{k}"), now=T0)
    cli.enqueue(message_id="cli0", link="a-to-b", partner="insurer-b", payload=b"p",
                digest="d", audit=rec("claim.enqueue", "cli0"), now=T0)
    soon = T0 + timedelta(milliseconds=500)
    assert [r.message_id for r in other.claim_due("a-to-b", now=soon)] == ["cli0"]
    assert [r.message_id for r in owner.claim_due("a-to-b", now=soon, limit=1)] == ["own0"]
    # The owner has not come back for the rest within the grace: any process takes them.
    late = T0 + OWNER_GRACE + timedelta(milliseconds=1)
    assert [r.message_id for r in other.claim_due("a-to-b", now=late)] == ["own1", "own2"]
    assert owner.claim_due("a-to-b", now=late) == []
    assert all(r.attempts == 1 for r in owner.list_outbox("a-to-b", limit=10))


def test_a_busy_process_sends_its_own_claims_before_another_processs(
        stores: list[PostgresStore]) -> None:
    """Two dispatching processes both behind do not swap backlogs: a claim round takes
    the process's own due claims first and fills what is left with the other's claims
    past OWNER_GRACE; past OWNER_HOLD the other's claims go in their turn (its owner may
    have stopped), and no claim is taken twice."""
    a, b = stores[0], stores[1]
    a.dispatch_here("a-to-b")
    b.dispatch_here("a-to-b")
    for k in range(3):
        for store, name in ((a, "a"), (b, "b")):
            store.enqueue(message_id=f"{name}{k}", link="a-to-b", partner="insurer-b",
                          payload=b"p", digest="d", audit=rec("claim.enqueue", f"{name}{k}"),
                          now=T0)
    late = T0 + OWNER_GRACE + timedelta(seconds=1)
    long = timedelta(minutes=5)  # no lease runs out in this test
    # b's claims are overdue for a, but a has its own: those first.
    assert [r.message_id for r in a.claim_due("a-to-b", now=late, limit=2, lease=long)] == ["a0", "a1"]
    # The rest of the round's limit takes b's overdue claims, oldest first (a round is
    # answered in seq order).
    assert [r.message_id for r in a.claim_due("a-to-b", now=late, limit=3, lease=long)] == [
        "b0", "b1", "a2"]
    assert [r.message_id for r in b.claim_due("a-to-b", now=late, lease=long)] == ["b2"]
    for k in range(3, 5):
        for store, name in ((a, "a"), (b, "b")):
            store.enqueue(message_id=f"{name}{k}", link="a-to-b", partner="insurer-b",
                          payload=b"p", digest="d", audit=rec("claim.enqueue", f"{name}{k}"),
                          now=T0 + timedelta(seconds=k))
    # b has stopped: past OWNER_HOLD its claims go in seq order with a's own.
    held = T0 + timedelta(seconds=3) + OWNER_HOLD
    assert [r.message_id for r in a.claim_due("a-to-b", now=held, limit=2)] == ["a3", "b3"]
    assert [r.message_id for r in a.claim_due("a-to-b", now=held)] == ["a4", "b4"]
    assert b.claim_due("a-to-b", now=held) == []
    rows = a.list_outbox("a-to-b", limit=20)
    assert len(rows) == 10 and all(r.state.value == "sending" and r.attempts == 1 for r in rows)


def test_concurrent_audit_appends_from_several_stores_form_one_chain(
        stores: list[PostgresStore]) -> None:
    def work(i: int, barrier: threading.Barrier) -> list[int]:
        barrier.wait()
        seqs = []
        for k in range(100):
            if k % 10 == 0:  # mix in inbox accepts, which append under the same lock
                row, _ = stores[i].inbox_accept(
                    sender=f"s{i}", message_id=f"m{k}", digest="d", payload=b"p",
                    audit=rec("message.receive", f"m{k}"), now=T0,
                    make_receipt=lambda e: e.hash.encode())
                seqs.append(row.audit_seq)
            else:
                seqs.append(stores[i].append_audit(rec("tls.refused", f"peer:{i}-{k}")).seq)
        return seqs

    seqs = run_together(WORKERS, work)
    assert sorted(s for batch in seqs for s in batch) == list(range(1, WORKERS * 100 + 1))
    report = stores[2].verify_audit()
    assert report.ok and report.count == WORKERS * 100
    assert stores[3].audit_head() == (WORKERS * 100, report.head_hash)


def _deliver(dsn: str, schema: str, ids: list[str], barrier: Any, out: Any) -> None:
    """Child process: deliver each message once, in step with the other process."""
    with PostgresStore(dsn, schema=schema) as store:
        for mid in ids:
            barrier.wait()

            def make_receipt(entry: AuditEntry, mid: str = mid) -> bytes:
                return f"receipt {mid} audit {entry.seq} by {os.getpid()}".encode()

            row, fresh = store.inbox_accept(
                sender="hospital-a", message_id=mid, digest="d-" + mid, payload=b"payload",
                audit=AuditRecord(time=T0, actor="insurer-b", action="message.receive",
                                  subject=mid), make_receipt=make_receipt, now=T0)
            out.put((mid, fresh, row.receipt, row.audit_seq))


def test_two_processes_delivering_the_same_messages_store_each_once(pg: PGSchema) -> None:
    with PostgresStore(pg.dsn, schema=pg.schema):
        pass  # create the schema up front; creation races are tested separately
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2, timeout=30), ctx.Queue()
    ids = [f"urn:uuid:{k}" for k in range(25)]
    procs = [ctx.Process(target=_deliver, args=(pg.dsn, pg.schema, ids, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(2 * len(ids))]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    by_id: dict[str, list[tuple[bool, bytes, int]]] = {}
    for mid, fresh, receipt, seq in results:
        by_id.setdefault(mid, []).append((fresh, receipt, seq))
    for mid in ids:
        (f1, r1, s1), (f2, r2, s2) = by_id[mid]
        assert sorted([f1, f2]) == [False, True], mid  # exactly one stored it
        assert (r1, s1) == (r2, s2), mid  # both answered with the same receipt
    with PostgresStore(pg.dsn, schema=pg.schema) as store:
        assert store.inbox_count("hospital-a") == len(ids)
        report = store.verify_audit()
        assert report.ok and report.count == len(ids)


def test_duplicate_committed_outside_the_chain_lock_is_answered_from_its_row(
        pg: PGSchema) -> None:
    """The unique identity is the last line of defence: a row that appears between the
    look-up and the insert rolls the whole accept back, audit entry included."""
    with PostgresStore(pg.dsn, schema=pg.schema) as store:
        other = pg.connect()

        def make_receipt(entry: AuditEntry) -> bytes:
            other.execute(
                "INSERT INTO inbox (sender, message_id, digest, payload, receipt, audit_seq,"
                " received) VALUES ('hospital-a', 'm1', 'd', 'p', 'their receipt', 0, now())")
            return b"our receipt"

        row, fresh = store.inbox_accept(sender="hospital-a", message_id="m1", digest="d",
                                        payload=b"p", audit=rec("message.receive", "m1"),
                                        make_receipt=make_receipt, now=T0)
        other.close()
        assert not fresh and row.receipt == b"their receipt"
        assert store.audit_entries() == [] and store.inbox_count() == 1


def test_schema_is_created_once_when_processes_start_together(pg: PGSchema) -> None:
    def work(i: int, barrier: threading.Barrier) -> int:
        barrier.wait()
        with PostgresStore(pg.dsn, schema=pg.schema) as s:
            return s.append_audit(rec("bridge.start", f"w{i}")).seq

    assert sorted(run_together(WORKERS, work)) == [1, 2, 3, 4]
    with pg.connect() as conn:
        assert conn.execute("SELECT count(*) FROM audit_head").fetchone() == (1,)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_schemas_keep_controllers_apart(pg: PGSchema) -> None:
    for other in fresh_schema():
        with PostgresStore(pg.dsn, schema=pg.schema) as a, \
                PostgresStore(other.dsn, schema=other.schema) as b:
            a.enqueue(message_id="m1", link="l", partner="p", payload=b"a", digest="d",
                      audit=rec("claim.enqueue", "m1"), now=T0)
            assert b.get_outbox("m1") is None and b.audit_head()[0] == 0
            b.enqueue(message_id="m1", link="l", partner="p", payload=b"b", digest="other",
                      audit=rec("claim.enqueue", "m1"), now=T0)
            assert a.get_outbox("m1").payload == b"a"  # type: ignore[union-attr]


def test_lost_connection_fails_one_call_then_reconnects(pg: PGSchema) -> None:
    with PostgresStore(pg.dsn, schema=pg.schema, worker_id="victim") as store:
        store.append_audit(rec("a", "1"))
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'ws-fhir-bridge victim'")
        with pytest.raises(StoreError) as info:
            store.append_audit(rec("a", "2"))
        assert pg.dsn not in str(info.value) and info.value.fault == "transient"
        assert store.append_audit(rec("a", "2")).seq == 2
        assert store.verify_audit().count == 2


def test_unreachable_server_is_a_store_error_without_the_dsn() -> None:
    dsn = "host=127.0.0.1 port=1 user=postgres password=secret-pw dbname=test"
    with pytest.raises(StoreError) as info:
        PostgresStore(dsn, connect_timeout=2)
    assert "secret-pw" not in str(info.value) and "port=1" not in str(info.value)


# --- configuration and a running bridge on PostgreSQL ---------------------------------


def _use_postgresql(config: Path, dsn: str, schema: str) -> None:
    text = config.read_text()
    text, n = re.subn(r"\[store\]\npath = \"[^\"]*\"\n",
                      f'[store]\nkind = "postgresql"\ndsn = "{dsn}"\nschema = "{schema}"\n', text)
    assert n == 1
    config.write_text(text)


def test_config_requires_dsn_for_postgresql_and_names_the_key(tmp_path: Path) -> None:
    from bridge.demo import write_configs

    hospital, _ = write_configs(tmp_path, 1, 2)
    text = hospital.read_text()
    hospital.write_text(re.sub(r"\[store\]\npath = \"[^\"]*\"\n", '[store]\nkind = "postgresql"\n',
                               text))
    with pytest.raises(ConfigError) as info:
        load_config(hospital)
    assert (info.value.location or "").endswith("store.dsn")
    hospital.write_text(text.replace("[store]\n", '[store]\nkind = "postgresql"\n'
                                     'dsn = "host=x"\nschema = "Not-An-Identifier"\n'))
    with pytest.raises(ConfigError) as info:
        load_config(hospital)
    assert (info.value.location or "").endswith("store.schema")


async def test_bridge_serve_and_two_dispatching_processes_on_postgresql(
        tmp_path: Path, pg: PGSchema) -> None:
    """The insurer runs as ``bridge serve`` on one schema; two hospital bridges share the
    hospital's outbox in another schema of the same database and deliver every claim once."""
    from e2e_support import LINK_OUT, consent_for, make_workdir

    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.samples import inpatient_records

    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    for insurer_schema in fresh_schema():
        _use_postgresql(hospital_cfg, pg.dsn, pg.schema)
        _use_postgresql(insurer_cfg, pg.dsn, insurer_schema.schema)
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert serve.stdout is not None
            ready = await asyncio.wait_for(serve.stdout.readline(), timeout=30)
            assert ready.startswith(b"ready insurer-b"), ready
            first = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
            records = inpatient_records(6, seed=5)
            for k, r in enumerate(records):
                await first.controller.put_consent(consent_for(r, consent_id=f"c-{k}"))
            # A bridge process reads the consents from the store when it starts, so the
            # second one starts after they are stored.
            second = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
            await first.start(serve=False)
            await second.start(serve=False)
            try:
                ids = [(await first.controller.submit(r, LINK_OUT)).message_id for r in records]
                deadline = asyncio.get_running_loop().time() + 20
                while (await second.controller.db.outbox_counts())["acked"] < len(ids):
                    if asyncio.get_running_loop().time() > deadline:
                        rows = [await second.controller.db.get_outbox(m) for m in ids]
                        raise AssertionError([(r.state, r.attempts, r.last_error) for r in rows])
                    await asyncio.sleep(0.05)
            finally:
                await first.stop()
                await second.stop()
        finally:
            if serve.returncode is None:
                serve.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(serve.communicate(), timeout=20)
        assert serve.returncode == 0, err.decode()[-2000:]
        config = load_config(insurer_cfg)
        with open_store(config.store) as insurer, \
                open_store(load_config(hospital_cfg).store) as hospital:
            assert isinstance(insurer, PostgresStore) and isinstance(hospital, PostgresStore)
            assert insurer.inbox_count("hospital-a") == len(ids)
            assert all(insurer.inbox_lookup("hospital-a", m) is not None for m in ids)
            rows = [hospital.get_outbox(m) for m in ids]
            assert all(r is not None and r.state == "acked" and r.attempts == 1 for r in rows)
            assert insurer.verify_audit().ok and hospital.verify_audit().ok


def test_connections_carry_network_timeouts_and_the_dsn_keeps_its_own() -> None:
    from psycopg.conninfo import conninfo_to_dict

    from bridge.ledger.postgres import _with_network_defaults

    chosen = conninfo_to_dict(_with_network_defaults("host=db.example keepalives_idle=5"))
    assert chosen["keepalives_idle"] == "5"  # the operator's value wins
    assert chosen["keepalives"] == "1" and chosen["tcp_user_timeout"] == "60000"
    uri = conninfo_to_dict(_with_network_defaults("postgresql://bridge@db.example/b"))
    assert uri["host"] == "db.example" and uri["keepalives_count"] == "3"


def test_a_restore_is_refused_while_a_store_is_open_and_holds_off_stores_opening(
    pg: PGSchema,
) -> None:
    from bridge.ledger.postgres import nobody_using

    store = PostgresStore(pg.dsn, schema=pg.schema)
    with (pytest.raises(StoreError, match="a bridge process has this store open"),
          nobody_using(pg.dsn, pg.schema)):
        pass
    store.close()
    with (nobody_using(pg.dsn, pg.schema),
          pytest.raises(StoreError, match="a restore of this store is under way")):
        PostgresStore(pg.dsn, schema=pg.schema)
    PostgresStore(pg.dsn, schema=pg.schema).close()  # and once it is done, it opens


def test_a_store_opened_during_a_restore_creates_nothing(pg: PGSchema) -> None:
    from bridge.ledger.postgres import nobody_using

    with (nobody_using(pg.dsn, pg.schema),
          pytest.raises(StoreError, match="a restore of this store is under way")):
        PostgresStore(pg.dsn, schema=pg.schema)
    with psycopg.connect(pg.dsn) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname=%s",
                             (pg.schema,)).fetchone()
    assert found is None  # the schema pg_restore is about to write was not made meanwhile


def _restore_after_sessions_end(pg: PGSchema, store: PostgresStore) -> ExitStack:
    """End every session ``store`` has now, then take the restore's lock: the lock of an
    entered :func:`nobody_using`. The store's liveness thread connects again within a
    second of finding its session ended, so a try can meet its new session: then that
    session ends too and the restore tries again, as an operator would."""
    from bridge.ledger.postgres import nobody_using

    name = f"ws-fhir-bridge {store.worker_id}"[:63]
    deadline = time.monotonic() + 30
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        while True:
            # Sessions looked up afresh each time (a reconnect has a new pid); each
            # termination waits for the session to be gone.
            admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                          " WHERE application_name=%s", (name,))
            try:
                with ExitStack() as stack:
                    stack.enter_context(nobody_using(pg.dsn, pg.schema))
                    return stack.pop_all()
            except StoreError as exc:
                if "has this store open" not in str(exc) or time.monotonic() > deadline:
                    raise


def test_a_store_whose_sessions_ended_does_not_write_during_a_restore(pg: PGSchema) -> None:
    from bridge.ledger.postgres import nobody_using

    store = PostgresStore(pg.dsn, schema=pg.schema)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            pids = [pid for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name=%s",
                (f"ws-fhir-bridge {store.worker_id}"[:63],))]
            assert len(pids) == 2
            # Only the lock's own session ends: the store's working session still
            # holds the store's lock, and the restore is refused.
            [lock_session] = [pid for (pid,) in admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype='advisory' AND pid = ANY(%s)"
                " GROUP BY pid HAVING count(*) = 2", (pids,))]  # the worker's and the store's
            admin.execute("SELECT pg_terminate_backend(%s)", (lock_session,))
            with (pytest.raises(StoreError, match="has this store open"),
                  nobody_using(pg.dsn, pg.schema)):
                pass
        # Every session of the store ends (a server restart): a restore may begin,
        # and the store, connecting again, writes nothing while it runs.
        restore = _restore_after_sessions_end(pg, store)
        with restore:
            with pytest.raises(StoreError):  # the first call meets its ended session
                store.append_audit(rec("test.write", "x"))
            with pytest.raises(StoreError, match="a restore of this store is under way"):
                store.append_audit(rec("test.write", "x"))
        assert store.append_audit(rec("test.write", "x")).seq >= 1  # and after it, it does
    finally:
        store.close()
