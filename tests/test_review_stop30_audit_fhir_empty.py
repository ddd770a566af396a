"""Review (stop30): since validation refuses empty arrays, ``bridge audit export --fhir``
fails (exit 2, "fhir-invalid ... Bundle.entry") when there is no entry to export (a store
read ``--since`` its last entry): it builds ``"entry": []`` and validates it. Before
9a55627 the same command wrote an empty Bundle. ``bridge audit disclosures --fhir``
for a patient with no disclosures prints the same ``"entry": []`` bundle, which is no
longer valid FHIR by the bridge's own validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import cli

from bridge.records.fhir import validate_resource


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("auditfhir") / "d"
    done = cli("init", "hospital", str(folder))
    assert done.returncode == 0, done.stderr
    done = cli("consent", "add", "--config", str(folder / "hospital.toml"),
               str(folder / "hospital-a/samples/consent.json"))
    assert done.returncode == 0, done.stderr
    return folder


def test_export_with_nothing_new_is_not_an_error(hospital: Path) -> None:
    done = cli("audit", "export", "--config", str(hospital / "hospital.toml"), "--fhir",
               "--since", "1000")
    assert done.returncode == 0, done.stderr
    validate_resource(json.loads(done.stdout))


def test_disclosures_fhir_with_none_is_valid_fhir(hospital: Path) -> None:
    done = cli("audit", "disclosures", "--config", str(hospital / "hospital.toml"), "--fhir",
               "--patient", "urn:oid:2.16.156.10011.1.3|110101199001011234")
    assert done.returncode == 0, done.stderr
    validate_resource(json.loads(done.stdout))
