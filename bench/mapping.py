"""Mapping benchmark: records per second per core for the ingest and mapping stages.

(a) HL7 v2 ADT^A01 -> DE record (parse, check against the HL7 version, map), beside plain
    hl7apy ``parse_message`` of the same message as the "before";
(b) WS 445.10 DE record -> validated FHIR Bundle via ``bridge.mapping.map_record``;
(c) ADT^A01 -> DE record -> FHIR, once a WS 445.12 mapping exists (else "not available");
and the share of time spent parsing, checking and mapping. Figures are medians of
repeated runs on one core; the machine is shared and noisy. Prints, asserts nothing.

    python bench/mapping.py [--seconds 1.0] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.errors import MappingError
from bridge.mapping import map_record
from bridge.mapping.hl7v2 import hl7_to_record, parse_hl7, read_hl7
from bridge.mapping.hl7v2.engine import map_message
from bridge.mapping.hl7v2.schema import validate
from bridge.mapping.hl7v2.spec import shipped_mappings
from bridge.samples import inpatient_records

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "hl7v2"
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def rate(fn: Callable[[], Any], seconds: float, runs: int) -> float:
    """Median calls per second of ``fn`` over ``runs`` timed windows."""
    fn()
    results = []
    for _ in range(runs):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            fn()
            n += 1
            if n % 16 == 0 and time.perf_counter() >= deadline:
                break
        results.append(n / (time.perf_counter() - start))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    s, r = args.seconds, args.runs

    adt = (GOLDEN / "adt_a01-01.hl7").read_bytes()
    dft = (GOLDEN / "dft_p03-01.hl7").read_bytes()
    print("HL7 v2 -> DE record (records/s per core, median)")
    try:
        from hl7apy.parser import parse_message
        text = adt.decode("utf-8")
        before = rate(lambda: parse_message(text), s / 2, max(r // 2, 1))
        before_dft = rate(lambda: parse_message(dft.decode("utf-8")), s / 2, max(r // 2, 1))
        print(f"  before: hl7apy parse_message ADT^A01        {before:>10,.0f} /s "
              f"({1e3 / before:.2f} ms)")
        print(f"  before: hl7apy parse_message DFT^P03        {before_dft:>10,.0f} /s "
              f"({1e3 / before_dft:.2f} ms)")
    except Exception as exc:  # noqa: BLE001 - the comparison is informative only
        print(f"  before: hl7apy parse_message not measurable ({type(exc).__name__})")
    a = rate(lambda: read_hl7(adt), s, r)
    print(f"  (a) ADT^A01 -> DE record (read_hl7)          {a:>10,.0f} /s ({1e6 / a:.0f} µs)")
    d = rate(lambda: read_hl7(dft), s, r)
    print(f"      DFT^P03 -> DE record                      {d:>10,.0f} /s ({1e6 / d:.0f} µs)")

    msg = parse_hl7(adt)
    spec = shipped_mappings()["ADT^A01"]
    t_parse = 1 / rate(lambda: parse_hl7(adt), s / 2, r)
    t_check = 1 / rate(lambda: validate(msg, "ADT_A01"), s / 2, r)
    t_map = 1 / rate(lambda: map_message(spec, msg), s / 2, r)
    total = t_parse + t_check + t_map
    print(f"      share: parse {t_parse / total:.0%} ({t_parse * 1e6:.0f} µs), "
          f"HL7 checks {t_check / total:.0%} ({t_check * 1e6:.0f} µs), "
          f"mapping {t_map / total:.0%} ({t_map * 1e6:.0f} µs)")

    print("DE record -> validated FHIR Bundle")
    records = inpatient_records(50, seed=3)
    it = iter(range(10**12))
    b = rate(lambda: map_record(records[next(it) % len(records)], now=NOW), s, r)
    print(f"  (b) WS 445.10 record -> FHIR (map_record)   {b:>10,.0f} /s ({1e6 / b:.0f} µs)")

    try:
        record = hl7_to_record(parse_hl7(adt))
        map_record(record, now=NOW)
    except MappingError as exc:
        if exc.location == "$.dataset":
            print("  (c) ADT^A01 -> DE -> FHIR                   not available "
                  "(no WS 445.12 mapping in mappings/ws445 yet)")
            return
        raise
    c = rate(lambda: map_record(read_hl7(adt), now=NOW), s, r)
    print(f"  (c) ADT^A01 -> DE -> FHIR                   {c:>10,.0f} /s ({1e6 / c:.0f} µs)")
    t_de = 1 / a
    t_fhir = 1 / c - t_de
    print(f"      share: HL7 -> DE {t_de * c:.0%}, DE -> validated FHIR {t_fhir * c:.0%}")


if __name__ == "__main__":
    main()
