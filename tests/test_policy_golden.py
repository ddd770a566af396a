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

import pytest
from policy_golden import GOLDEN, compute, research_release


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
