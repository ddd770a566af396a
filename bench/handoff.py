"""Hand-off benchmark: received claims to the insurer's own systems (AMQP and HTTP).

For N claims already accepted into the insurer's inbox (a real signed 12-resource
claim, each under its own message identity), prints:

- the CPU added to accepting a claim by queueing its hand-off in the same transaction
  (``inbox_accept`` with and without the queue, per claim);
- hand-offs per second and CPU per hand-off of the worker draining one destination:
  RabbitMQ on 127.0.0.1:5672 (persistent messages, publisher confirms; one sender,
  so strictly one at a time) and an HTTP endpoint running in another process;
- the same with the claims spread over 4 senders (lines go in parallel).

CPU is this process's CPU time (the broker and the endpoint run elsewhere), divided
by the number of claims. Medians of ``--runs``; the machine is shared and noisy.

    python bench/handoff.py [--claims 1000] [--runs 3] [--store sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from bridge.config import load_config
from bridge.demo import HOSPITAL, INSURER, LINK_OUT, free_port, write_configs
from bridge.handoff import routes
from bridge.ledger.audit import AuditRecord
from bridge.ledger.handoff import queue_hook
from bridge.link.handoff import HandoffWorker
from bridge.link.node import Controller
from bridge.mapping import map_record, patient_identifiers
from bridge.policy.engine import build_consent
from bridge.samples import inpatient_records
from bridge.trust.pki import init_dev_pki

SENDERS = (HOSPITAL, "clinic-x", "clinic-y", "clinic-z")


def _endpoint(port: int, ready: Any) -> None:
    from aiohttp import web

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/claims", take)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def signed_claim(root: Path) -> bytes:
    hospital_cfg, _ = write_configs(root, free_port(), free_port())
    hospital = Controller(load_config(hospital_cfg))
    record = inpatient_records(1, seed=5)[0]
    now = datetime.now(UTC)
    ids = patient_identifiers(map_record(record, now=now))
    system, value = next(((s, v) for s, v in ids if s.endswith(".1.3")), ids[0])
    hospital.consents.put(build_consent(
        consent_id="bench", patient_system=system, patient_value=value, recipient=INSURER,
        purposes=["HPAYMT"], start=now - timedelta(days=1), end=now + timedelta(days=1),
        sensitive_classes=(), hospital_partner_id=HOSPITAL), now=now)
    signed, _ = hospital.prepare(record, LINK_OUT)
    hospital.store.close()
    return orjson.dumps(signed)


def _audit(mid: str) -> AuditRecord:
    return AuditRecord(time=datetime.now(UTC), actor=INSURER, action="message.receive",
                       subject=mid)


def fill(c: Controller, payload: bytes, n: int, senders: tuple[str, ...], hook: bool) -> float:
    """Accept ``n`` claims into the inbox; CPU seconds per claim."""
    store = c.store
    start = time.process_time()
    for i in range(n):
        sender = senders[i % len(senders)]
        mid = f"urn:uuid:{uuid.uuid4()}"
        now = datetime.now(UTC)
        store.inbox_accept(
            sender=sender, message_id=mid, digest="sha256:" + "0" * 64, payload=payload,
            audit=_audit(mid), make_receipt=lambda e: b'{"resourceType":"Bundle"}', now=now,
            within=queue_hook(c.handoff_routes, sender=sender, link="claims-in", now=now)
            if hook else None,
        )
    return (time.process_time() - start) / n


async def drain(c: Controller, index: int, n: int) -> tuple[float, float]:
    """Hand ``n`` queued claims to destination ``index``: (per second, CPU ms per claim)."""
    worker = HandoffWorker(c, c.config.handoff[index], index, poll_interval=0.01)
    cpu, wall = time.process_time(), time.perf_counter()
    await worker.start()
    while worker.stats["delivered"] < n:
        await asyncio.sleep(0.01)
    elapsed, used = time.perf_counter() - wall, time.process_time() - cpu
    await worker.stop()
    return n / elapsed, used / n * 1000


def one_run(claims: int, store_kind: str, senders: tuple[str, ...], http_port: int,
            payload: bytes) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        root = Path(tmp)
        init_dev_pki(root / "pki", [HOSPITAL, INSURER, *SENDERS[1:]])
        _, insurer_cfg = write_configs(root, free_port(), free_port())
        queue = f"bench-handoff-{uuid.uuid4().hex[:8]}"
        text = insurer_cfg.read_text(encoding="utf-8")
        if store_kind == "postgresql":
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            text = text.replace(
                f'[store]\npath = "{INSURER}/bridge.sqlite"',
                f'[store]\nkind = "postgresql"\ndsn = "host=127.0.0.1 user=postgres dbname=test"'
                f'\nschema = "{schema}"')
        for sender in senders[1:]:
            text += (f'\n[[partners]]\nid = "{sender}"\nsigning_certs = '
                     f'["pki/{sender}/sign.pem"]\n')
        text += (f'\n[[handoff]]\nid = "amqp"\nkind = "amqp"\nurl = "amqp://127.0.0.1:5672/"\n'
                 f'queue = "{queue}"\nbatch = 64\n'
                 f'\n[[handoff]]\nid = "http"\nkind = "http"\n'
                 f'url = "http://127.0.0.1:{http_port}/claims"\nbatch = 64\n')
        insurer_cfg.write_text(text, encoding="utf-8")
        c = Controller(load_config(insurer_cfg))
        c.handoff_routes = routes(c.config.handoff)
        try:
            base = fill(c, payload, claims, senders, hook=False)
            queued = fill(c, payload, claims, senders, hook=True)

            async def both() -> tuple[tuple[float, float], tuple[float, float]]:
                amqp = await drain(c, 0, claims)
                http = await drain(c, 1, claims)
                await c.db.aclose()
                return amqp, http

            (amqp_rate, amqp_cpu), (http_rate, http_cpu) = asyncio.run(both())
        finally:
            asyncio.run(_delete_queue(queue))
            if store_kind == "postgresql":
                import psycopg

                with psycopg.connect("host=127.0.0.1 user=postgres dbname=test",
                                     autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return {
        "accept_ms": base * 1000, "accept_queue_ms": queued * 1000,
        "amqp_rate": amqp_rate, "amqp_cpu_ms": amqp_cpu,
        "http_rate": http_rate, "http_cpu_ms": http_cpu,
    }


async def _delete_queue(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await connection.channel()
        await channel.queue_delete(name)
    finally:
        await connection.close()
        await asyncio.sleep(0.1)  # let the client's close callbacks finish before the loop ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()

    http_port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_endpoint, args=(http_port, ready), daemon=True)
    server.start()
    ready.wait(10)
    with tempfile.TemporaryDirectory() as tmp:
        init_dev_pki(Path(tmp) / "pki", [HOSPITAL, INSURER])
        payload = signed_claim(Path(tmp))
    print(f"hand-off of {args.claims} claims ({len(payload) / 1024:.1f} KB signed message),"
          f" {args.store} store, median of {args.runs} runs; shared 2-core machine, noisy")
    try:
        for senders in (SENDERS[:1], SENDERS):
            runs = [one_run(args.claims, args.store, senders, http_port, payload)
                    for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"\n{len(senders)} sender(s):")
            print(f"  accept without / with hand-off queue: {med['accept_ms']:.3f} /"
                  f" {med['accept_queue_ms']:.3f} ms CPU per claim"
                  f" (+{med['accept_queue_ms'] - med['accept_ms']:.3f} ms)")
            print(f"  AMQP: {med['amqp_rate']:8.0f} hand-offs/s, {med['amqp_cpu_ms']:.3f} ms CPU"
                  " per claim")
            print(f"  HTTP: {med['http_rate']:8.0f} hand-offs/s, {med['http_cpu_ms']:.3f} ms CPU"
                  " per claim")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
