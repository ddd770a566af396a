"""Signature refusals: how long each kind takes, so their times can be compared.

A receiver refuses a detached signature (a partner-submitted consent's ``X-Signature``)
for a bad signature from a registered key, for a key id it does not know, and for a
key of another partner. The last two are refused only after a verification against a
throwaway key, so all three should take about as long; before that change the unknown
and foreign keys were refused before any verification. Also measured: an accepted
signature, and the constant-time pin comparison against a plain ``in``.

Prints medians (microseconds) and ratios to the bad-signature refusal; asserts nothing.

    python bench/refusal_timing.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

from bridge.errors import SignatureError
from bridge.trust.identity import pinned
from bridge.trust.jws import KeyRing, Signer, sign_detached_bytes, verify_detached_bytes
from bridge.trust.pki import init_dev_pki

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
BODY = b'{"resourceType":"Consent","id":"insurer-b.c-1","status":"active"}' * 20


def median_us(fn: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        try:
            fn()
        except SignatureError:
            pass
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        pki = init_dev_pki(folder, ["hospital-a", "insurer-b", "platform-c", "clinic-x"], now=NOW)
        ring = KeyRing()
        for who in ("hospital-a", "insurer-b", "platform-c"):
            ring.add_certificate(who, pki.controllers[who].sign_cert)

        def signed_by(who: str, payload: bytes = BODY) -> str:
            files = pki.controllers[who]
            signer = Signer.from_files(files.sign_key, files.sign_cert)
            return sign_detached_bytes(payload, signer, issuer=who, audience="hospital-a",
                                       message_id="Consent/insurer-b.c-1", now=NOW)

        def verify(signature: str) -> Callable[[], object]:
            return lambda: verify_detached_bytes(
                signature, BODY, ring, expected_issuer="insurer-b",
                expected_audience="hospital-a", now=NOW)

        cases = {
            "accepted": verify(signed_by("insurer-b")),
            "bad signature": verify(signed_by("insurer-b", b"other")),
            "unknown key": verify(signed_by("clinic-x")),
            "another partner's key": verify(signed_by("platform-c")),
        }
        for fn in cases.values():  # warm up
            median_us(fn, 50)
        figures = {name: median_us(fn, args.rounds) for name, fn in cases.items()}
    base = figures["bad signature"]
    print(f"signature checks, median of {args.rounds} (microseconds; ratio to bad signature)")
    for name, value in figures.items():
        print(f"  {name:24s} {value:9.1f}  {value / base:5.2f}")

    pins = [f"{i:064x}" for i in range(8)]
    first, absent = pins[0], "f" * 64
    print("pin comparison against 8 pins, median (microseconds)")
    for name, fn in (
        ("pinned, first pin", lambda: pinned(first, pins)),
        ("pinned, no pin", lambda: pinned(absent, pins)),
        ("in, first pin", lambda: first in pins),
        ("in, no pin", lambda: absent in pins),
    ):
        print(f"  {name:24s} {median_us(fn, args.rounds * 10):9.2f}")


if __name__ == "__main__":
    main()
