"""Conformance kit benchmark: the kit's wall time against a local bridge, and what each
kind of refusal costs the receiver compared with an accepted claim.

The receiver is ``bridge serve`` in its own process (header, body and handshake
timeouts of 2 s, so the kit's slow-request cases wait 2 s rather than the defaults).
Its CPU time is read from /proc before and after a batch of one kind of request sent
by the kit's peer from this process; the figure is CPU milliseconds per request,
median over the runs. A refusal must cost the receiver less than an accepted claim,
or refusing would be the cheaper attack.

    python bench/conformance.py [--runs 3] [--requests 60]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e_support import set_toml_keys

from bridge.conformance import kit
from bridge.conformance.envelope import SigningKey
from bridge.conformance.peer import Peer, TLSOptions
from bridge.demo import free_port, write_configs
from bridge.trust.pki import init_dev_pki

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def start_receiver(root: Path) -> tuple[subprocess.Popen[str], int]:
    init_dev_pki(root / "pki", ["hospital-a", "insurer-b"],
                 now=datetime.now(UTC) - timedelta(days=1))
    _, insurer_cfg = write_configs(root, free_port(), free_port())
    set_toml_keys(insurer_cfg, "server", {"header_timeout_seconds": 2.0,
                                          "body_timeout_seconds": 2.0,
                                          "handshake_timeout_seconds": 2.0})
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve", "--config",
                             str(insurer_cfg), "--log-level", "error"],
                            stdout=subprocess.PIPE, text=True, cwd=root)
    assert proc.stdout is not None
    found = re.search(r"port=(\d+)", proc.stdout.readline())
    if not found:
        raise SystemExit("the receiver did not start")
    return proc, int(found.group(1))


def kit_config(root: Path, port: int) -> kit.KitConfig:
    pki = root / "pki"
    return kit.KitConfig(
        target=f"https://127.0.0.1:{port}/fhir", cert=pki / "hospital-a" / "tls.pem",
        key=pki / "hospital-a" / "tls.key", ca=pki / "ca.pem",
        signing_key=pki / "hospital-a" / "sign.key", signing_cert=pki / "hospital-a" / "sign.pem",
        receiver_signing_cert=pki / "insurer-b" / "sign.pem", ca_key=pki / "ca.key",
        header_timeout=2.0, body_timeout=2.0, handshake_timeout=2.0,
    )


def peer(root: Path, port: int) -> Peer:
    pki = root / "pki"
    return Peer(
        base_url=f"https://127.0.0.1:{port}/fhir", partner_id="hospital-a",
        receiver_id="insurer-b",
        tls=TLSOptions(ca=pki / "ca.pem", cert=pki / "hospital-a" / "tls.pem",
                       key=pki / "hospital-a" / "tls.key", server_name="127.0.0.1",
                       expected_server_partner="insurer-b", timeout=30.0),
        signing_key=SigningKey.from_files(pki / "hospital-a" / "sign.key",
                                          pki / "hospital-a" / "sign.pem"),
    )


def _claim_entry(message: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(e["resource"] for e in message["entry"]
                if e["resource"].get("resourceType") == rtype)


def varied(p: Peer) -> dict[str, Any]:
    """A claim whose patient and amounts differ from every other one (no cache of the
    receiver sees the same content twice, as with real traffic)."""
    m = p.claim()
    n = random.randrange(10**8)
    patient = _claim_entry(m, "Patient")
    patient["identifier"][0]["value"] = f"1101011990{n:08d}"[:18]
    patient["name"][0]["text"] = f"测试患者{n}"
    _claim_entry(m, "Claim")["total"]["value"] = 1000 + n % 9000 + 0.5
    return m


def request_kinds(p: Peer) -> dict[str, Callable[[], tuple[bytes, dict[str, str]]]]:
    """Each kind builds one request body (and headers): a fresh identity every time."""
    fhir = {"Content-Type": "application/fhir+json"}

    def accepted() -> tuple[bytes, dict[str, str]]:
        return json.dumps(p.sign(varied(p))).encode(), fhir

    def tampered() -> tuple[bytes, dict[str, str]]:
        m = p.signed_claim()
        _claim_entry(m, "Claim")["total"]["value"] = 99999.5
        return json.dumps(m).encode(), fhir

    def invalid_fhir() -> tuple[bytes, dict[str, str]]:
        m = varied(p)
        _claim_entry(m, "Patient")["birthDate"] = "1990-13-45"
        return json.dumps(p.sign(m)).encode(), fhir

    def profile() -> tuple[bytes, dict[str, str]]:
        m = varied(p)
        _claim_entry(m, "Patient")["photo"] = [{"contentType": "image/png", "data": "iVBO"}]
        return json.dumps(p.sign(m)).encode(), fhir

    def replay() -> tuple[bytes, dict[str, str]]:
        return json.dumps(p.signed_claim(sign={"iat": int(time.time()) + 900})).encode(), fhir

    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))

    def gzip_bomb() -> tuple[bytes, dict[str, str]]:
        return bomb, {**fhir, "Content-Encoding": "gzip"}

    depth = 100_000
    nested = b'{"x":' + b"[" * depth + b"]" * depth + b"}"

    def nesting() -> tuple[bytes, dict[str, str]]:
        return nested, fhir

    def envelope() -> tuple[bytes, dict[str, str]]:
        m = copy.deepcopy(p.claim())
        m["entry"][0]["resource"]["sender"]["identifier"]["value"] = "someone-else"
        return json.dumps(p.sign(m)).encode(), fhir

    return {
        "accepted claim": accepted,
        "403 sender-mismatch": envelope,
        "403 signature-invalid (tampered)": tampered,
        "403 replay-rejected": replay,
        "422 fhir-invalid": invalid_fhir,
        "403 profile-denied": profile,
        "400 nesting 100k": nesting,
        "415 gzip bomb 16 MiB": gzip_bomb,
    }


def cpu_per_request(p: Peer, pid: int, build: Callable[[], tuple[bytes, dict[str, str]]],
                    n: int) -> tuple[float, set[int]]:
    bodies = [build() for _ in range(n)]  # built before measuring
    statuses: set[int] = set()
    conn = p.connect()
    before = cpu_seconds(pid)
    try:
        for body, headers in bodies:
            response = conn.request("POST", p.path("$process-message"), body, headers)
            statuses.add(response.status)
            if response.header("Connection") == "close":
                conn.close()
                conn = p.connect()
    finally:
        conn.close()
    time.sleep(0.2)  # let the receiver finish writing its audit entries
    return (cpu_seconds(pid) - before) / n * 1000, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-conformance-") as tmp:
        root = Path(tmp)
        proc, port = start_receiver(root)
        try:
            walls = []
            for _ in range(args.runs):
                started = time.monotonic()
                results = kit.run(kit_config(root, port), kit.select_cases())
                walls.append(time.monotonic() - started)
                if not kit.conformant(results):
                    failed = [r.case.id for r in results if not r.passed]
                    raise SystemExit(f"the kit failed against this bridge: {failed}")
            slowest = sorted(results, key=lambda r: -r.seconds)[:4]
            print(f"kit: {len(results)} receiver cases, wall time median "
                  f"{statistics.median(walls):.1f} s over {args.runs} runs "
                  f"(min {min(walls):.1f}, max {max(walls):.1f}); target <= 60 s")
            print("  slowest cases: " + ", ".join(f"{r.case.id} {r.seconds:.1f} s"
                                                 for r in slowest))
            p = peer(root, port)
            kinds = request_kinds(p)
            figures: dict[str, list[float]] = {k: [] for k in kinds}
            seen: dict[str, set[int]] = {k: set() for k in kinds}
            for _ in range(args.runs):
                for name, build in kinds.items():
                    ms, statuses = cpu_per_request(p, proc.pid, build, args.requests)
                    figures[name].append(ms)
                    seen[name] |= statuses
            base = statistics.median(figures["accepted claim"])
            print(f"receiver CPU per request (median of {args.runs} runs of "
                  f"{args.requests} requests, TLS handshake included only where the "
                  "answer closes the connection):")
            for name, values in figures.items():
                ms = statistics.median(values)
                print(f"  {name:<34} {ms:7.2f} ms  {ms / base:5.2f} x accepted  "
                      f"(answers {sorted(seen[name])})")
            refusals = {k: statistics.median(v) for k, v in figures.items()
                        if k != "accepted claim"}
            worst = max(refusals, key=lambda k: refusals[k])
            print(f"most expensive refusal: {worst}, {refusals[worst] / base:.2f} x an "
                  "accepted claim")
        finally:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
