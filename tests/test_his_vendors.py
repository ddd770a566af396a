"""Messages written the way different HIS vendors write them, mapped with a site overlay.

``tests/vendors/messages/<vendor>/`` holds one stay per interface style (identifier
type codes, facility formats, extra Z-segments, text and dashes in fields no mapping
reads, LF/CRLF, GB 18030); ``tests/vendors/site/`` is the hospital's overlay. Every
message is read as the MLLP listener reads it; every output — each message's own
record and each assembled stay — is mapped to FHIR R4 and checked by the independent
validator (``tools/validate-fhir-r4.js``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import map_record
from bridge.mapping.hl7v2 import HL7Reader, SiteContext, parse_hl7
from bridge.mapping.hl7v2.visit import assemble
from bridge.resources import MappingFiles

ROOT = Path(__file__).parents[1]
VENDORS = Path(__file__).parent / "vendors"
FOLDERS = sorted(p for p in (VENDORS / "messages").iterdir() if p.is_dir())
# What the hospital's configuration says about itself ([controller]).
READER = HL7Reader(MappingFiles((VENDORS / "site").resolve()),
                   SiteContext("47011235-7", "杭州市滨江区第一人民医院"))


def _stay(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Each message's own FHIR output, the assembled stay's, and the warnings."""
    outputs: list[dict[str, Any]] = []
    parts = []
    warnings: list[str] = []
    for path in sorted(folder.glob("*.hl7")):
        taken = READER.intake(path.read_bytes())
        warnings += [f"{path.name}: {w}" for w in taken.warnings]
        if taken.record is not None:
            assert taken.message is not None
            outputs.append(READER.to_fhir(taken.message, warnings=[]))
        if taken.part is not None:
            parts.append(taken.part)
    assert parts, folder.name
    record, _ = assemble(READER.visits[parts[0].kind], parts)
    return outputs, map_record(record, files=READER.files), warnings


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_every_stay_is_taken_and_assembled(folder: Path) -> None:
    outputs, claim, _ = _stay(folder)
    assert outputs
    resources = {e["resource"]["resourceType"]: e["resource"] for e in claim["entry"]}
    assert resources["Claim"]["total"]["value"] > 0
    assert {"Patient", "Encounter", "Coverage", "Organization", "Procedure"} <= set(resources)


def test_site_codes_facilities_and_charge_master_are_applied() -> None:
    _, claim_a, warnings_a = _stay(VENDORS / "messages" / "vendor-a")
    _, claim_b, _ = _stay(VENDORS / "messages" / "vendor-b")
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in claim_b["entry"]}
    # MSH-4 was "GZZS": the site's facility table names the hospital.
    assert by_type["Organization"]["identifier"][0]["value"] == "45557890-9"
    assert by_type["Organization"]["name"] == "广州市天河区中医医院"
    # 980+560+1500+12000+18000, less a 3000 credit sent as a positive amount; the
    # 20000 payment is no charge.
    assert by_type["Claim"]["total"]["value"] == 30040
    ids = {i["system"]: i["value"] for i in by_type["Patient"]["identifier"]}
    assert ids["urn:oid:2.16.156.10011.1.12"] == "ZY2026000303"
    patient_a = next(e["resource"] for e in claim_a["entry"]
                     if e["resource"]["resourceType"] == "Patient")
    ids_a = {i["system"]: i["value"] for i in patient_a["identifier"]}
    assert ids_a["urn:oid:2.16.156.10011.1.12"] == "ZY20260301"  # PID-3.5 IN
    assert ids_a["urn:oid:2.16.156.10011.1.13"] == "P0001203"  # PID-3.5 PI
    # Dashes and text in fields no mapping reads: accepted, and said as warnings.
    assert any("PID[1]-33" in w for w in warnings_a)
    assert any("PV1[1]-47" in w for w in warnings_a)
    assert any("EVN[1]-3" in w for w in warnings_a)


def test_the_same_messages_without_the_overlay_are_refused_naming_the_field() -> None:
    from bridge.errors import MappingError

    shipped = HL7Reader()
    dft = (VENDORS / "messages" / "vendor-a" / "02-dft_p03.hl7").read_bytes()
    with pytest.raises(MappingError) as info:
        shipped.intake(dft)
    assert info.value.location == "FT1[1]-7.1"  # a charge item the shipped table lacks
    oru = (VENDORS / "messages" / "vendor-b" / "03-oru_r01.hl7").read_bytes()
    with pytest.raises(MappingError) as info:
        shipped.to_fhir(parse_hl7(oru), warnings=[])
    # MSH-4 was a namespace only and nothing says which organisation it is.
    assert info.value.location == "MSH[1]-4.2" and "HDSD00.05.070" in info.value.message


def test_every_output_passes_the_independent_r4_validator(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    files = []
    for folder in FOLDERS:
        outputs, claim, _ = _stay(folder)
        for i, bundle in enumerate([*outputs, claim]):
            path = tmp_path / f"{folder.name}-{i}.json"
            path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
            files.append(str(path))
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    assert sorted(r["file"] for r in report["results"]) == sorted(files)
    errors = [(Path(r["file"]).name, m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert run.returncode == 0
