"""Claim push benchmark: the demo path with everything on.

Two bridges on this host (the insurer in its own process), mutual TLS, FHIR
validation on both sides, consent and minimisation, ES256 signatures and receipts,
SQLite commits with synchronous=FULL, and both audit chains.

Prints, for a saturated run, claims per second and median/p99 latency (enqueue to
verified receipt); for a run at a fixed offered rate, the same latencies; and the
median cost of each stage of one claim, measured in isolation, to show which one
dominates. Figures are medians of repeated runs; the machine is shared and noisy.

    python bench/claim_push.py [--claims 2000] [--rate 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from rich.console import Console

from bridge.demo import _run


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_once(claims: int, rate: float, seed: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-claim-push-") as tmp:
        result = asyncio.run(_run(claims, Path(tmp), seed, rate, Console(quiet=True), True))
    if result.lost:
        raise SystemExit(f"benchmark run lost {result.lost} claims")
    throughput = result.delivered / result.elapsed
    return (
        throughput,
        statistics.median(result.latencies) * 1000,
        _pct(result.latencies, 0.99) * 1000,
    )


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
        validate_message(received, cache=receiver_cache)
        t6 = time.perf_counter()
        profile.check(collection_of(received))
        t7 = time.perf_counter()
        for key, a, b in zip(
            timings, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7), strict=True
        ):
            timings[key].append((b - a) * 1000)
    return {k: statistics.median(v[20:]) for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument(
        "--rate", type=float, default=100.0, help="offered rate for the latency run"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    print("stage costs, median ms per claim (one core, no sockets):")
    costs = stage_costs()
    total = sum(costs.values())
    for name, ms in sorted(costs.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<40} {ms:7.3f} ms  {ms / total:5.1%}")
    print(f"  {'sum':<40} {total:7.3f} ms")

    sat = [run_once(args.claims, 0.0, seed) for seed in range(args.runs)]
    print(f"\nsaturated, {args.claims} claims x {args.runs} runs:")
    print(
        f"  claims/s        median {statistics.median(s[0] for s in sat):7.0f}   runs {[round(s[0]) for s in sat]}"
    )
    print(f"  latency median  median {statistics.median(s[1] for s in sat):7.1f} ms")
    print(f"  latency p99     median {statistics.median(s[2] for s in sat):7.1f} ms")

    n = int(args.rate * 10)
    fixed = [run_once(n, args.rate, seed) for seed in range(args.runs)]
    print(f"\noffered {args.rate:.0f} claims/s, {n} claims x {args.runs} runs:")
    print(f"  latency median  median {statistics.median(s[1] for s in fixed):7.1f} ms")
    print(
        f"  latency p99     median {statistics.median(s[2] for s in fixed):7.1f} ms   runs {[round(s[2], 1) for s in fixed]}"
    )


if __name__ == "__main__":
    main()
