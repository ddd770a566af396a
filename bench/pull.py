"""Record pull benchmark: ``$everything`` for one patient with many stays, and
``Patient?identifier=`` against a store of many patients.

Part 1: one patient with ``--stays`` inpatient stays (default 50), each a front sheet,
an admission record and a lab report joined by the inpatient number: about 1,100
resources released at the regional link's notify level. The hospital's bridge serves
over mutual TLS on loopback; a client in the same process pages through
``$everything`` (``_count`` = 200). Prints time to the last page (first traversal and
warm ones), released resources per second, and the CPU time per resource of the whole
process (server and client; the client's share is small but included).

Part 2: ``--patients`` patients (default 100,000) in the records store, made by cloning
one mapped front sheet with new identifiers (mapping 100,000 records would measure the
mapping, not the pull); consents for ``--consented`` of them. Prints the latency of
single ``Patient?identifier=`` searches one at a time (p50, p99) and the throughput
with 8 in flight.

Prints figures only; asserts nothing. The machine is shared by several engineers and
has 2 cores: figures are noisy; run twice and compare.

    python bench/pull.py [--stays 50] [--patients 100000] [--consented 2000] [--searches 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import ssl
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bridge.config import load_config
from bridge.demo import free_port
from bridge.ledger import records as rec
from bridge.ledger.records import put_records
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.mapping import map_record
from bridge.policy.consent import build_consent
from bridge.samples import inpatient_records
from bridge.samples_documents import admission_records
from bridge.samples_outpatient import lab_records
from bridge.trust.pki import init_dev_pki

HOSPITAL, PLATFORM = "hospital-a", "platform-r"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
_PERSON = ("HDSD00.11.118", "HDSD00.11.119", "HDSD00.11.006", "HDSD00.11.110", "HDSD00.11.109",
           "HDSD00.11.014", "HDSD00.11.036", "HDSD00.11.077", "HDSD00.11.049", "HDSD00.11.048",
           "HDSD00.11.050", "HDSD00.11.125", "HDSD00.11.026", "HDSD00.11.102", "HDSD00.11.103",
           "HDSD00.11.104", "HDSD00.11.105", "HDSD00.11.100", "HDSD00.11.101", "HDSD00.11.106")


def write_config(root: Path) -> Path:
    init_dev_pki(root / "pki", [HOSPITAL, PLATFORM], now=datetime.now(UTC) - timedelta(days=1))
    cfg = root / "hospital.toml"
    cfg.write_text(f"""\
[controller]
id = "{HOSPITAL}"
name = "示范市第一人民医院"
[server]
port = {free_port()}
[tls]
ca = "pki/ca.pem"
cert = "pki/{HOSPITAL}/tls.pem"
key = "pki/{HOSPITAL}/tls.key"
[signing]
cert = "pki/{HOSPITAL}/sign.pem"
key = "pki/{HOSPITAL}/sign.key"
[store]
path = "store/bridge.sqlite"
[audit]
pseudonym_key_file = "store/audit.key"
[[partners]]
id = "{PLATFORM}"
signing_certs = ["pki/{PLATFORM}/sign.pem"]
[[links]]
id = "records-to-platform"
partner = "{PLATFORM}"
direction = "pull"
profile = "regional-interoperability"
purpose = "TREAT"
[links.pull]
level = "notify"
max_count = 200
rate_per_second = 100000
rate_burst = 100000
bulk_alarm_patients = 1000000
""", encoding="utf-8")
    return cfg


def one_patient(stays: int, seed: int = 3) -> list[dict[str, Any]]:
    sheets = inpatient_records(stays, seed=seed)
    labs = lab_records(stays, seed=seed)
    admissions = admission_records(stays, seed=seed)
    person = {k: sheets[0]["elements"][k] for k in _PERSON if k in sheets[0]["elements"]}
    out: list[dict[str, Any]] = []
    for i, sheet in enumerate(sheets):
        inpatient_no = f"ZY{seed:04d}{i:06d}"
        elements = dict(sheet["elements"], **person)
        elements["HDSD00.11.140"] = inpatient_no
        elements.pop("HDSD00.11.079", None)
        out.append({**sheet, "elements": elements})
        le = dict(labs[i]["elements"], **{"HDSD00.05.078": inpatient_no})
        le.pop("HDSD00.05.064", None)
        out.append({**labs[i], "elements": le})
        ae = dict(admissions[i]["elements"], **{"HDSD00.13.116": inpatient_no})
        out.append({**admissions[i], "elements": ae})
    return out


def consent(system: str, value: str, n: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return build_consent(consent_id=f"bench-{n}", patient_system=system, patient_value=value,
                         recipient=PLATFORM, purposes=["TREAT"], start=now - timedelta(days=1),
                         end=now + timedelta(days=30), hospital_partner_id=HOSPITAL)


def client_ssl(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.pem"))
    ctx.load_cert_chain(root / "pki" / PLATFORM / "tls.pem", root / "pki" / PLATFORM / "tls.key")
    return ctx


async def traverse(session: aiohttp.ClientSession, base: str, pid: str) -> tuple[int, int]:
    url: str | None = f"{base}/Patient/{pid}/$everything?_count=200"
    pages = resources = 0
    while url:
        async with session.get(url) as resp:
            body = orjson.loads(await resp.read())
        pages += 1
        resources += len(body.get("entry", []))
        url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None)
    return pages, resources


async def part_everything(root: Path, stays: int) -> None:
    controller = Controller(load_config(write_config(root)))
    records = one_patient(stays)
    t0 = time.perf_counter()
    for record in records:
        await controller.keep_for_pull(record, source="bench")
    keep_s = time.perf_counter() - t0
    system, value = ID_CARD, records[0]["elements"]["HDSD00.11.048"]
    await controller.put_consent(consent(system, value, 0))
    service = BridgeService(controller)
    await service.start()
    base = f"https://127.0.0.1:{service.port}/fhir"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(root))) as s:
            async with s.get(f"{base}/Patient", params={"identifier": f"{system}|{value}"}) as r:
                pid = orjson.loads(await r.read())["entry"][0]["resource"]["id"]
            every_type = sorted(set(controller.profiles["records-to-platform"].allowed)
                                | {"Claim", "Coverage", "Specimen", "ServiceRequest"})
            stored = len(await controller.db.call(
                rec.page, controller.store, person=pid, types=every_type,
                snapshot_seq=10**12, after=0, limit=10**6))
            t = time.perf_counter()
            pages, released = await traverse(s, base, pid)
            cold = time.perf_counter() - t
            walls, cpus = [], []
            for _ in range(5):
                c0, w0 = time.process_time(), time.perf_counter()
                await traverse(s, base, pid)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
    finally:
        await service.stop()
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"$everything, one patient with {stays} stays ({len(records)} source records, kept in "
          f"{keep_s:.1f} s):")
    print(f"  stored resources {stored}, released at notify {released} in {pages} pages of <= 200")
    print(f"  first traversal   {cold * 1000:8.1f} ms to the last page")
    print(f"  warm (median of 5) {wall * 1000:7.1f} ms to the last page, "
          f"{released / wall:8.0f} resources/s wall, "
          f"{released / cpu:8.0f} resources per CPU-second (server + client, one process)")
    print(f"  CPU per released resource {cpu / released * 1e6:.0f} µs (policy, signing, TLS, "
          "JSON, store reads, client parsing)")


def clones(template: dict[str, Any], n: int, start: int) -> list[tuple[bytes, str, str, dict[str, Any]]]:
    out = []
    for i in range(start, start + n):
        c = copy.deepcopy(template)
        mapping: dict[str, str] = {}
        for entry in c["entry"]:
            r = entry["resource"]
            new = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{i}/{r['id']}"))
            mapping[entry["fullUrl"]] = f"urn:uuid:{new}"
            r["id"] = new
            entry["fullUrl"] = f"urn:uuid:{new}"
        text = orjson.dumps(c).decode()
        for old, new in mapping.items():
            text = text.replace(old, new)
        c = orjson.loads(text)
        c["entry"] = [e for e in c["entry"]
                      if e["resource"]["resourceType"] not in ("Claim", "Coverage")]
        for entry in c["entry"]:
            r = entry["resource"]
            if r["resourceType"] == "Patient":
                r["identifier"] = [
                    {"system": ID_CARD, "value": f"BENCH{i:09d}"},
                    {"system": "urn:oid:2.16.156.10011.1.13", "value": f"MRN{i:09d}"},
                ]
        out.append((f"bench-record-{i}".encode(), "WS445.10", "bench", c))
    return out


async def part_search(root: Path, patients: int, consented: int, searches: int) -> None:
    controller = Controller(load_config(write_config(root)))
    template = map_record(inpatient_records(1, seed=9)[0], now=datetime.now(UTC))
    t0 = time.perf_counter()
    for start in range(0, patients, 2000):
        batch = clones(template, min(2000, patients - start), start)
        await controller.db.call(put_records, controller.store, batch, now=datetime.now(UTC))
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng = random.Random(1)
    chosen = rng.sample(range(patients), consented)
    for n, i in enumerate(chosen):
        controller.consents.put(consent(ID_CARD, f"BENCH{i:09d}", n), now=datetime.now(UTC))
    service = BridgeService(controller)
    await service.start()
    base = f"https://127.0.0.1:{service.port}/fhir"
    try:
        connector = aiohttp.TCPConnector(ssl=client_ssl(root), limit=8)
        async with aiohttp.ClientSession(connector=connector) as s:

            async def one(i: int) -> float:
                t = time.perf_counter()
                async with s.get(f"{base}/Patient",
                                 params={"identifier": f"{ID_CARD}|BENCH{i:09d}"}) as r:
                    body = orjson.loads(await r.read())
                assert r.status == 200 and body.get("total") == 1
                return time.perf_counter() - t

            for i in chosen[:50]:  # warm up
                await one(i)
            lat = [await one(rng.choice(chosen)) for _ in range(searches)]
            t = time.perf_counter()
            c0 = time.process_time()
            sem = asyncio.Semaphore(8)

            async def bounded(i: int) -> float:
                async with sem:
                    return await one(i)

            await asyncio.gather(*(bounded(rng.choice(chosen)) for _ in range(searches)))
            wall = time.perf_counter() - t
            cpu = time.process_time() - c0
    finally:
        await service.stop()
    lat.sort()
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[int(len(lat) * 0.99)] * 1000
    print(f"Patient?identifier= with {patients:,} patients in the store (filled in {fill:.0f} s), "
          f"{consented:,} consented:")
    print(f"  one at a time: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({searches} searches)")
    print(f"  8 in flight:   {searches / wall:.0f} searches/s, "
          f"{cpu / searches * 1000:.2f} ms CPU per search (server + client)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stays", type=int, default=50)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--consented", type=int, default=2_000)
    ap.add_argument("--searches", type=int, default=2_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(part_everything(Path(tmp) / "one", args.stays))
        asyncio.run(part_search(Path(tmp) / "many", args.patients, args.consented, args.searches))


if __name__ == "__main__":
    main()
