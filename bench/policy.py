"""Policy stage benchmark: classify + authorize + minimize per claim, against the number
of consents registered, next to the cost of mapping the same record.

For 10, 1,000 and 100,000 registered consents, prints the median cost per claim bundle
of ``apply_policy`` on WS 445.10 sample records (commercial-insurance link), its parts
measured alone (minimize, classify, consent), the cost of ``map_record`` for the same
records, and the ratio policy / mapping. Then the cost of registering consents: the
full path (FHIR model validation, for consents arriving from outside) and the trusted
path (consents read back from the bridge's own store, already validated once).

Then the research path: records per second through de-identification (the
research-limited-data-set profile with a key) and k-anonymity over persons, on 10,000
records, with the CPU time per record (the batch holds its bundles as JSON text, as a
link's release does); and the share of the policy stage in the sender's
CPU per claim (``Controller.submit``: mapping, policy, signing, store and audit). Each of
these two runs ``--runs`` times (3): the figures are the median run's, with every run's.

Then the consent lookup of one claim for a patient with 1 to 10,000 linked stays
(``--only stays``).

Prints figures only; asserts nothing about time. The machine is shared and noisy:
figures are medians.

    python bench/policy.py [--samples 300] [--max-consents 100000]
                           [--research-records 10000] [--claim-records 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from gc_clock import CollectorClock

from bridge.errors import ConsentDenied
from bridge.mapping import map_record, patient_identifiers
from bridge.policy.classify import copy_json, default_sensitive_codes, label_bundle
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.engine import apply_policy, data_period
from bridge.policy.profile import load_link_profile
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
CLASSES = ("sexual-reproductive", "infectious", "mental", "malignant", "genetic", "anal",
           "rare", "incurable")


def _consent(i: int, system: str, value: str) -> dict[str, Any]:
    return build_consent(
        consent_id=f"c-{i}", patient_system=system, patient_value=value, recipient="insurer-b",
        purposes=["HPAYMT"], start=NOW - timedelta(days=30), end=NOW + timedelta(days=300),
        sensitive_classes=CLASSES if i % 2 else (), hospital_partner_id="hospital-a",
    )


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--max-consents", type=int, default=100_000)
    parser.add_argument("--research-records", type=int, default=10_000)
    parser.add_argument("--claim-records", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of the research path and of the claim path share")
    parser.add_argument("--only", choices=["policy", "research", "share", "stays"],
                        default=None)
    args = parser.parse_args()
    if args.only in (None, "stays"):
        lookup_by_stays()
    if args.only in (None, "research"):
        research_path(args.research_records, args.runs)
    if args.only in (None, "share"):
        claim_path_share(args.claim_records, args.runs)
    if args.only not in (None, "policy"):
        return

    records = inpatient_records(args.samples, seed=3)
    collections = [map_record(r, now=NOW) for r in records]
    keys = []
    for c in collections:
        ids = patient_identifiers(c)
        keys.append(next(((s, v) for s, v in ids if s.endswith(".1.3")), ids[0]))
    profile = load_link_profile("commercial-insurance")
    codes = default_sensitive_codes()

    # Mapping, for scale: the first call per record, because mapping validates through a
    # content cache and a repeated record would measure the cache.
    fresh = inpatient_records(args.samples, seed=97)
    mapping = statistics.median(_median_ms(lambda r=r: map_record(r, now=NOW), 1) for r in fresh)

    print(f"policy stage per claim bundle (WS 445.10 sample records, pool of {args.samples}, "
          f"commercial-insurance link; load average {_load()}), median ms:")
    print(f"  {'consents':>9}  {'policy':>7}  {'minimize':>8}  {'classify':>8}  {'consent':>7}  "
          f"{'policy/map':>10}")
    sizes = [n for n in (10, 1_000, 100_000) if n <= args.max_consents]
    policy_figures = {}
    usable: list[dict[str, Any]] | None = None
    for n in sizes:
        registry = ConsentRegistry()
        # The sample patients get consents first; the rest belong to other patients.
        for i in range(n):
            if i < len(keys):
                system, value = keys[i]
            else:
                system, value = "urn:oid:2.16.156.10011.1.3", f"9{i:017d}"
            registry.put(_consent(i, system, value), now=NOW, trusted=True)
        # A long-lived registry should not be rescanned by every full collection; a bridge
        # does the same after loading its store (gc.freeze). Without it the figures with
        # many consents include the collector's scans of them, in every stage alike.
        gc.collect()
        gc.freeze()
        if usable is None:
            # The same records at every size: those with a consent at the smallest size
            # that the policy releases. A consent naming no special-disease class holds
            # back a special principal diagnosis, and such a claim is refused (P-MSG-10).
            first = collections[: min(sizes[0], len(collections))]
            usable = [c for c in first if _released(c, registry, profile, codes)]
            print(f"  (the same {len(usable)} records at every size, 25 runs each; "
                  f"{len(first) - len(usable)} of the first {len(first)} refused, left out)")
        pol, mini, cls, con = [], [], [], []
        for c in usable:
            pol.append(_median_ms(lambda c=c, registry=registry: apply_policy(
                c, registry=registry, profile=profile, recipient="insurer-b",
                purpose="HPAYMT", now=NOW, codes=codes), 25))
            m = profile.minimize(c)
            mini.append(_median_ms(lambda c=c: profile.minimize(c), 25))
            cls.append(_median_ms(lambda m=m: label_bundle(copy_json(m.bundle), codes=codes,
                                                           types=profile.classes), 25))
            types = {e["resource"]["resourceType"] for e in m.bundle["entry"]}
            ids = list(patient_identifiers(c))
            period = data_period(c)
            con.append(_median_ms(lambda ids=ids, types=types, period=period, registry=registry: registry.require_consent(
                patient_identifiers=ids, recipient="insurer-b", purpose="HPAYMT",
                resource_types=types, data_period=period, now=NOW), 25))
        gc.unfreeze()
        p = statistics.median(pol)
        policy_figures[n] = p
        print(f"  {n:>9,}  {p:7.3f}  {statistics.median(mini):8.3f}  "
              f"{statistics.median(cls):8.3f}  {statistics.median(con):7.3f}  {p / mapping:10.1%}")
    print(f"  mapping (map_record, first call per record) per record: {mapping:.3f} ms")
    if len(policy_figures) > 1:
        lo, hi = policy_figures[sizes[0]], policy_figures[sizes[-1]]
        print(f"  policy with {sizes[-1]:,} consents / with {sizes[0]:,}: {hi / lo:.2f}x")

    print("\nconsent registration:")
    sample = [_consent(i, "urn:oid:2.16.156.10011.1.3", f"8{i:017d}") for i in range(2_000)]
    t0 = time.perf_counter()
    full = ConsentRegistry()
    full.put_many(sample, now=NOW)
    per_full = (time.perf_counter() - t0) / len(sample) * 1000
    print(f"  validated (FHIR model + rules), {len(sample):,} consents: {per_full:.3f} ms each "
          f"-> {per_full * args.max_consents / 1000:.1f} s for {args.max_consents:,}")
    rows = [orjson.dumps(_consent(i, "urn:oid:2.16.156.10011.1.3", f"7{i:017d}"))
            for i in range(args.max_consents)]
    t0 = time.perf_counter()
    trusted = ConsentRegistry()
    trusted.put_many((orjson.loads(r) for r in rows), now=NOW, trusted=True)
    total = time.perf_counter() - t0
    print(f"  trusted store load (JSON parse + rules), {args.max_consents:,} consents: "
          f"{total:.1f} s ({total / args.max_consents * 1000:.3f} ms each, "
          f"{per_full / (total / args.max_consents * 1000):.0f}x faster)")


def _released(collection: dict[str, Any], registry: ConsentRegistry, profile: Any,
              codes: Any) -> bool:
    try:
        apply_policy(collection, registry=registry, profile=profile, recipient="insurer-b",
                     purpose="HPAYMT", now=NOW, codes=codes)
    except ConsentDenied:
        return False
    return True


def _load() -> str:
    """The 1-, 5- and 15-minute load averages: the machine is shared."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def research_path(n: int, runs: int = 3) -> None:
    """Records/s through de-identification and k-anonymity over persons.

    Every consent names every special-disease class: the research profile refuses a
    stay whose every diagnosis consent holds back, and every record here is released.
    The same records go through ``runs`` times (the policy leaves its input as it was);
    the median run is printed, with each run's CPU per record."""
    from bridge.policy.research import ReleaseItem, age_at, anonymise
    from bridge.policy.transforms import person_key

    profile = load_link_profile("research-limited-data-set")
    assert profile.k_anonymity is not None
    key = bytes(range(32))
    records = inpatient_records(n, seed=41)
    t0 = time.perf_counter()
    collections = [map_record(r, now=NOW) for r in records]
    mapping = time.perf_counter() - t0
    registry = ConsentRegistry()
    for i, c in enumerate(collections):
        system, value = patient_identifiers(c)[0]
        registry.put(build_consent(
            consent_id=f"r-{i}", patient_system=system, patient_value=value,
            recipient="research-c", purposes=["HRESCH"], start=NOW - timedelta(days=900),
            end=NOW + timedelta(days=300), sensitive_classes=CLASSES,
            hospital_partner_id="hospital-a"),
            now=NOW, trusted=True)
    gc.collect()
    gc.freeze()
    # (wall, CPU) of de-identification and of k-anonymity, the collector's CPU, the report
    measured = []
    for _ in range(runs):
        collector = CollectorClock()
        gc.callbacks.append(collector)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        items = []
        for i, c in enumerate(collections):
            result = apply_policy(c, registry=registry, profile=profile,
                                  recipient="research-c", purpose="HRESCH", now=NOW, key=key)
            patient = next(e["resource"] for e in c["entry"]
                           if e["resource"]["resourceType"] == "Patient")
            encounter = next(e["resource"] for e in c["entry"]
                             if e["resource"]["resourceType"] == "Encounter")
            # Held as a link's release holds them (bridge.link.research): as JSON text.
            items.append(ReleaseItem.as_text(
                i, result.bundle, person_key(patient_identifiers(c)),
                age_at(patient.get("birthDate"), encounter["period"]["start"])))
        wall1, cpu1 = time.perf_counter(), time.process_time()
        collected = collector.total
        _released, report = anonymise(items, k=profile.k_anonymity.k,
                                      quasi=profile.k_anonymity.quasi)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        gc.callbacks.remove(collector)
        del items, _released
        measured.append((wall1 - wall0, cpu1 - cpu0, wall2 - wall1, cpu2 - cpu1, collected,
                         report))
    gc.unfreeze()
    measured.sort(key=lambda m: m[1] + m[3])
    deid_wall, deid_cpu, kanon_wall, kanon_cpu, collected, report = measured[len(measured) // 2]
    every = ", ".join(f"{(m[1] + m[3]) / n * 1000:.3f}" for m in measured)
    print(f"research path, {n:,} WS 445.10 records (research-limited-data-set, keyed; "
          f"load average {_load()}), the median of {runs} runs:")
    print(f"  de-identification (apply_policy): {n / deid_wall:8,.0f} records/s, "
          f"{deid_cpu / n * 1000:.3f} ms CPU each (of which the cyclic garbage "
          f"collector, rescanning the bundles kept for the batch: {collected / n * 1000:.3f} ms)")
    print(f"  k-anonymity over persons (k={report.k}): {n / kanon_wall:8,.0f} records/s, "
          f"{kanon_cpu / n * 1000:.4f} ms CPU each")
    print(f"  both: {n / (deid_wall + kanon_wall):,.0f} records/s on one core "
          f"({(deid_cpu + kanon_cpu) / n * 1000:.3f} ms CPU each = "
          f"{n / (deid_cpu + kanon_cpu):,.0f} records per CPU second; target >= 2,000/s)"
          f"; every run, ms CPU per record: {every}")
    print(f"  released {report.records_released:,}, suppressed {len(report.suppressed):,}, "
          f"k achieved {report.k_achieved}, generalisation level {report.level}")
    print(f"  (mapping the same records, for scale: {n / mapping:,.0f} records/s)\n")


def lookup_by_stays() -> None:
    """The consent lookup of one claim (``ConsentRegistry.for_patient``, which also checks
    that the identifiers name one person) for a patient whose medical-record number is
    linked to 1, 100, 1,000 or 10,000 inpatient numbers: a bridge links every stay's
    number to the patient, so a long-running bridge holds patients with many."""
    from bridge.policy.identity import IdentityIndex

    mrn, stay = "urn:oid:2.16.156.10011.1.13", "urn:oid:2.16.156.10011.1.12"
    print(f"consent lookup of one claim, by the patient's number of linked stays "
          f"(load average {_load()}), median microseconds:")
    for stays in (1, 100, 1_000, 10_000):
        index = IdentityIndex(lambda system, value: f"{system}|{value}")
        registry = ConsentRegistry(index)
        registry.put(_consent(0, mrn, "M-1"), now=NOW, trusted=True)
        for n in range(stays):
            index.link([f"{mrn}|M-1", f"{stay}|ZY-{n}"])
        ask = [(stay, f"ZY-{stays - 1}"), (mrn, "M-1")]
        assert len(registry.for_patient(ask)) == 1
        micro = _median_ms(lambda ask=ask, r=registry: [r.for_patient(ask) for _ in range(100)],
                           25) * 10
        print(f"  {stays:>6} stays: {micro:8.1f} us")
    print()


def claim_path_share(n: int, runs: int = 3) -> None:
    """The policy stage's share of the sender's CPU per claim (Controller.submit), over
    ``runs`` runs of ``n`` claims each (other records each run); the median run."""
    import asyncio
    import tempfile
    from pathlib import Path

    from bridge.config import load_config
    from bridge.demo import free_port, write_configs
    from bridge.link.node import Controller
    from bridge.trust.pki import init_dev_pki

    measured: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_dev_pki(root / "pki", ["hospital-a", "insurer-b"], now=datetime.now(UTC))
        hospital_cfg, _ = write_configs(root, free_port(), free_port())

        async def run(records: list[dict[str, Any]], k: int) -> tuple[float, float, int]:
            controller = Controller(load_config(hospital_cfg))
            now = datetime.now(UTC)
            try:
                for i, r in enumerate(records):
                    system, value = patient_identifiers(map_record(r, now=now))[0]
                    controller.consents.put(build_consent(
                        consent_id=f"s-{k}-{i}", patient_system=system, patient_value=value,
                        recipient="insurer-b", purposes=["HPAYMT"],
                        start=now - timedelta(days=900), end=now + timedelta(days=300),
                        sensitive_classes=CLASSES, hospital_partner_id="hospital-a"),
                        now=now, trusted=True)
                link = controller.outbound_link("claims-to-insurer-b")
                profile = controller.profiles[link.id]
                cpu0 = time.process_time()
                sent = 0
                for r in records:
                    sub = await controller.submit(r, link.id)
                    sent += sub.created
                submit_cpu = time.process_time() - cpu0
                collections = [controller.claim_collection(r, now) for r in records]
                cpu0 = time.process_time()
                for c in collections:
                    # Each collection given up, as Controller.policy gives it the one it maps.
                    apply_policy(c, registry=controller.consents_for(link), profile=profile,
                                 recipient="insurer-b", purpose="HPAYMT", now=now, owned=True)
                policy_cpu = time.process_time() - cpu0
                return submit_cpu, policy_cpu, sent
            finally:
                await controller.close()

        for k in range(runs):
            measured.append(asyncio.run(run(inpatient_records(n, seed=43 + k), k)))
    shares = sorted(policy / submit for submit, policy, _ in measured)
    submit_cpu, policy_cpu, sent = sorted(measured, key=lambda m: m[1] / m[0])[len(measured) // 2]
    print(f"claim path, {n} claims submitted ({sent} queued) per run, sender CPU per claim "
          f"(load average {_load()}), the median of {runs} runs:")
    print(f"  submit (map, link identity, policy, sign, store, audit): "
          f"{submit_cpu / n * 1000:.2f} ms")
    print(f"  policy stage alone (apply_policy): {policy_cpu / n * 1000:.2f} ms "
          f"= {policy_cpu / submit_cpu:.1%} of submit's CPU per claim (every run: "
          f"{', '.join(f'{x:.1%}' for x in shares)}; of the sender's whole CPU per claim, "
          f"dispatch included: bench/claim_push.py)\n")


if __name__ == "__main__":
    main()
