"""Signature algorithms and biometric digests: what each costs per message, CPU only.

Prints, for each registered JWS algorithm, the median microseconds to sign and to verify
a claim bundle of the sample size (the signed payload is the same RFC 8785 form for
every algorithm, so the difference is the algorithm's), and the ratio to ES256. Then,
for an HL7 v2 admission message, the median microseconds the listener spends reading
it (``HL7Reader.intake``) with and without one element marked biometric (the rewrite
parses the message once more and re-encodes it), and the ratio.

    python bench/signing.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bridge.mapping.hl7v2 import HL7Reader
from bridge.mapping.hl7v2.biometric import protect
from bridge.resources import MappingFiles, mappings_dir
from bridge.trust import algorithms
from bridge.trust.jws import KeyRing, Signer, sign_bundle, verify_bundle
from bridge.trust.pki import generate_ca, issue_certificate

NOW = datetime(2026, 3, 1, tzinfo=UTC)
MSG = "urn:uuid:0d5e8f6a-1b2c-5d3e-8f4a-5b6c7d8e9f01"


def median_us(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def claim_bundle() -> dict[str, Any]:
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-5000-8000-{i:012d}",
                "resource": {"resourceType": "Claim", "id": f"c{i}", "status": "active",
                             "item": [{"sequence": n, "net": {"value": 120.5 + n,
                                                              "currency": "CNY"}}
                                      for n in range(1, 20)]}}
               for i in range(8)]
    return {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986",
                                                     "value": MSG},
            "type": "message", "entry": entries}


def signatures(rounds: int) -> None:
    ca, ca_key = generate_ca("bench CA", now=NOW)
    bundle = claim_bundle()
    base: float | None = None
    print(f"{'algorithm':<10} {'sign µs':>9} {'verify µs':>10} {'sign+verify vs ES256':>22}")
    for name in algorithms.names():
        cert, key = issue_certificate(ca, ca_key, f"bench {name}", purpose="signing", now=NOW,
                                      partner_id="hospital-a", key_algorithm=name)  # type: ignore[arg-type]
        signer = Signer.from_certificate(key, cert)
        ring = KeyRing()
        ring.add_certificate("hospital-a", cert)
        signed = sign_bundle(bundle, signer, issuer="hospital-a", audience="insurer-b",
                             message_id=MSG, now=NOW)
        sign = median_us(lambda: sign_bundle(bundle, signer, issuer="hospital-a",  # noqa: B023
                                             audience="insurer-b", message_id=MSG, now=NOW),
                         rounds)
        verify = median_us(lambda: verify_bundle(signed, ring,  # noqa: B023
                                                 expected_issuer="hospital-a",
                                                 expected_audience="insurer-b", now=NOW),
                           rounds)
        base = base or sign + verify
        print(f"{name:<10} {sign:>9.1f} {verify:>10.1f} {(sign + verify) / base:>21.2f}x")


def biometric(rounds: int) -> None:
    from hl7_feeds import InpatientVisit

    message = InpatientVisit().a01()
    part = "hl7v2/visits/inpatient-adt.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / part).parent.mkdir(parents=True)
        text = (mappings_dir() / part).read_text(encoding="utf-8").replace(
            "  HDSD00.11.102: {path: PID-11.4, transform: string}",
            "  HDSD00.11.102: {path: PID-11.4, transform: string, biometric: true}")
        (site / part).write_text(text, encoding="utf-8")
        plain, marked = HL7Reader(), HL7Reader(MappingFiles(site))
        paths, key = marked.biometric_paths, bytes(32)
        assert paths, "the overlay marked nothing"
        before = median_us(lambda: plain.intake(message), rounds)
        after = median_us(lambda: marked.intake(protect(message, paths, key)), rounds)
        rewrite = median_us(lambda: protect(message, paths, key), rounds)
    print(f"\nHL7 v2 ADT^A01 intake ({len(message)} bytes): {before:.1f} µs;"
          f" with PID-11.4 biometric {after:.1f} µs ({after / before:.2f}x),"
          f" of which the rewrite {rewrite:.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    signatures(args.rounds)
    biometric(max(200, args.rounds // 4))


if __name__ == "__main__":
    main()
