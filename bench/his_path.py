"""HIS path benchmark: HL7 v2 over MLLP, from AA to the claim queued.

The hospital bridge runs in this process (MLLP on loopback, SQLite with
synchronous=FULL, audit chain, visit assembly, routing, consent, minimisation, ES256
signing, the outbox); the HIS runs in a separate process, so the CPU time measured
here is the bridge's alone. The dispatchers are not started: the path ends when the
claim is queued, which is what is measured. One visit is ADT^A01 + 20 DFT^P03 +
ADT^A03 (22 messages); the claim is queued after the discharge.

Prints:

- saturated: messages per second from the first message sent to the last claim
  queued, with ``--connections`` HIS connections sending in original mode (each waits
  for its ACK), and the bridge's CPU milliseconds per message;
- paced: AA latency p50/p99 (send to ACK, measured by the HIS) at ``--rate``
  messages per second;
- where the time goes: a cProfile of a saturated run, grouped by stage.

Figures are medians of ``--runs`` runs; the machine is shared and noisy (2 cores).

    python bench/his_path.py [--visits 60] [--connections 4] [--rate 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FACILITY = "杭州市滨江区第一人民医院^47011235-7^L"
ID_CARD = "330106198503124512"
ITEMS = ["01", "02", "03", "06", "07", "13", "1301", "1001", "1002", "23"]


# --- the HIS (runs in its own process) -------------------------------------------------------


def _msh(type_: str, cid: str, ts: str) -> str:
    return (f"MSH|^~\\&|HIS|{FACILITY}|FHIRBRIDGE|BRIDGE|{ts}||{type_}|{cid}|P|2.5|||AL|NE|CHN|"
            "UNICODE UTF-8")


def _pid(visit: str) -> str:
    return (f"PID|1||{ID_CARD}^^^公安部^NNCHN~{visit}^^^HOSP^IPN~BA{visit[-7:]}^^^HOSP^MR||"
            "王^建国||19850312|M|||文三路138号^3幢201室^杭州市^浙江省^310013^CHN^H^转塘街道^西湖区||"
            "13905710001^PRN^PH|||M||||||01")


def _pv1(visit: str, end: str) -> str:
    f = ["PV1", "1", "I", "心内科一病区^0501^12", "", "", "", "D0012^周^文博", "", "",
         "心血管内科", "", "", "", "1", "", "", "D0107^吴^海涛", "", visit, "01"]
    f += [""] * (36 - len(f)) + ["1" if end else ""]
    f += [""] * (44 - len(f)) + ["20260301083000", end]
    return "|".join(f)


def visit_messages(n: int) -> list[bytes]:
    """The 22 messages of visit ``n``: A01, 20 DFT^P03, A03."""
    visit = f"ZY{n:010d}"
    out = ["\r".join([_msh("ADT^A01^ADT_A01", f"{visit}-A", "20260301083000"),
                      "EVN|A01|20260301083000", _pid(visit), _pv1(visit, ""),
                      "DG1|1||I21.000^急性前壁心肌梗死^ICD10||20260301|A"]) + "\r"]
    for d in range(20):
        ts = f"202603{2 + d // 4:02d}{10 + d % 4:02d}0000"
        ft1 = [f"FT1|{i}|{visit}-{d}-{i}||20260305|20260305|CG|{item}^收费项目^L|||1|"
               f"{(d + 1) * 10 + i}.50" for i, item in enumerate(ITEMS[d % 5:d % 5 + 5], 1)]
        out.append("\r".join([_msh("DFT^P03^DFT_P03", f"{visit}-D{d}", ts), f"EVN|P03|{ts}",
                              _pid(visit), _pv1(visit, ""), *ft1]) + "\r")
    out.append("\r".join([_msh("ADT^A03^ADT_A03", f"{visit}-Z", "20260309100000"),
                          "EVN|A03|20260309100000", _pid(visit), _pv1(visit, "20260309100000"),
                          "DG1|1||I21.000^急性前壁心肌梗死^ICD10||20260309|F|||||||||1",
                          "PR1|1||36.06^冠状动脉药物洗脱支架置入术^ICD9CM3||20260302103000"])
               + "\r")
    return [m.encode("utf-8") for m in out]


async def _connection(port: int, messages: list[bytes], pace: float,
                      start: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    buf = b""
    loop = asyncio.get_running_loop()
    for i, message in enumerate(messages):
        if pace:
            delay = start + i * pace - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        sent = loop.time()
        writer.write(b"\x0b" + message + b"\x1c\r")
        while b"\x1c\r" not in buf:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("bridge closed the connection")
            buf += chunk
        ack, _, buf = buf.partition(b"\x1c\r")
        if b"MSA|AA|" not in ack:
            raise SystemExit(f"not accepted: {ack!r}")
        latencies.append(loop.time() - sent)
    writer.close()
    return latencies


async def his(port: int, first: int, visits: int, connections: int, rate: float) -> None:
    """Send ``visits`` visits over ``connections`` connections, each visit on one."""
    per: list[list[bytes]] = [[] for _ in range(connections)]
    for n in range(first, first + visits):
        per[n % connections] += visit_messages(n)
    pace = connections / rate if rate else 0.0
    start = asyncio.get_running_loop().time() + 0.05
    results = await asyncio.gather(*(_connection(port, m, pace, start) for m in per))
    sys.stdout.write(json.dumps([x for r in results for x in r]) + "\n")


# --- the bridge (this process) ----------------------------------------------------------------


async def _bridge(root: Path) -> Any:
    from bridge.config import load_config
    from bridge.demo import HOSPITAL, INSURER, LINK_OUT, free_port, write_configs
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.trust.pki import init_dev_pki

    init_dev_pki(root / "pki", [HOSPITAL, INSURER])
    hospital_cfg, _ = write_configs(root, free_port(), free_port())
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[mllp]\nhost = "127.0.0.1"\nport = 0\ntls = false\n'
                 f'[[routes]]\nmessage = ["ADT^A03"]\ndataset = ["WS445.10"]\n'
                 f'links = ["{LINK_OUT}"]\n')
    service = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.5)
    service.dispatchers = {}  # the path ends when the claim is queued
    await service.start()
    await service.controller.put_consent(_consent(HOSPITAL, INSURER))
    return service


def _consent(hospital: str, insurer: str) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from bridge.policy.engine import build_consent

    now = datetime.now(UTC)
    return build_consent(consent_id="bench", patient_system="urn:oid:2.16.156.10011.1.3",
                         patient_value=ID_CARD, recipient=insurer, purposes=["HPAYMT"],
                         start=now - timedelta(days=1), end=now + timedelta(days=30),
                         sensitive_classes=(), hospital_partner_id=hospital)


async def _queued(service: Any) -> int:
    counts = await service.controller.db.outbox_counts()
    return int(sum(counts.values()))


async def run(visits: int, connections: int, rate: float, first: int,
              profiles: list[cProfile.Profile] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-his-") as tmp:
        service = await _bridge(Path(tmp))
        db = service.controller.db
        try:
            port = service.mllp_port
            cmd = [sys.executable, __file__, "--his", str(port), str(first), str(visits),
                   str(connections), str(rate)]
            if profiles is not None:
                # One profiler on the event loop's thread, one on the ledger's thread.
                profiles[:] = [cProfile.Profile(), cProfile.Profile()]
                profiles[0].enable()
                await db.call(profiles[1].enable)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            loop0, ledger0 = time.thread_time(), await db.call(time.thread_time)
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            while await _queued(service) < visits:
                await asyncio.sleep(0.005)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            loop_cpu = time.thread_time() - loop0
            ledger_cpu = await db.call(time.thread_time) - ledger0
            if profiles is not None:
                await db.call(profiles[1].disable)
                profiles[0].disable()
            latencies = json.loads(out)
        finally:
            await service.stop()
    messages = visits * 22
    return {"messages": messages, "rate": messages / wall, "cpu_ms": cpu * 1000 / messages,
            "loop_ms": loop_cpu * 1000 / messages, "ledger_ms": ledger_cpu * 1000 / messages,
            "p50": statistics.median(latencies) * 1000,
            "p99": sorted(latencies)[int(len(latencies) * 0.99)] * 1000}


IDLE = ("select.epoll", "_thread.lock", "time.sleep", "_queue.SimpleQueue",
        "method 'poll'", "method 'acquire'", "method 'get' of '_queue")

STAGES = [
    ("HL7 read, check, map (bridge/mapping/hl7v2)", ("mapping/hl7v2/",)),
    ("FHIR mapping and validation", ("mapping/engine", "records/fhir", "fhir_core",
                                     "fhir/resources", "pydantic")),
    ("consent, minimisation (policy)", ("bridge/policy/",)),
    ("signing (JWS, ES256)", ("trust/jws", "trust/algorithms", "cryptography")),
    ("store: SQLite statements and commits", ("sqlite3", "ledger/")),
    ("audit records and hash chain", ("ledger/audit",)),
    ("event loop, sockets, threads", ("asyncio", "selectors", "socket", "threading",
                                      "concurrent/futures")),
]


def where_time_goes(profiles: list[cProfile.Profile]) -> list[tuple[str, float]]:
    """Own (not cumulative) time per stage, as a share of the busy time of both threads
    (waiting in poll, locks and queues left out)."""
    stats = pstats.Stats(profiles[0], stream=io.StringIO())
    for more in profiles[1:]:
        stats.add(more)
    totals: dict[str, float] = {}
    grand = 0.0
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{name}"
        if any(k in where for k in IDLE):
            continue
        grand += tt
        stage = next((label for label, keys in STAGES if any(k in where for k in keys)),
                     "other (orjson, builtins, the rest)")
        totals[stage] = totals.get(stage, 0.0) + tt
    return sorted(((k, v / grand) for k, v in totals.items()), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visits", type=int, default=60, help="visits per run (22 messages each)")
    parser.add_argument("--connections", type=int, default=4, help="HIS connections")
    parser.add_argument("--rate", type=float, default=200.0, help="paced run: messages/s")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--his", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.his:
        port, first, visits, connections, rate = args.his
        asyncio.run(his(int(port), int(first), int(visits), int(connections), float(rate)))
        return

    saturated = [asyncio.run(run(args.visits, args.connections, 0.0, 1 + i * 100_000))
                 for i in range(args.runs)]
    paced = [asyncio.run(run(max(4, args.visits // 2), args.connections, args.rate,
                             5_000_000 + i * 100_000)) for i in range(args.runs)]
    profiles: list[cProfile.Profile] = []
    asyncio.run(run(args.visits, args.connections, 0.0, 9_000_000, profiles))

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"HIS path: {args.visits} visits x 22 messages, {args.connections} connections, "
          f"median of {args.runs} runs")
    print(f"  saturated: {med(saturated, 'rate'):7.0f} messages/s from first sent to last "
          f"claim queued; bridge CPU {med(saturated, 'cpu_ms'):.2f} ms/message; "
          f"AA p50 {med(saturated, 'p50'):.1f} ms, p99 {med(saturated, 'p99'):.1f} ms")
    print(f"    of which on the event loop {med(saturated, 'loop_ms'):.2f} ms, on the ledger "
          f"thread {med(saturated, 'ledger_ms'):.2f} ms (SQLite, audit chain)")
    print(f"  paced at {args.rate:.0f}/s: AA p50 {med(paced, 'p50'):.1f} ms, "
          f"p99 {med(paced, 'p99'):.1f} ms; bridge CPU {med(paced, 'cpu_ms'):.2f} ms/message")
    print("  where the bridge's time goes (own time, profiled saturated run):")
    for stage, share in where_time_goes(profiles):
        print(f"    {share * 100:5.1f}%  {stage}")


if __name__ == "__main__":
    main()
