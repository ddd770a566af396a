"""Instants at the edges of the calendar: year 1 and year 9999 in one zone fall outside it
in another. Each place that turns an input time into UTC or China Standard Time, or
moves a date, answers such an input as bad input naming where it was, never with an
internal error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.errors import MappingError
from bridge.mapping.reverse import _fhir_datetime
from bridge.policy.transforms import _shift

EDGES = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"]


def bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edges")
    run = bridge("init", "hospital", "site", "--port", "0", "--ops-port", "0", cwd=root)
    assert run.returncode == 0, run.stderr
    return root


@pytest.mark.parametrize("instant", EDGES)
def test_inbox_filters_at_the_calendar_edges_are_usage_errors(hospital: Path,
                                                              instant: str) -> None:
    for option in ("--since", "--until"):
        run = bridge("inbox", "list", "--config", "site/hospital.toml", option, instant,
                     cwd=hospital)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("error [parse-error]:") and f"(at {option})" in run.stderr
        assert len(run.stderr.splitlines()) == 1


@pytest.mark.parametrize("period", [{"start": "0001"}, {"start": EDGES[0]},
                                    {"start": "2026-01-01", "end": EDGES[1]}])
def test_a_consent_period_at_the_edge_of_the_calendar_keeps_its_meaning(
    hospital: Path, period: dict[str, str]
) -> None:
    # A period from the beginning of time, or to its end, is valid FHIR: it is recorded
    # (meaning "always" on that side), never a crash and never an internal error.
    sample = hospital / "site" / "hospital-a" / "samples" / "consent.json"
    consent = json.loads(sample.read_text(encoding="utf-8"))
    consent["id"] = "edge-of-time"
    consent["provision"]["period"] = period
    path = hospital / "edge.json"
    path.write_text(json.dumps(consent), encoding="utf-8")
    run = bridge("consent", "add", "--config", "site/hospital.toml", str(path), cwd=hospital)
    assert run.returncode == 0, run.stderr
    assert "internal" not in run.stderr and "Traceback" not in run.stderr


def test_a_date_shifted_beyond_the_calendar_is_dropped_not_a_crash() -> None:
    assert _shift("9999-12-31", 30) is None
    assert _shift("9999-12-31T10:00:00+08:00", 30) is None
    assert _shift("0001-01-01", -1) is None
    assert _shift("2026-01-01", 30) == "2026-01-31"


def test_a_fhir_time_beyond_the_calendar_in_china_is_a_mapping_error() -> None:
    with pytest.raises(MappingError) as info:
        _fhir_datetime("9999-12-31T23:00:00Z", "Encounter.period.end")
    assert info.value.location == "Encounter.period.end"
