"""A record too large for one claim is refused when it is pushed, not queued to be
refused by the partner (413) after the sender spent its memory and the partner's.

``links.<id>.max_message_bytes`` (the partner's body limit, 4 MiB by default, PROTOCOL
P-HTTP-3) bounds the signed claim; a record file more than twice as large (a claim is
several times the record it maps) is refused before it is read as JSON. Each refusal names the file or the
configuration key, exits 2 and queues nothing. Driven with ``bridge push`` as its own
process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e_support import cli, queued_count

LINK = "claims-to-insurer-b"
LIMIT = 16 * 1024


@pytest.fixture
def hospital(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    done = cli("init", "hospital", str(tmp_path))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "hospital.toml"
    text = config.read_text(encoding="utf-8")
    marker = f'id = "{LINK}"\n'
    config.write_text(text.replace(marker, f"{marker}max_message_bytes = {LIMIT}\n", 1),
                      encoding="utf-8")
    samples = tmp_path / "hospital-a" / "samples"
    added = cli("consent", "add", "--config", str(config), str(samples / "consent.json"))
    assert added.returncode == 0, added.stderr
    record = json.loads((samples / "claim-1.json").read_text(encoding="utf-8"))
    return config, record


def _with_diagnoses(record: dict[str, Any], n: int) -> dict[str, Any]:
    out = json.loads(json.dumps(record))
    out["groups"]["diagnoses"] = [
        {"HDSD00.11.020": "K76.000", "HDSD00.11.021": "脂肪肝", "HDSD00.11.022": "1"}
        for _ in range(n)]
    return out


def test_a_record_mapping_to_a_claim_over_the_links_bound_is_refused(
        hospital: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    config, record = hospital
    path = tmp_path / "many-diagnoses.json"
    path.write_text(json.dumps(_with_diagnoses(record, 120), ensure_ascii=False),
                    encoding="utf-8")
    assert path.stat().st_size < LIMIT  # the record is small; the claim it maps to is not
    pushed = cli("push", "--config", str(config), "--link", LINK, str(path))
    assert pushed.returncode == 2, pushed.stdout + pushed.stderr
    assert "payload-too-large" in pushed.stderr
    assert f"links.{LINK}.max_message_bytes" in pushed.stderr
    assert "脂肪肝" not in pushed.stderr and "Traceback" not in pushed.stderr
    assert queued_count(config) == 0
    # The sample record itself is within the bound and goes.
    sample = tmp_path / "hospital-a" / "samples" / "claim-1.json"
    assert cli("push", "--config", str(config), "--link", LINK, str(sample)).returncode == 0
    assert queued_count(config) == 1


def test_a_record_file_over_the_links_bound_is_refused_before_it_is_read(
        hospital: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    config, record = hospital
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(_with_diagnoses(record, 900), ensure_ascii=False),
                    encoding="utf-8")
    assert path.stat().st_size > 2 * LIMIT
    pushed = cli("push", "--config", str(config), "--link", LINK, str(path))
    assert pushed.returncode == 2, pushed.stdout + pushed.stderr
    assert "payload-too-large" in pushed.stderr and str(path) in pushed.stderr
    assert f"links.{LINK}.max_message_bytes" in pushed.stderr
    assert queued_count(config) == 0
