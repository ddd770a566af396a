"""Claim push benchmark: hospital bridge(s) -> mutual TLS -> insurer bridge, everything on.

Every bridge runs in its own process (``bridge serve`` for the insurer; a small sender
process per hospital bridge that enqueues its share of the claims through the
controller's submit path and runs the dispatcher): mutual TLS, FHIR validation on both
sides, consent and minimisation, ES256 signatures and receipts, durable commits
(SQLite synchronous=FULL, or PostgreSQL), both audit chains. This process only
orchestrates and measures, so each side's CPU time is its processes' own
(``/proc/PID/stat``, user + system).

Prints, per side, CPU milliseconds per claim (the headline figure: it does not depend
on how busy the machine is) with a breakdown into the stages (each measured in
isolation, no sockets) and what is spent around them (event loop, HTTP, TLS, store,
bookkeeping); the policy stage's share of the sender's CPU twice: its cost measured in
isolation against the sender's CPU per claim, and its CPU measured in the sender itself
(``apply_policy`` timed on its thread with ``time.thread_time`` during the run, against
the sender's CPU over the same run: in a running bridge the stage costs more than alone,
its caches shared with the event loop, TLS and the store); claims per second of a
saturated run; p50/p99 latency (enqueue to
verified receipt, from the outbox's own timestamps) at a fixed offered rate; the
machine's load average before and after.

    python bench/claim_push.py [--claims 2000] [--rate 100] [--runs 1]
    python bench/claim_push.py --store postgres --senders 2     # scale-out on one outbox
    python bench/claim_push.py --soak 100000                    # resident size and CPU per claim over a long run
    python bench/claim_push.py --profile DIR                    # top 15 functions per side
    python bench/claim_push.py --batch off --loop asyncio       # one claim per request, stdlib loop
    BENCH_TALLY=1 python bench/claim_push.py --store postgres --senders 2 --batch on --rate 0

``BENCH_POLICY_PHASES=1`` prints, per sender process, where the policy stage's CPU goes
in the running sender: each part of ``apply_policy`` timed on its thread while the stage
runs (eight timed calls a claim, about 9 microseconds: 1-2 % of the stage, then inside
the in-sender figure as well).

``BENCH_TALLY=1`` (PostgreSQL store) prints, per sender process, for every store
operation of the measured part its transactions, statements and ledger-thread CPU
milliseconds, the rows claimed and the claim rounds that came back empty, how many
claims it dispatched that it had queued itself (and still held) or not, the CPU of
reading, re-deciding and digesting them, and the senders' CPU per second while idle.

By default both forms are reported, one claim per request first, then batches
(PROTOCOL §6b); ``--loop`` picks the event loop of both sides (default: the standard
library's, as ``bridge serve``).

Each sender first pushes a few claims that are not measured (mappings, value sets,
validation models and TLS sessions load once per process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import pstats
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from gc_clock import CollectorClock

PY_SPY = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PATIENTS = 200
WARM_UP = 30  # claims per sender before the measured part
CLK_TCK = os.sysconf("SC_CLK_TCK")
SENDER_STAGES = ("map+validate (sender)", "policy (classify, consent, minimise)", "wrap+sign",
                 "serialise (orjson)")
RECEIVER_STAGES = ("verify signature (receiver)", "validate (receiver)",
                   "profile check (receiver)")


# --- measuring other processes -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def kernel_seconds(pid: int) -> float:
    """System (kernel) CPU time of a live process: writes, fsync, TLS sockets."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# --- the sender process -----------------------------------------------------------------------


def _tally_store(store: Any) -> dict[str, list[float]]:
    """Count, per store operation of ``store`` (a PostgreSQL store): transactions,
    statements, rows claimed, empty claims and the ledger thread's CPU milliseconds.
    Only the measured part is counted (``counting`` is switched on at ``go``)."""
    import threading

    import psycopg

    tally: dict[str, list[float]] = {}
    here = threading.local()
    counting = [False]
    plain_tx = type(store)._tx
    plain_execute = psycopg.Connection.execute
    plain_claim = store.claim_due

    @contextlib.contextmanager
    def tx(what: str):  # type: ignore[no-untyped-def]
        t0 = time.thread_time()
        here.what = what
        try:
            with plain_tx(store, what) as conn:
                yield conn
        finally:
            here.what = None
            if counting[0]:
                row = tally.setdefault(what, [0, 0, 0.0])
                row[0] += 1
                row[2] += (time.thread_time() - t0) * 1000

    def execute(conn: Any, *args: Any, **kwargs: Any) -> Any:
        if counting[0] and getattr(here, "what", None):
            tally.setdefault(here.what, [0, 0, 0.0])[1] += 1
        return plain_execute(conn, *args, **kwargs)

    def claim_due(*args: Any, **kwargs: Any) -> Any:
        rows = plain_claim(*args, **kwargs)
        if counting[0]:
            tally.setdefault("claimed rows", [0, 0, 0.0])[0] += len(rows)
            if not rows:
                tally.setdefault("empty claims", [0, 0, 0.0])[0] += 1
        return rows

    store._tx = store._read = tx
    store.claim_due = claim_due
    psycopg.Connection.execute = execute  # type: ignore[method-assign]
    tally["_counting"] = counting  # type: ignore[assignment]
    return tally


def _tally_dispatch(controller: Any, tally: dict[str, list[float]]) -> None:
    """Count the claims this process dispatches that it did not queue itself (or no
    longer holds in memory), and the CPU milliseconds (main thread) spent reading,
    re-deciding and digesting the messages it dispatches."""
    counting = tally["_counting"]
    for name in ("queued_message", "recheck_consent", "request_digests"):
        plain = getattr(controller, name)

        def timed(*args: Any, _plain: Any = plain, _name: str = name, **kwargs: Any) -> Any:
            if _name == "queued_message" and counting[0]:
                held = args[0] in controller._queued_forms
                tally.setdefault("dispatched, queued here" if held else
                                 "dispatched, queued elsewhere", [0, 0, 0.0])[0] += 1
            t0 = time.thread_time()
            try:
                return _plain(*args, **kwargs)
            finally:
                if counting[0]:
                    tally.setdefault(f"cpu {_name}", [0, 0, 0.0])[2] += (
                        time.thread_time() - t0) * 1000

        setattr(controller, name, timed)


# The parts of the policy stage (apply_policy) BENCH_POLICY_PHASES times: (phase, module,
# name) of the functions it calls. A method is timed on the class of the link's consent
# registry (see _time_policy_phases).
_POLICY_PHASES = (
    ("patient identifiers, data period", "bridge.policy.engine", "_question_facts"),
    ("settle (references to what is dropped, completeness)", "bridge.policy.profile",
     "_settle"),
    ("unreferenced (reachable from the focus)", "bridge.policy.profile",
     "drop_unreferenced"),
    ("unreferenced (reachable from the focus)", "bridge.policy.engine", "drop_unreferenced"),
    ("label (classify, meta.security)", "bridge.policy.engine", "label_bundle"),
    ("consents of the patient (for_patient)", None, "for_patient"),
    ("consent decision for the types (require_consent)", None, "require_consent"),
)
_MINIMISE = "minimise (prune, copy, transforms)"


def _time_policy_phases(registry_class: type, inside: list[bool]) -> dict[str, float]:
    """Wrap the functions apply_policy calls (see _POLICY_PHASES) and
    ``LinkProfile.minimize`` with CPU timers on the calling thread, counting only while
    ``inside[0]`` (the stage is running: the same functions serve the dispatcher's
    recheck too). Returns the CPU seconds of each phase without the phases timed inside
    it (minimise without settle and unreferenced)."""
    import importlib

    from bridge.policy.profile import LinkProfile

    spent: dict[str, float] = {}
    running: list[str] = []

    def timer(phase: str, plain: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not inside[0]:
                return plain(*args, **kwargs)
            running.append(phase)
            t0 = time.thread_time()
            try:
                return plain(*args, **kwargs)
            finally:
                took = time.thread_time() - t0
                running.pop()
                spent[phase] = spent.get(phase, 0.0) + took
                if running:
                    spent[running[-1]] = spent.get(running[-1], 0.0) - took
        return timed

    for phase, module, name in _POLICY_PHASES:
        owner: Any = importlib.import_module(module) if module else registry_class
        setattr(owner, name, timer(phase, getattr(owner, name)))
    LinkProfile.minimize = timer(_MINIMISE, LinkProfile.minimize)  # type: ignore[method-assign]
    return spent


def _share(path: Path, share: int, of: int) -> Iterator[dict[str, Any]]:
    """Every ``of``-th record of a JSON-lines file, from the ``share``-th, read lazily."""
    with path.open("rb") as lines:
        for i, line in enumerate(lines):
            if i % of == share:
                yield orjson.loads(line)


async def sender(config: Path, records_file: Path, share: int, of: int, rate: float,
                 profile: Path | None) -> None:
    """One hospital bridge: start, say ``ready``; on ``go`` enqueue every ``of``-th record
    from ``share`` (paced at ``rate`` per second, or as fast as 8 in flight allow) while
    the dispatcher delivers; on ``stop`` shut down and print what it did as JSON."""
    import cProfile

    from bridge.config import load_config
    from bridge.demo import LINK_OUT
    from bridge.errors import PolicyError
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService

    # Read one at a time, so the process's resident size is the bridge's own, not that
    # of the run's records (a --soak of 100,000 holds about 1 GiB of them).
    records = _share(records_file, share, of)
    service = BridgeService(Controller(load_config(config)), poll_interval=0.2)
    tally = _tally_store(service.controller.store) if os.environ.get("BENCH_TALLY") else None
    if tally is not None:
        _tally_dispatch(service.controller, tally)
    await service.start()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    print("ready", flush=True)
    # Warm-up: the first claims load mappings, value sets, validation models and TLS
    # sessions once per process; they are not what a running bridge spends per claim.
    assert (await lines.get()).strip() == "warm"
    for record in itertools.islice(records, WARM_UP):
        try:
            await service.submit(record, LINK_OUT)
        except PolicyError:
            pass
    print("warm", flush=True)
    assert (await lines.get()).strip() == "go"
    # The policy stage's CPU in this very process, on the thread that runs it: a share
    # of the sender's CPU that a change in the machine's speed between two measurements
    # cannot skew (stage_costs measures the stages in another process, at another time).
    import bridge.link.node as node_module

    policy_cpu = [0.0]
    apply_policy = node_module.apply_policy
    inside = [False]  # the stage is running (BENCH_POLICY_PHASES)
    phases = (_time_policy_phases(type(service.controller.consents_for(
        service.controller.outbound_link(LINK_OUT))), inside)
        if os.environ.get("BENCH_POLICY_PHASES") else None)

    def timed_policy(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        started = time.thread_time()
        try:
            return apply_policy(*args, **kwargs)
        finally:
            policy_cpu[0] += time.thread_time() - started
            inside[0] = False

    node_module.apply_policy = timed_policy  # type: ignore[assignment]
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    collector = CollectorClock()
    gc.callbacks.append(collector)
    if tally is not None:
        tally["_counting"][0] = True  # type: ignore[index]
    done: dict[str, Any] = {"created": 0, "duplicate": 0, "refused": 0}
    in_flight = asyncio.Semaphore(8)
    tasks: set[asyncio.Task[None]] = set()

    async def push(record: dict[str, Any]) -> None:
        try:
            sub = await service.submit(record, LINK_OUT)
            done["created" if sub.created else "duplicate"] += 1
        except PolicyError:
            done["refused"] += 1
        finally:
            in_flight.release()

    interval = of / rate if rate else 0.0
    started = loop.time()
    for k, record in enumerate(records):
        if interval:
            delay = started + k * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await in_flight.acquire()
        task = loop.create_task(push(record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    print("enqueued", flush=True)
    assert (await lines.get()).strip() == "stop"
    if prof:
        prof.disable()
        prof.dump_stats(str(profile))
    gc.callbacks.remove(collector)
    node_module.apply_policy = apply_policy  # type: ignore[assignment]
    done["policy_cpu_s"] = round(policy_cpu[0], 4)
    if phases is not None:
        done["policy_phases_s"] = {k: round(v, 4) for k, v in phases.items()}
    # CPU seconds of the cyclic garbage collector's passes in the measured part.
    done["gc_cpu_s"] = round(collector.total, 3)
    done["gc_passes"] = collector.passes
    done["gc_cpu_s_by_generation"] = [round(x, 3) for x in collector.by_generation]
    if tally is not None:
        tally.pop("_counting")[0] = False  # type: ignore[index]
        done["store"] = {k: [round(x, 1) for x in v] for k, v in sorted(tally.items())}
    # Requests and the claims that went in batches (warm-up included).
    stats = [d.stats for d in getattr(service, "dispatchers", {}).values()]
    done["requests"] = sum(st.requests for st in stats)
    done["batched"] = sum(st.batched for st in stats)
    await service.stop()
    print(json.dumps(done), flush=True)


# --- one run ---------------------------------------------------------------------------------


def _records(claims: int, seed: int) -> list[dict[str, Any]]:
    """``claims`` distinct inpatient claims of ``PATIENTS`` patients (consents are per
    patient: one each, registered before the run)."""
    from bridge.samples import inpatient_records

    out: list[dict[str, Any]] = []
    chunk = 0
    while len(out) < claims:
        out += inpatient_records(min(5000, claims - len(out)), seed=seed * 1000 + chunk)
        chunk += 1
    # A patient keeps one identity document, one medical record number (病案号, for life
    # at a hospital) and one health card across stays; each stay has its own inpatient
    # number (住院号). The bridge's identity index then grows by one pseudonym per stay,
    # as at a hospital, not by a new 病案号 and health card on every claim.
    people = [{k: r["elements"].get(k) for k in _PERSON_ELEMENTS} for r in out[:PATIENTS]]
    for i, r in enumerate(out):
        for k, v in people[i % len(people)].items():
            if v is None:
                r["elements"].pop(k, None)
            else:
                r["elements"][k] = v
        r["elements"]["HDSD00.11.140"] = f"ZY{seed:03d}{i:09d}"  # one claim per visit
    return out


#: The identity document's type and number, the 病案号 and the health card number.
_PERSON_ELEMENTS = ("HDSD00.11.049", "HDSD00.11.048", "HDSD00.11.006", "HDSD00.11.053")


def _use_postgres(config: Path, schema: str) -> None:
    text = config.read_text(encoding="utf-8")
    start = text.index("[store]\n")
    end = text.index("\n[", start + 1)
    config.write_text(text[:start] + f'[store]\nkind = "postgresql"\ndsn = "{PG_DSN}"\n'
                      f'schema = "{schema}"\n' + text[end:], encoding="utf-8")


def _settled(store: Any, link: str) -> int:
    """Wait until nothing is queued or being sent on ``link``; the acked count then."""
    while True:
        counts = store.outbox_counts(link)
        if counts.get("queued", 0) + counts.get("sending", 0) == 0:
            return int(counts.get("acked", 0))
        time.sleep(0.05)


def _drop_schemas(schemas: list[str]) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run_once(claims: int, rate: float, seed: int, *, store: str = "sqlite", senders: int = 1,
             profile: Path | None = None, soak_every: int = 0, batch: bool = True,
             loop: str = "auto") -> dict[str, Any]:
    from bridge.config import load_config
    from bridge.demo import HOSPITAL, INSURER, LINK_OUT, _full_consent, free_port, write_configs
    from bridge.ledger import open_store
    from bridge.link.node import Controller
    from bridge.trust.pki import init_dev_pki

    with tempfile.TemporaryDirectory(prefix="bench-claim-push-") as tmp:
        root = Path(tmp)
        init_dev_pki(root / "pki", [HOSPITAL, INSURER])
        hospital_cfg, insurer_cfg = write_configs(root, free_port(), free_port())
        if not batch:  # one message per request, as to a partner without batches
            text = hospital_cfg.read_text(encoding="utf-8")
            hospital_cfg.write_text(text.replace('purpose = "HPAYMT"\n',
                                                 'purpose = "HPAYMT"\nmax_batch_entries = 0\n', 1),
                                    encoding="utf-8")
        schemas: list[str] = []
        if store == "postgres":
            tag = uuid.uuid4().hex[:8]
            schemas = [f"bench_h_{tag}", f"bench_i_{tag}"]
            _use_postgres(hospital_cfg, schemas[0])
            _use_postgres(insurer_cfg, schemas[1])
        records = _records(claims, seed)
        records_file = root / "records.jsonl"
        with records_file.open("wb") as out:
            for record in records:
                out.write(orjson.dumps(record) + b"\n")

        async def consents() -> None:
            controller = Controller(load_config(hospital_cfg))
            now = datetime.now(UTC)
            for n, record in enumerate(records[:PATIENTS]):
                await controller.put_consent(_full_consent(record, f"bench-{n}", now))
            await controller.close()

        asyncio.run(consents())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BRIDGE_EVENT_LOOP": loop}
        insurer_cmd = [sys.executable, "-m", "bridge", "serve", "--config", str(insurer_cfg)]
        if profile and not PY_SPY:
            insurer_cmd[1:1] = ["-m", "cProfile", "-o", str(profile / "receiver.prof")]
        logs = contextlib.ExitStack()
        insurer = subprocess.Popen(insurer_cmd, stdout=subprocess.PIPE,
                                   stderr=logs.enter_context(open(root / "insurer.log", "wb")),  # noqa: SIM115
                                   env=env)
        procs: list[subprocess.Popen[str]] = []
        try:
            assert insurer.stdout is not None
            line = insurer.stdout.readline()
            if not line.startswith(b"ready"):
                raise SystemExit((root / "insurer.log").read_text())
            for i in range(senders):
                config = hospital_cfg
                if i:  # another process of the same controller: its own listening port
                    config = root / f"hospital-{i}.toml"
                    config.write_text(re.sub(r"(?m)^port = \d+$", f"port = {free_port()}",
                                             hospital_cfg.read_text(encoding="utf-8"), count=1),
                                      encoding="utf-8")
                cmd = [sys.executable, __file__, "--sender", str(config),
                       str(records_file), str(i), str(senders), str(rate)]
                if profile and not PY_SPY:
                    cmd.append(str(profile / f"sender-{i}.prof"))
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, text=True, env=env,
                                              stderr=logs.enter_context(
                                                  open(root / f"sender-{i}.log", "wb"))))  # noqa: SIM115
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "ready":
                    raise SystemExit((root / "sender-0.log").read_text())
            hs = open_store(load_config(hospital_cfg).store)
            for p in procs:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("warm\n")
                p.stdin.flush()
                p.stdout.readline()
            warm = _settled(hs, LINK_OUT)
            pids = {"sender": [p.pid for p in procs], "receiver": [insurer.pid]}
            spies = []
            if profile and PY_SPY:
                for side, ps in pids.items():
                    for k, pid in enumerate(ps):
                        spies.append(subprocess.Popen(
                            [PY_SPY, "record", "--pid", str(pid), "--format", "raw",
                             "--rate", "250", "--nonblocking", "--threads",
                             "-o", str(profile / f"{side}-{k}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1.0)
            idle = 0.0
            if os.environ.get("BENCH_TALLY"):  # what the senders spend doing nothing
                idle0 = sum(cpu_seconds(pid) for pid in pids["sender"])
                time.sleep(3.0)
                idle = (sum(cpu_seconds(pid) for pid in pids["sender"]) - idle0) / 3.0
            cpu0 = {side: sum(cpu_seconds(pid) for pid in ps) for side, ps in pids.items()}
            sys0 = {side: sum(kernel_seconds(pid) for pid in ps) for side, ps in pids.items()}
            rss: list[dict[str, float]] = []
            started = time.perf_counter()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            enqueuing = {p.stdout.fileno(): p for p in procs if p.stdout is not None}
            step = soak_every
            # The most claims waiting at the sender since the last soak line: a sender
            # keeps up to _QUEUED_FORMS_MAX signed messages whole for their dispatch, so
            # a long backlog would raise its resident size.
            backlog = 0
            while True:
                # Senders say "enqueued" when they have queued their share.
                ready, _, _ = select.select(list(enqueuing), [], [], 0)
                for fd in ready:
                    enqueuing.pop(fd).stdout.readline()  # type: ignore[union-attr]
                counts = hs.outbox_counts(LINK_OUT)
                waiting = counts.get("queued", 0) + counts.get("sending", 0)
                if not enqueuing and waiting == 0:
                    break
                backlog = max(backlog, waiting)
                while soak_every and counts.get("acked", 0) - warm >= step:
                    rss.append({"claims": counts["acked"] - warm, "backlog": backlog,
                                **{side: sum(rss_mib(pid) for pid in ps)
                                   for side, ps in pids.items()},
                                **{f"{side}_cpu": sum(cpu_seconds(pid) for pid in ps)
                                   for side, ps in pids.items()}})
                    step += soak_every
                    backlog = waiting
                # A soak's outbox grows to 100,000 rows, and counting them is work on
                # the shared cores: it is asked less often.
                time.sleep(0.5 if soak_every else 0.05)
            elapsed = time.perf_counter() - started
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            cpu = {side: sum(cpu_seconds(pid) for pid in ps) - cpu0[side]
                   for side, ps in pids.items()}
            kernel = {side: sum(kernel_seconds(pid) for pid in ps) - sys0[side]
                      for side, ps in pids.items()}
            rss_end = {side: sum(rss_mib(pid) for pid in ps) for side, ps in pids.items()}
            with hs.read("bench") as tx:
                rows = tx.all("SELECT created, updated FROM outbox WHERE state = 'acked'"
                              " ORDER BY seq")[warm:]
            counts = hs.outbox_counts(LINK_OUT)
            hs.close()
            done = []
            for p in procs:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("stop\n")
                p.stdin.flush()
                done.append(json.loads(p.stdout.readline()))
                p.wait(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            insurer.terminate()
            insurer.wait(timeout=60)
            logs.close()
        with open_store(load_config(insurer_cfg).store) as ins:
            inbox = ins.inbox_count(HOSPITAL)
            dups = sum(1 for e in ins.audit_entries() if e.record.action == "message.duplicate")
        if schemas:
            _drop_schemas(schemas)
    acked = counts.get("acked", 0) - warm
    claims -= WARM_UP * senders
    latencies = [(_instant(u) - _instant(c)).total_seconds() for c, u in rows]
    return {"claims": claims, "acked": acked, "inbox": inbox, "duplicates": dups,
            "lost": claims - acked - counts.get("refused", 0) - counts.get("rejected", 0)
            - sum(d["refused"] for d in done),
            "elapsed": elapsed, "rate": acked / elapsed if elapsed else 0.0,
            "cpu_ms": {side: cpu[side] * 1000 / max(acked, 1) for side in cpu},
            "policy_share": sum(d.get("policy_cpu_s", 0.0) for d in done) / cpu["sender"]
            if cpu.get("sender") else 0.0,
            "policy_ms": sum(d.get("policy_cpu_s", 0.0) for d in done) * 1000 / max(acked, 1),
            "policy_phases_ms": _phases_per_claim(done, acked),
            "kernel_ms": {side: kernel[side] * 1000 / max(acked, 1) for side in kernel},
            "p50": _pct(latencies, 0.5) * 1000, "p99": _pct(latencies, 0.99) * 1000,
            "rss": rss, "rss_end": rss_end, "senders": done, "idle_ms_per_s": idle * 1000}


def _phases_per_claim(done: list[dict[str, Any]], claims: int) -> dict[str, float]:
    """CPU milliseconds per claim of each policy phase, over every sender (empty without
    BENCH_POLICY_PHASES); what the stage spends outside them is ``the rest``."""
    spent: dict[str, float] = {}
    for d in done:
        for phase, seconds in (d.get("policy_phases_s") or {}).items():
            spent[phase] = spent.get(phase, 0.0) + seconds
    if not spent:
        return {}
    total = sum(d.get("policy_cpu_s", 0.0) for d in done)
    spent["the rest (items judged, held back, decision record)"] = total - sum(spent.values())
    return {k: v * 1000 / max(claims, 1) for k, v in spent.items()}


def _instant(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def stage_costs(samples: int = 300) -> dict[str, float]:
    """Median milliseconds per claim of each stage, without sockets."""
    from bridge.link.server import validate_message
    from bridge.mapping import map_record, patient_identifiers
    from bridge.messages import collection_of, wrap_message
    from bridge.policy.consent import ConsentRegistry
    from bridge.policy.engine import apply_policy, build_consent
    from bridge.policy.profile import load_link_profile
    from bridge.records.fhir import ValidationCache, validation_cache
    from bridge.samples import inpatient_records
    from bridge.trust.jws import KeyRing, Signer, digest, sign_bundle, verify_bundle
    from bridge.trust.pki import init_dev_pki

    now = datetime.now(UTC)
    records = inpatient_records(samples, seed=3)
    registry = ConsentRegistry()
    for i, record in enumerate(records):
        ids = patient_identifiers(map_record(record, now=now))
        system, value = next(((s, v) for s, v in ids if s.endswith(".1.3")), ids[0])
        registry.put(
            build_consent(
                consent_id=f"b-{i}",
                patient_system=system,
                patient_value=value,
                recipient="insurer-b",
                purposes=["HPAYMT"],
                start=now - timedelta(days=1),
                end=now + timedelta(days=1),
                sensitive_classes=(
                    "sexual-reproductive",
                    "infectious",
                    "mental",
                    "malignant",
                    "genetic",
                    "anal",
                    "rare",
                    "incurable",
                ),
                hospital_partner_id="hospital-a",
            ),
            now=now,
        )
    profile = load_link_profile("commercial-insurance")
    with tempfile.TemporaryDirectory() as tmp:
        pki = init_dev_pki(Path(tmp), ["hospital-a"])
        files = pki.controllers["hospital-a"]
        signer = Signer.from_files(files.sign_key, files.sign_cert)
        ring = KeyRing()
        ring.add_certificate("hospital-a", files.sign_cert)

    # Each side has its own process and its own validation cache. Forget what mapping the
    # records for their consents proved, then warm the sender's cache on other records,
    # as a bridge that has been running for a while would be; the receiver's cache grows
    # from what it receives.
    validation_cache().clear()
    for other in inpatient_records(200, seed=99):
        map_record(other, now=now)
    receiver_cache = ValidationCache()

    timings: dict[str, list[float]] = {
        k: []
        for k in (
            "map+validate (sender)",
            "policy (classify, consent, minimise)",
            "wrap+sign",
            "serialise (orjson)",
            "verify signature (receiver)",
            "validate (receiver)",
            "profile check (receiver)",
        )
    }
    for n, record in enumerate(records):
        t0 = time.perf_counter()
        collection = map_record(record, now=now)
        t1 = time.perf_counter()
        result = apply_policy(
            collection,
            registry=registry,
            profile=profile,
            recipient="insurer-b",
            purpose="HPAYMT",
            now=now,
            owned=True,  # as Controller.policy gives it the collection it mapped
        )
        t2 = time.perf_counter()
        mid = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        message = wrap_message(
            result.bundle,
            message_id=mid,
            event="claim-submit",
            sender="hospital-a",
            receiver="insurer-b",
            source_endpoint="https://a/fhir",
            destination_endpoint="https://b/fhir",
            now=now,
        )
        signed = sign_bundle(
            message, signer, issuer="hospital-a", audience="insurer-b", message_id=mid, now=now
        )
        t3 = time.perf_counter()
        body = orjson.dumps(signed)
        digest(body)
        t4 = time.perf_counter()
        received = orjson.loads(body)
        verify_bundle(
            received, ring, expected_issuer="hospital-a", expected_audience="insurer-b", now=now
        )
        t5 = time.perf_counter()
        validate_message(received, cache=receiver_cache, parsed=True)
        t6 = time.perf_counter()
        profile.check(collection_of(received))
        t7 = time.perf_counter()
        for key, a, b in zip(
            timings, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7), strict=True
        ):
            timings[key].append((b - a) * 1000)
    return {k: statistics.median(v[20:]) for k, v in timings.items()}




def top_sampled(path: Path, n: int = 15) -> list[str]:
    """The ``n`` functions most often on top of the stack in a py-spy raw profile (samples
    of threads on CPU only: own time, every thread of the process)."""
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        func, _, where = leaf.partition(" (")
        where = where.rstrip(")").rsplit(":", 1)[0]
        where = where.split("site-packages/")[-1].split("/wt/chain/")[-1].split("lib/python3")[-1]
        key = f"{func} ({where})"
        own[key] = own.get(key, 0) + int(count)
        total += int(count)
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return [f"{c / max(total, 1):6.1%}  {k}" for k, c in rows]


def top_functions(path: Path, n: int = 15) -> list[str]:
    """The ``n`` functions with the most own time in a cProfile dump."""
    stats = pstats.Stats(str(path))
    # Waiting in epoll is idle time, not work: left out of the ranking and the total.
    busy = {k: v for k, v in stats.stats.items()  # type: ignore[attr-defined]
            if "select.epoll" not in k[2] and "uv_run" not in k[2]}
    total = sum(v[2] for v in busy.values()) or 1.0
    rows = sorted(busy.items(), key=lambda kv: -kv[1][2])[:n]
    out = []
    for (file, line, func), (_cc, calls, tottime, _ct, _callers) in rows:
        where = file.split("site-packages/")[-1].split("/wt/chain/")[-1]
        out.append(f"{tottime / total:6.1%}  {calls:>9}  {func} ({where}:{line})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=2000, help="claims of the saturated run")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="offered rate (claims/s) for the latency run; 0 skips it")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--senders", type=int, default=1,
                        help="hospital bridge processes on one outbox (PostgreSQL store)")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="one saturated run of N claims, resident size sampled")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="cProfile each side of the saturated run; print top 15 each")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage costs")
    parser.add_argument("--batch", choices=("on", "off", "both"), default="both",
                        help="several claims per request (PROTOCOL §6b), one per request, or"
                             " both reported one after the other")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="asyncio",
                        help="event loop of both sides (BRIDGE_EVENT_LOOP); auto = uvloop if"
                             " installed")
    parser.add_argument("--sender", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        from bridge import eventloop

        cfg, records, share, of, rate, *prof = args.sender
        eventloop.run(sender(Path(cfg), Path(records), int(share), int(of), float(rate),
                             Path(prof[0]) if prof else None))
        return
    if args.senders > 1 and args.store != "postgres":
        parser.error("--senders above 1 needs --store postgres (one outbox, several processes)")

    print(f"load average before: {load()}  ({os.cpu_count()} cores)")
    costs = {} if args.no_stages else stage_costs()
    if args.soak:
        r = run_once(args.soak, 0.0, 1, store=args.store, senders=args.senders,
                     soak_every=max(1, args.soak // 20))
        print(f"soak: {r['acked']} claims in {r['elapsed']:.0f} s, lost {r['lost']};"
              f" CPU ms/claim sender {r['cpu_ms']['sender']:.2f},"
              f" receiver {r['cpu_ms']['receiver']:.2f}")
        # CPU per claim over each step: a cost that grew with the store's size shows here.
        print("  claims      sender RSS MiB   receiver RSS MiB   CPU ms/claim since the last"
              " line: sender, receiver;   most claims waiting at the sender since the last"
              " line (polled every 0.5 s)")
        last: dict[str, Any] | None = None
        for s in r["rss"]:
            step_cpu = ""
            if last is not None:
                n = max(s["claims"] - last["claims"], 1)
                step_cpu = (f"   {(s['sender_cpu'] - last['sender_cpu']) * 1000 / n:6.2f}"
                            f"   {(s['receiver_cpu'] - last['receiver_cpu']) * 1000 / n:6.2f}")
            print(f"  {s['claims']:>8}   {s['sender']:10.1f}   {s['receiver']:10.1f}{step_cpu}"
                  f"   {s['backlog']:>8,}")
            last = s
        first = r["rss"][len(r["rss"]) // 10] if r["rss"] else None
        if first:
            for side in ("sender", "receiver"):
                print(f"  {side}: {first[side]:.1f} MiB at {first['claims']} claims -> "
                      f"{r['rss_end'][side]:.1f} MiB at the end "
                      f"({r['rss_end'][side] / first[side] - 1:+.1%})")
        print(f"load average after: {load()}")
        return

    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    variants = {"on": [True], "off": [False], "both": [False, True]}[args.batch]
    for batched in variants:
        variant = {"batch": batched, "loop": args.loop}
        label = "batches (several claims per request)" if batched else "one claim per request"
        profile_this = args.profile if batched == variants[-1] else None
        sat = [run_once(args.claims, 0.0, seed, store=args.store, senders=args.senders,
                        **variant)
               for seed in range(args.runs)]
        med = statistics.median
        print(f"\n== {label} (event loop {args.loop})\nsaturated: {args.claims} claims x "
              f"{args.runs} runs, store {args.store}, {args.senders} sender process(es)")
        print(f"  per sender: {[s['senders'] for s in sat]}")
        if os.environ.get("BENCH_TALLY"):
            print(f"  idle senders: CPU {[round(s['idle_ms_per_s'], 1) for s in sat]} ms/s")
        print(f"  claims/s  {med(s['rate'] for s in sat):7.1f}   runs "
              f"{[round(s['rate']) for s in sat]};  lost {sum(s['lost'] for s in sat)}, "
              f"duplicates at the receiver {sum(s['duplicates'] for s in sat)}, "
              f"inbox {[s['inbox'] for s in sat]}")
        for side, stages in (("sender", SENDER_STAGES), ("receiver", RECEIVER_STAGES)):
            cpu = med(s["cpu_ms"][side] for s in sat)
            print(f"  {side}: CPU {cpu:6.2f} ms/claim  runs "
                  f"{[round(s['cpu_ms'][side], 2) for s in sat]}  (of which in the kernel "
                  f"{med(s['kernel_ms'][side] for s in sat):.2f}: writes, fsync, sockets)")
            if costs:
                staged = sum(costs[k] for k in stages)
                for k in stages:
                    print(f"      {k:<40} {costs[k]:6.3f} ms")
                print(f"      {'around the stages':<40} {cpu - staged:6.3f} ms"
                      f"  ({(cpu - staged) / cpu:.0%})")
                if side == "sender":
                    policy = costs["policy (classify, consent, minimise)"]
                    print(f"      policy stage = {policy / cpu:.1%} of the sender's CPU per "
                          f"claim (target <= 10 %)")
            if side == "sender":
                shares = [s["policy_share"] for s in sat]
                print(f"      policy stage measured in the sender itself (apply_policy's CPU"
                      f" on its thread): {med(shares):.1%} of the sender's CPU, runs "
                      f"{[f'{x:.1%}' for x in shares]} (target <= 10 %)")
                if any(s["policy_phases_ms"] for s in sat):
                    stage = med(s["policy_ms"] for s in sat)
                    print(f"      where it goes in the sender ({stage:.3f} ms/claim; median of"
                          f" the runs, timers included):")
                    names = dict.fromkeys(k for s in sat for k in s["policy_phases_ms"])
                    for k in sorted(names, key=lambda n: -med(
                            s["policy_phases_ms"].get(n, 0.0) for s in sat)):
                        ms = med(s["policy_phases_ms"].get(k, 0.0) for s in sat)
                        print(f"        {k:<54} {ms:6.3f} ms  {ms / stage:6.1%}")
        if profile_this:  # one more saturated run, profiled (its CPU figures are not quoted)
            run_once(args.claims, 0.0, 99, store=args.store, senders=args.senders,
                     profile=profile_this, **variant)
            for name in sorted(p.name for p in args.profile.glob("*.prof")):
                print(f"\n  top 15 by own time, {name} (cProfile; share of profiled time, calls):")
                for row in top_functions(args.profile / name):
                    print("    " + row)
            for name in sorted(p.name for p in args.profile.glob("*.txt")):
                print(f"\n  top 15 by own time, {name} (py-spy samples on CPU, all threads):")
                for row in top_sampled(args.profile / name):
                    print("    " + row)
        if args.rate:
            n = int(args.rate * 10)
            fixed = [run_once(n, args.rate, 10 + seed, store=args.store,
                              senders=args.senders, **variant)
                     for seed in range(args.runs)]
            print(f"\noffered {args.rate:.0f} claims/s, {n} claims x {args.runs} runs:")
            print(f"  latency p50 {med(s['p50'] for s in fixed):7.1f} ms   p99 "
                  f"{med(s['p99'] for s in fixed):7.1f} ms   runs "
                  f"{[round(s['p99'], 1) for s in fixed]}")
            for side in ("sender", "receiver"):
                print(f"  {side}: CPU {med(s['cpu_ms'][side] for s in fixed):6.2f} ms/claim")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
