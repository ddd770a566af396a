"""``bridge compliance report`` from outside, and the check of its evidence: every test
the report names for an item exists in this run and passed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from compliance_evidence import live_evidence
from compliance_support import append, bind_agreement
from ops_support import bridge, make_site

from bridge.compliance.catalog import ITEMS
from bridge.compliance.operators import host_user
from bridge.compliance.report import build_report, evidence_from_tests
from bridge.config import load_config

#: Items a whole run of the suite must prove with at least one passing test.
PROVEN_BY_THE_SUITE = (
    ["U1", "U2", "U3", "U4", "U6", "U7", "U8", "U9", "U10", "U11", "U12", "U13", "U14", "T1", "T2", "T3", "T4", "T5", "T6", "T8", "T9", "T10", "T11", "T12", "T13", "T15", "T16", "T17", "T18", "T20", "D2", "D3", "D4", "D5", "D6", "D7"]
)


def _report(config: Path, *extra: str) -> dict[str, Any]:
    run = bridge("compliance", "report", "--config", str(config), "--json", *extra)
    assert run.returncode == 0, run.stderr
    return {row["id"]: row for row in json.loads(run.stdout)["items"]}


def test_the_report_follows_the_live_configuration(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    before = _report(site.hospital)
    assert len(before) == 45 and [r["id"] for r in before.values()] == [i.id for i in ITEMS]
    assert before["U9"]["status"] == "not met" and "claims-to-insurer-b" in before["U9"]["why"]
    assert before["T6"]["status"] == "not met" and before["T4"]["status"] == "not met"
    assert before["U11"]["status"] == "not applicable"
    assert "非医疗目的使用数据，是否获得主体同意" in before["U1"]["question"]

    bind_agreement(site.hospital, "dua-claims")
    append(site.hospital, '\n[[operators]]\nname = "vera"\nrole = "viewer"\n'
                          f'os_users = ["{host_user()}"]\n')
    text = site.hospital.read_text(encoding="utf-8")
    site.hospital.write_text(text.replace("[operations]", '[operations]\nauth = "certificate"', 1),
                             encoding="utf-8")
    after = _report(site.hospital)
    assert after["U9"]["status"] == "met" and "dua-claims" in after["U9"]["why"]
    assert after["T6"]["status"] == "met" and after["T4"]["status"] == "met"
    assert after["T3"]["status"] == "met"


def test_the_html_page_is_self_contained_and_names_each_item(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    site = make_site(tmp_path)
    evidence = tmp_path / "evidence.json"
    live = live_evidence(request.config)["tests"]
    evidence.write_text(json.dumps({"finished": "now", "complete": False,
                                    "tests": [{"id": k, **v} for k, v in live.items()]}))
    page = tmp_path / "report.html"
    run = bridge("compliance", "report", "--config", str(site.hospital), "--html", str(page),
                 "--evidence", str(evidence))
    assert run.returncode == 0, run.stderr
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    for item in ITEMS:
        assert f"<tr id='{item.id}'>" in html
    text = bridge("compliance", "report", "--config", str(site.hospital), "--evidence",
                  str(evidence))
    assert text.returncode == 0 and text.stdout.count("\n") > 45


@pytest.mark.evidence_check
def test_every_test_the_report_names_exists_and_passed_in_this_run(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from compliance_evidence import _whole_suite, deferred

    evidence = live_evidence(request.config)
    later = deferred(request.config)  # the battery, left to ``pytest -m battery``
    tests = [{"id": k, **v} for k, v in evidence["tests"].items()
             if k != request.node.nodeid and k not in later]
    site = make_site(tmp_path)
    report = build_report(load_config(site.hospital), evidence_from_tests(tests))
    named = {t["id"] for row in report["items"] for t in row["tests"]}
    assert named <= evidence["collected"]
    failed = {t["id"]: t["outcome"] for row in report["items"] for t in row["tests"]
              if t["outcome"] != "passed"}
    assert not failed, failed
    if _whole_suite(request.config, evidence):
        # An item whose only tests are in the battery is proven by the battery profile's
        # run, which CI makes after this one; those tests must exist and be marked so.
        by_battery = {c for k in later for c in evidence["tests"].get(k, {}).get("controls", [])}
        unproven = [row["id"] for row in report["items"]
                    if row["id"] in PROVEN_BY_THE_SUITE and not row["proven"]
                    and row["id"] not in by_battery]
        assert not unproven, f"items without a passing test in this run: {unproven}"
