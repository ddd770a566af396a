"""The policy stage's outputs do not change: every shipped profile over generated records
(bundles, removed, held back, transformed, the audit decision, explanations) and a
10,000-record research release, compared with digests recorded from the reviewed code
(``tests/policy_golden.py`` writes them). Guards work on the stage's speed, which must
leave every byte of what is sent as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from policy_golden import GOLDEN, compute, profile_cases, research_release


@pytest.fixture(scope="module")
def computed() -> dict[str, dict[str, object]]:
    return compute()


def test_every_case_is_recorded(computed: dict[str, dict[str, object]]) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(computed) == sorted(golden)


@pytest.mark.parametrize("case", sorted(json.loads(GOLDEN.read_text(encoding="utf-8"))))
def test_outputs_are_unchanged(case: str, computed: dict[str, dict[str, object]]) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))[case]
    got = computed[case]
    records, expected = got["records"], golden["records"]
    assert isinstance(records, list) and isinstance(expected, list)
    first = next((i for i, (a, b) in enumerate(zip(records, expected)) if a != b), None)
    assert first is None, f"{case}: output {first} differs from the recorded one"
    assert len(records) == len(expected)
    assert got["sha256"] == golden["sha256"]


def test_a_collection_given_up_is_disclosed_the_same() -> None:
    """A bridge's claim path gives ``apply_policy`` the collection it mapped for the
    claim (``owned``), which the policy then works on in place instead of copying what
    it sends: every profile's outcomes and explanations are still the recorded ones."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    cases = dict(profile_cases(owned=True))
    assert sorted(cases) == sorted(k for k in golden if k != "research-release")
    for case, digests in cases.items():
        expected = golden[case]["records"]
        first = next((i for i, (a, b) in enumerate(zip(digests, expected)) if a != b), None)
        assert first is None, f"{case}: output {first} differs from the recorded one"
        assert len(digests) == len(expected)


def test_a_release_held_as_text_is_the_same_release() -> None:
    """A research release whose batch holds its bundles as JSON text (as a link's release
    does, to spare the garbage collector) releases the same bundles with the same report."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["research-release"]
    assert research_release(text=True) == golden["records"]


_ONE_PROCESS = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import policy_golden as G
G.RECORDS = 30
print(hashlib.sha256(repr(list(G.profile_cases())).encode()).hexdigest())
"""


def test_outputs_do_not_depend_on_the_hash_seed() -> None:
    """The same input gives the same bytes in every process: nothing in what is sent
    follows the order of a set, which changes with the string hash seed."""
    here = str(Path(__file__).parent)
    seen = set()
    for seed in ("1", "2", "3", "4", "5", "6"):
        out = subprocess.run(
            [sys.executable, "-c", _ONE_PROCESS, here], capture_output=True, text=True,
            env={**os.environ, "PYTHONHASHSEED": seed}, check=True, timeout=300,
        )
        seen.add(out.stdout.strip())
    assert len(seen) == 1, f"{len(seen)} different outputs over six hash seeds"


def test_text_and_dict_batches_release_alike() -> None:
    """At every generalisation level, with people of several records, top-coded ages and
    a bundle of two Patients, a batch held as text (with or without its Patients' text
    alongside) releases what the same batch held as dicts releases, and reports the same."""
    import copy
    from datetime import timedelta

    from policy_golden import CLASSES, KEY, NOW

    from bridge.mapping import map_record, patient_identifiers
    from bridge.policy.consent import ConsentRegistry, build_consent
    from bridge.policy.engine import apply_policy
    from bridge.policy.profile import load_link_profile
    from bridge.policy.research import ReleaseItem, anonymise, bundle_of, held
    from bridge.samples import inpatient_records

    profile = load_link_profile("research-limited-data-set")
    assert profile.k_anonymity is not None
    collections = [map_record(r, now=NOW) for r in inpatient_records(240, seed=5)]
    registry = ConsentRegistry()
    for i, c in enumerate(collections):
        system, value = patient_identifiers(c)[0]
        registry.put(build_consent(
            consent_id=f"t-{i}", patient_system=system, patient_value=value,
            recipient="research-c", purposes=["HRESCH"], start=NOW - timedelta(days=900),
            end=NOW + timedelta(days=300), sensitive_classes=CLASSES,
            hospital_partner_id="hospital-a"), now=NOW, trusted=True)
    bundles = [apply_policy(c, registry=registry, profile=profile, recipient="research-c",
                            purpose="HRESCH", now=NOW, key=KEY).bundle for c in collections]
    twice = bundles[3]["entry"]
    patient = next(e for e in twice if e["resource"]["resourceType"] == "Patient")
    other = copy.deepcopy(patient)
    other["resource"]["id"] = "another"
    twice.append(other)
    ages = [None if i % 37 == 0 else 92 if i % 11 == 0 else 20 + i % 60 for i in range(240)]
    levels = set()
    top_coded = 0
    for k, share in ((2, 1.0), (2, 0.85), (2, 0.7), (5, 0.05)):
        def batch(how: str) -> list[ReleaseItem]:
            out = []
            for i, b in enumerate(bundles):
                person, age = f"p{i % 150}", ages[i % 150]
                if how == "dict":
                    out.append(ReleaseItem(i, copy.deepcopy(b), person, age))
                elif how == "text":
                    out.append(ReleaseItem(i, held(b), person, age))
                else:
                    out.append(ReleaseItem.as_text(i, b, person, age))
            return out

        quasi = profile.k_anonymity.quasi
        as_dicts, report_d = anonymise(batch("dict"), k=k, quasi=quasi, max_suppressed=share)
        for how in ("text", "text with its Patient"):
            as_text, report_t = anonymise(batch(how), k=k, quasi=quasi, max_suppressed=share)
            assert report_t.to_dict() == report_d.to_dict()
            assert [i.index for i in as_text] == [i.index for i in as_dicts]
            for t, d in zip(as_text, as_dicts, strict=True):
                assert isinstance(t.bundle, bytes)
                assert t.bundle == orjson.dumps(d.bundle)
                assert bundle_of(t) == d.bundle
        levels.add(report_d.level)
        top_coded += report_d.top_coded
    assert levels == {0, 1, 2}
    assert top_coded > 0
