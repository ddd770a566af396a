"""A consent's patient does not change under its id.

Amending a consent with the same id but another patient would take it from its patient
without a word: that patient's claims would then be refused, and the other person's
released under a consent they may never have given. ``bridge consent add`` refuses it,
naming Consent.patient and no value, and the consent stays as it was; the patient's
consent is still revoked the usual way. Driven as the operator does, each command its
own process.
"""

from __future__ import annotations

import json
from pathlib import Path

from e2e_support import cli


def test_an_amendment_naming_another_patient_is_refused(tmp_path: Path) -> None:
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    sample = tmp_path / "hospital-a" / "samples" / "consent.json"
    assert cli("consent", "add", "--config", str(config), str(sample)).returncode == 0
    consent = json.loads(sample.read_text(encoding="utf-8"))
    original = consent["patient"]["identifier"]["value"]

    moved = json.loads(json.dumps(consent))
    moved["patient"]["identifier"]["value"] = "110101198503151234"
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(moved), encoding="utf-8")
    refused = cli("consent", "add", "--config", str(config), str(path))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Consent.patient" in refused.stderr and "cannot change" in refused.stderr
    assert "110101198503151234" not in refused.stderr and original not in refused.stderr

    shown = cli("consent", "show", "--config", str(config), consent["id"])
    assert shown.returncode == 0, shown.stderr
    assert original in shown.stdout and "110101198503151234" not in shown.stdout

    revoked = json.loads(json.dumps(consent))
    revoked["status"] = "inactive"
    path.write_text(json.dumps(revoked), encoding="utf-8")
    assert cli("consent", "add", "--config", str(config), str(path)).returncode == 0
