"""Consent intake refuses ids FHIR does not allow and codes the bridge does not define.

A Consent's id is a FHIR id (at most 64 characters of ``A-Za-z0-9-.``), and every coding
in a code system whose codes the bridge writes and matches (its special-disease classes,
data categories and grades, and the v3 confidentiality codes) must use a code on that
system's list: an unknown code would silently cover, or hold back, nothing. Each refusal
names the path and never echoes the code, which may be anything a client sent. Checked
on the parser, then from outside: the consent API of a real ``bridge serve`` process
over mutual TLS, and ``bridge consent add`` run as a user runs it; neither records the
refused consent.
"""

from __future__ import annotations

import copy
import http.client
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import client_ssl, consent_for, make_workdir
from ops_support import serve

from bridge.config import load_config
from bridge.errors import BridgeError
from bridge.policy.classify import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    GRADE_SYSTEM,
    SENSITIVITY_SYSTEM,
)
from bridge.policy.consent import parse_consent
from bridge.samples import inpatient_records

MARK = "110101199003074512"


def _consent(consent_id: str = "intake-1") -> dict[str, Any]:
    return consent_for(inpatient_records(1, seed=41)[0], consent_id=consent_id)


def _label(system: str, code: str) -> Callable[[dict[str, Any]], str]:
    def change(c: dict[str, Any]) -> str:
        labels = c["provision"].setdefault("securityLabel", [])
        labels.append({"system": system, "code": code})
        return f"Consent.provision.securityLabel[{len(labels) - 1}].code"
    return change


def _meta_security(system: str, code: str) -> Callable[[dict[str, Any]], str]:
    def change(c: dict[str, Any]) -> str:
        c["meta"] = {"security": [{"system": system, "code": code}]}
        return "Consent.meta.security[0].code"
    return change


def _nested_label(c: dict[str, Any]) -> str:
    c["provision"]["provision"] = [{"type": "deny", "securityLabel": [
        {"system": SENSITIVITY_SYSTEM, "code": "mental"},
        {"system": SENSITIVITY_SYSTEM, "code": MARK}]}]
    return "Consent.provision.provision[0].securityLabel[1].code"


def _class(c: dict[str, Any]) -> str:
    c["provision"]["class"] = [{"system": CATEGORY_SYSTEM, "code": MARK}]
    return "Consent.provision.class[0].code"


def _long_id(c: dict[str, Any]) -> str:
    c["id"] = "a" * 100
    return "Consent.id"


REFUSED: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("id of 100 characters", _long_id),
    ("id of 65 characters", lambda c: c.update(id="a" * 65) or "Consent.id"),
    ("unknown special-disease class", _label(SENSITIVITY_SYSTEM, MARK)),
    ("unknown data category", _label(CATEGORY_SYSTEM, MARK)),
    ("grade out of range", _label(GRADE_SYSTEM, "7")),
    ("unknown confidentiality", _label(CONFIDENTIALITY_SYSTEM, "X" + MARK)),
    ("class in an unknown category", _class),
    ("label in a nested provision", _nested_label),
    ("meta.security", _meta_security(SENSITIVITY_SYSTEM, MARK)),
]

ACCEPTED: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
    ("id of 64 characters", lambda c: c.update(id="a-." * 21 + "b")),
    ("known class", _label(SENSITIVITY_SYSTEM, "genetic")),
    ("known category", _label(CATEGORY_SYSTEM, "health-status")),
    ("known grade", _label(GRADE_SYSTEM, "5")),
    ("known confidentiality", _label(CONFIDENTIALITY_SYSTEM, "R")),
    ("a code in a system the bridge does not define", _label("urn:example:labels", MARK)),
]


@pytest.mark.parametrize(("label", "change"), REFUSED)
def test_the_parser_refuses_naming_the_path_not_the_code(
        label: str, change: Callable[[dict[str, Any]], str]) -> None:
    consent = _consent()
    where = change(consent)
    with pytest.raises(BridgeError) as caught:
        parse_consent(consent)
    assert caught.value.location == where, label
    assert MARK not in str(caught.value) and "a" * 65 not in str(caught.value)


@pytest.mark.parametrize(("label", "change"), ACCEPTED)
def test_the_parser_accepts_what_the_lists_hold(
        label: str, change: Callable[[dict[str, Any]], object]) -> None:
    consent = _consent()
    change(consent)
    assert parse_consent(consent).id == consent["id"], label


def _post(port: int, root: Path, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPSConnection("127.0.0.1", port,
                                       context=client_ssl(root, "hospital-a"), timeout=30)
    try:
        conn.request("POST", "/fhir/Consent", json.dumps(body).encode(),
                     {"Content-Type": "application/fhir+json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _stored_ids(config: Path) -> list[str]:
    con = sqlite3.connect(f"file:{load_config(config).store.path}?mode=ro", uri=True)
    try:
        return [r[0] for r in con.execute("SELECT consent_id FROM consent")]
    finally:
        con.close()


def test_the_consent_api_refuses_with_422_and_records_nothing(tmp_path: Path) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    port = load_config(hospital_cfg).server.port
    hospital = serve(hospital_cfg)
    try:
        status, _ = _post(port, tmp_path, _consent("intake-ok"))
        assert status == 201
        for n, (label, change) in enumerate(REFUSED):
            consent = _consent(f"intake-{n}")
            where = change(consent)
            status, outcome = _post(port, tmp_path, consent)
            assert status == 422, (label, status)
            issue = outcome["issue"][0]
            assert issue["expression"] == [where], (label, issue)
            assert MARK not in json.dumps(outcome, ensure_ascii=False), label
    finally:
        hospital.stop()
    assert _stored_ids(hospital_cfg) == ["intake-ok"]
    log = "\n".join(hospital.log_lines())
    assert "Traceback" not in log and MARK not in log


def test_bridge_consent_add_refuses_and_records_nothing(tmp_path: Path) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    for n, (label, change) in enumerate(REFUSED):
        consent = _consent(f"cli-{n}")
        where = change(consent)
        path = tmp_path / f"consent-{n}.json"
        path.write_text(json.dumps(copy.deepcopy(consent)), encoding="utf-8")
        run = subprocess.run(
            [sys.executable, "-m", "bridge", "consent", "add", "--config", str(hospital_cfg),
             str(path)],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode != 0, (label, run.stdout)
        assert run.stderr.startswith("error ["), (label, run.stderr)
        assert where in run.stderr, (label, run.stderr)
        assert MARK not in run.stderr + run.stdout and "Traceback" not in run.stderr, label
    assert _stored_ids(hospital_cfg) == []
