"""Validation benchmark: FHIR bundles validated per second per core, full against fast.

(a) WS 445.10 collections mapped from fresh sample records, validated resource by resource
    as the mapping engine does: full (:func:`validate_resource`) against fast
    (:func:`validate_resource_cached`);
(b) the same collections wrapped as message bundles, validated as the receiver does
    (``validate_message``: every entry through the cache, the envelope on its own), against
    full validation of the whole message bundle, and the whole bundle through the cache;
(c) WS 445.10 record -> validated FHIR collection (``map_record``, which validates through
    the cache), fresh records;
(d) the messages of (b) each with one faulty entry (an impossible ``Patient.birthDate``;
    ``Encounter.status`` missing), refused as the receiver refuses them, against full
    validation: a refusal must not cost more than an acceptance.

The fast validator is first warmed on records of another seed, as in a bridge that has
been running for a while; the measured records are new to it (other names, ids, dates and
amounts), and each is validated once, so no content repeats. Figures are medians over
``--runs`` slices of the fresh records, on one core; the machine is shared and noisy.
Prints, asserts nothing.

    python bench/validation.py [--records 600] [--warm 600] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bridge.errors import ValidationError
from bridge.link.server import validate_message
from bridge.mapping import map_record
from bridge.messages import wrap_message
from bridge.records.fhir import validate_resource, validate_resource_cached, validation_cache
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def per_second(fn: Callable[[dict[str, Any]], None], items: list[dict[str, Any]],
               runs: int) -> float:
    """Median items per second of ``fn`` over ``runs`` slices of ``items``, each item once."""
    size = max(len(items) // runs, 1)
    results = []
    for k in range(runs):
        chunk = items[k * size:(k + 1) * size]
        if not chunk:
            break
        start = time.perf_counter()
        for item in chunk:
            fn(item)
        results.append(len(chunk) / (time.perf_counter() - start))
    return statistics.median(results)


def by_resource(bundle: dict[str, Any]) -> None:
    """Validate a collection entry by entry, fully (the engine without a cache)."""
    for i, entry in enumerate(bundle["entry"]):
        validate_resource(entry["resource"], path=f"Bundle.entry[{i}].resource")


def by_resource_fast(bundle: dict[str, Any]) -> None:
    """Validate a collection entry by entry through the cache, as ``map_record`` does."""
    for i, entry in enumerate(bundle["entry"]):
        validate_resource_cached(entry["resource"], path=f"Bundle.entry[{i}].resource")


def refused(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``fn``, which must refuse its argument."""
    def run(item: dict[str, Any]) -> None:
        try:
            fn(item)
        except ValidationError:
            return
        raise SystemExit("a faulty message was accepted")
    return run


def faulty(bundle: dict[str, Any], fault: str) -> dict[str, Any]:
    """``bundle`` with one faulty entry (entries are shared with ``bundle``, except that one)."""
    entries = list(bundle["entry"])
    rtype = "Patient" if fault == "birthDate" else "Encounter"
    i = next(i for i, e in enumerate(entries) if e["resource"]["resourceType"] == rtype)
    resource = dict(entries[i]["resource"])
    if fault == "birthDate":
        resource["birthDate"] = "1990-13-45"
    else:
        del resource["status"]
    entries[i] = {**entries[i], "resource": resource}
    return {**bundle, "entry": entries}


def message(collection: dict[str, Any], n: int) -> dict[str, Any]:
    """``collection`` wrapped as the claim push sends it."""
    return wrap_message(
        collection, message_id=f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
        event="claim-submit", sender="hospital-a", receiver="insurer-b",
        source_endpoint="https://hospital-a.example/fhir",
        destination_endpoint="https://insurer-b.example/fhir", now=NOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--warm", type=int, default=600)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    warm = [map_record(r, now=NOW) for r in inpatient_records(args.warm, seed=101)]
    fresh = [map_record(r, now=NOW) for r in inpatient_records(args.records, seed=202)]
    messages = [message(c, n) for n, c in enumerate(fresh)]
    cache = validation_cache()
    size = sum(len(c["entry"]) for c in fresh) / len(fresh)
    print(f"WS 445.10 collections: {len(fresh)} fresh records, {size:.1f} resources each; "
          f"cache warmed on {len(warm)} records of another seed")

    full = per_second(by_resource, fresh, args.runs)
    cache.clear()
    for c in warm:
        by_resource_fast(c)
    fast = per_second(by_resource_fast, fresh, args.runs)
    print("(a) collection, resource by resource (records/s per core, median)")
    print(f"  full  validate_resource          {full:>8,.0f} /s ({1e3 / full:.2f} ms)")
    print(f"  fast  validate_resource_cached   {fast:>8,.0f} /s ({1e3 / fast:.2f} ms)"
          f"  x{fast / full:.1f}")

    full_m = per_second(validate_resource, messages, args.runs)
    cache.clear()
    for n, c in enumerate(warm):
        validate_message(message(c, 10**6 + n))
    fast_m = per_second(validate_message, messages, args.runs)
    print("(b) message bundle as received (messages/s per core, median)")
    print(f"  full  validate_resource(bundle)  {full_m:>8,.0f} /s ({1e3 / full_m:.2f} ms)")
    print(f"  fast  validate_message           {fast_m:>8,.0f} /s ({1e3 / fast_m:.2f} ms)"
          f"  x{fast_m / full_m:.1f}")
    whole = per_second(validate_resource_cached, messages, args.runs)
    print(f"  fast  validate_resource_cached   {whole:>8,.0f} /s ({1e3 / whole:.2f} ms)"
          f"  x{whole / full_m:.1f}  (whole bundle, envelope included)")

    records = inpatient_records(args.records, seed=303)
    mapped = per_second(lambda r: map_record(r, now=NOW), records, args.runs)
    print("(c) WS 445.10 record -> validated FHIR collection, fresh records (records/s per core)")
    print(f"  map_record                       {mapped:>8,.0f} /s ({1e3 / mapped:.2f} ms)")

    print("(d) message bundle with one faulty entry, refused (messages/s per core, median)")
    for fault in ("birthDate", "status"):
        bad = [faulty(m, fault) for m in messages]
        full_r = per_second(refused(validate_resource), bad, args.runs)
        fast_r = per_second(refused(validate_message), bad, args.runs)
        print(f"  {fault:<9} full {1e3 / full_r:.2f} ms, fast validate_message "
              f"{1e3 / fast_r:.2f} ms  x{fast_r / full_r:.1f}; "
              f"{fast_m / fast_r:.2f} x the cost of an accepted message")


if __name__ == "__main__":
    main()
