"""Reliability benchmark: partner outage and receiver restore, with real processes.

Runs the scenarios of the reliability battery (``tests/reliability_support.py``) at
larger sizes: the hospital and the insurer as ``bridge serve`` processes, the claims
through a byte-level fault proxy, the outcome read from both stores with SQL. Prints:

- partner outage (port refusing, then accepting and never answering, while claims keep
  coming): claims lost, duplicated, dead-lettered; connection attempts per second
  while black-holed; time to drain the backlog once the partner is back;
- with ``--kills N``: claims lost, duplicated and dead-lettered when each side is
  killed (``kill -9``) N times while claims keep coming, and whether the audit chains
  verify;
- with ``--cut 0.1``: the same when a tenth of the answers are cut after the request
  went through, and how many receipts differ from the one the insurer signed;
- receiver restored from a backup: claims the restore lost, found and resent by
  ``bridge sync reconcile``, receipts naming audit entries the receiver no longer
  holds, claims lost at the end, and the time reconciliation took.

    python bench/reliability.py [--claims 1000] [--refuse 60] [--blackhole 60]
                                [--gap 2000] [--kills N] [--cut 0.1]
                                [--skip-outage] [--skip-restore]

The issue's sizes are ``--refuse 150 --blackhole 150 --gap 10000`` (long: the gap's
claims are enqueued and delivered first). The machine is shared; times are one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from reliability_support import (
    crash_consistency,
    lost_responses,
    partner_outage,
    receiver_restored,
)


async def main(args: argparse.Namespace) -> None:
    if args.kills:
        with tempfile.TemporaryDirectory() as tmp:
            c = await crash_consistency(Path(tmp), claims=args.claims, kills_each=args.kills)
        print(f"crashes: {c.claims} claims, {c.kills} kill -9 (hospital and insurer in turn)")
        print(
            f"  lost {c.lost}, duplicated {c.duplicated}, dead-lettered {c.dead}; audit chains"
            f" {'verify' if c.chains_verify else 'DO NOT verify'}; settled"
            f" {c.settle_seconds:.1f} s after the last kill"
        )
    if not args.skip_outage:
        with tempfile.TemporaryDirectory() as tmp:
            r = await partner_outage(
                Path(tmp),
                claims=args.claims,
                refuse_seconds=args.refuse,
                blackhole_seconds=args.blackhole,
            )
        print(
            f"partner outage: {r.claims} claims, refused {r.refuse_seconds:.0f} s then"
            f" black-holed {r.blackhole_seconds:.0f} s"
        )
        print(f"  lost {r.lost}, duplicated {r.duplicated}, dead-lettered {r.dead}")
        print(
            f"  connection attempts while black-holed: {r.attempts_during_blackhole}"
            f" ({r.attempts_per_second:.2f}/s)"
        )
        print(f"  backlog drained {r.drain_seconds:.1f} s after the partner came back")
    if args.cut:
        with tempfile.TemporaryDirectory() as tmp:
            lr = await lost_responses(Path(tmp), claims=args.claims, ratio=args.cut)
        print(f"lost answers: {lr.claims} claims, {lr.cuts} answers cut after the request")
        print(
            f"  lost {lr.lost}, duplicated {lr.duplicated}, dead-lettered {lr.dead},"
            f" receipts differing from the insurer's {lr.receipts_differing}"
        )
    if not args.skip_restore:
        with tempfile.TemporaryDirectory() as tmp:
            before = max(args.gap // 10, 10)
            r2 = await receiver_restored(Path(tmp), before=before, after=args.gap)
        print(f"receiver restored: {r2.claims} claims, {r2.lost_after_restore} lost by the restore")
        print(
            f"  reconcile found {r2.missing_found}, resent {r2.resent}, receipts naming absent"
            f" audit entries {r2.mismatched_receipts}; lost at the end {r2.lost_at_end},"
            f" duplicated {r2.duplicated}"
        )
        print(
            f"  reconcile took {r2.reconcile_seconds:.1f} s"
            f" ({r2.resent / max(r2.reconcile_seconds, 1e-9):.0f} claims/s resent)"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--claims", type=int, default=1000)
    p.add_argument("--refuse", type=float, default=60.0)
    p.add_argument("--blackhole", type=float, default=60.0)
    p.add_argument("--gap", type=int, default=2000)
    p.add_argument(
        "--kills",
        type=int,
        default=0,
        help="also kill -9 each side this many times while --claims are delivered",
    )
    p.add_argument(
        "--cut",
        type=float,
        default=0.0,
        help="also cut this share of the insurer's answers (0.1) for --claims",
    )
    p.add_argument("--skip-outage", action="store_true")
    p.add_argument("--skip-restore", action="store_true")
    asyncio.run(main(p.parse_args()))
