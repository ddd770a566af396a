"""Site overlays: a site directory replaces shipped mapping files one by one.

Checked from the outside, through the commands an operator runs: ``bridge mappings
check --site``, ``bridge map --site`` and ``bridge serve`` with ``[intake] site``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from e2e_support import make_workdir
from hl7_feeds import InpatientVisit

from bridge.cli import main

ROOT = Path(__file__).parents[1]
VENDOR_SITE = Path(__file__).parent / "vendors" / "site"


def _shipped_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "mappings").rglob("*")):
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def test_check_lists_what_the_overlay_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    before = _shipped_digest()
    assert main(["mappings", "check", "--site", str(VENDOR_SITE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True
    assert {(f["file"], f["action"]) for f in report["files"]} == {
        ("hl7v2/facilities.yaml", "overrides"),
        ("hl7v2/valuesets/his-charge-item.yaml", "overrides"),
        ("hl7v2/valuesets/hl70064-financial-class.yaml", "overrides"),
        ("hl7v2/valuesets/hl70203-identifier-type.yaml", "overrides"),
    }
    assert report["facilities"] == ["GZZS"]
    assert main(["mappings", "check", "--site", str(VENDOR_SITE)]) == 0
    assert "overrides hl7v2/valuesets/his-charge-item.yaml" in capsys.readouterr().out
    assert _shipped_digest() == before  # the installed files are never edited


@pytest.mark.parametrize(("file", "old", "new", "key"), [
    ("hl7v2/valuesets/his-charge-item.yaml", 'target: "13"', 'target: "99"', "valueset"),
    ("hl7v2/valuesets/his-charge-item.yaml", "  - {code: \"XY0001\"",
     "  - {cost: \"XY0001\"", "cost"),
    ("hl7v2/facilities.yaml", 'code: "45557890-9"', 'code: "45557890-9 and more"', "code"),
    ("hl7v2/valuesets/hl70203-identifier-type.yaml", "target: inpatient-number",
     "target: ward-number", "in"),
])
def test_a_broken_overlay_is_a_config_error_naming_the_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str, old: str, new: str,
        key: str) -> None:
    site = tmp_path / "site"
    shutil.copytree(VENDOR_SITE, site)
    text = (site / file).read_text(encoding="utf-8")
    assert old in text
    (site / file).write_text(text.replace(old, new), encoding="utf-8")
    assert main(["mappings", "check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [config-invalid]: ")
    assert key in err and str(site / file) in err


def test_a_file_a_site_may_not_overlay_is_named(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    (site / "ws445").mkdir(parents=True)
    (site / "ws445" / "inpatient-front-sheet.yaml").write_text("mapping: x\n", encoding="utf-8")
    assert main(["mappings", "check", "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert "not a file a site may overlay" in err
    assert str(site / "ws445" / "inpatient-front-sheet.yaml") in err


def test_an_overlaid_value_set_reaches_the_fhir_mapping(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site" / "valuesets"
    site.mkdir(parents=True)
    text = (ROOT / "mappings" / "valuesets" / "icd9cm3.yaml").read_text(encoding="utf-8")
    narrowed = text.replace("pattern: '^[0-9]{2}(\\.[0-9]{1,2}|\\.[0-9]{4}|\\.[0-9]{4}x[0-9]{3})?$'",
                            "pattern: '^[0-9]{2}\\.[0-9]{4}$'")
    assert narrowed != text
    (site / "icd9cm3.yaml").write_text(narrowed, encoding="utf-8")
    message = tmp_path / "a03.hl7"
    message.write_bytes(InpatientVisit().a03(operation="47.0100x001"))
    assert main(["map", "--from", "hl7v2", str(message)]) == 0
    capsys.readouterr()
    assert main(["map", "--from", "hl7v2", "--site", str(tmp_path / "site"), str(message)]) == 2
    assert "PR1[1]-3.1" in capsys.readouterr().err


def test_serve_refuses_to_start_with_a_broken_overlay(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    site = tmp_path / "site"
    shutil.copytree(VENDOR_SITE, site)
    broken = site / "hl7v2" / "facilities.yaml"
    broken.write_text("facilities:\n  GZZS: {code: 45557890-9}\n", encoding="utf-8")
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write('\n[mllp]\nhost = "127.0.0.1"\nport = 0\ntls = false\n[intake]\nsite = "site"\n')
    assert main(["serve", "--config", str(hospital_cfg)]) == 2
    err = capsys.readouterr().err
    assert "listening" not in err  # refused before anything listens
    [line] = [x for x in err.splitlines() if x.startswith("error [")]
    assert line.startswith("error [config-invalid]: ") and f"{broken}:2 GZZS" in line


def _fee_class_overlay(site: Path) -> tuple[Path, int]:
    """A site whose fee-class table names a row that is not a front-sheet element."""
    folder = site / "hl7v2" / "valuesets"
    folder.mkdir(parents=True)
    text = (ROOT / "mappings" / "hl7v2" / "valuesets" / "his-fee-category.yaml").read_text(
        encoding="utf-8")
    assert 'target: "HDSD00.11.147"' in text
    overlay = folder / "his-fee-category.yaml"
    overlay.write_text(text.replace('target: "HDSD00.11.147"', 'target: "XDSD00.11.147"', 1),
                       encoding="utf-8")
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if "HDSD00.11.147" in row]
    return overlay, line


def test_a_broken_fee_class_overlay_is_named_at_the_overlay_not_the_shipped_mapping(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlay, line = _fee_class_overlay(tmp_path / "site")
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [config-invalid]: ")
    assert f"{overlay}:{line} target" in err
    assert "DFT_P03.yaml" not in err


def test_serve_names_a_broken_fee_class_overlay(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    overlay, line = _fee_class_overlay(tmp_path / "site")
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write('\n[mllp]\nhost = "127.0.0.1"\nport = 0\ntls = false\n[intake]\nsite = "site"\n')
    assert main(["serve", "--config", str(hospital_cfg)]) == 2
    err = capsys.readouterr().err
    assert "listening" not in err
    [error] = [x for x in err.splitlines() if x.startswith("error [")]
    assert f"{overlay}:{line} target" in error and "DFT_P03.yaml" not in error


def test_an_identifier_type_overlay_losing_a_selected_target_names_its_concepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "site" / "hl7v2" / "valuesets"
    folder.mkdir(parents=True)
    text = (ROOT / "mappings" / "hl7v2" / "valuesets" / "hl70203-identifier-type.yaml"
            ).read_text(encoding="utf-8")
    overlay = folder / "hl70203-identifier-type.yaml"
    overlay.write_text(text.replace("target: inpatient-number", "target: inpatient-numbr"),
                       encoding="utf-8")
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if row.startswith("concepts:")]
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert f"{overlay}:{line} concepts" in err and "inpatient-number" in err


@pytest.mark.parametrize("relative", ["hl7v2/valuesets/his-charge-item.yaml",
                                      "hl7v2/facilities.yaml",
                                      "valuesets/cv02-01-101-id-document-type.yaml"])
def test_a_folder_where_an_overlay_file_belongs_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], relative: str) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    (tmp_path / "site" / relative).mkdir(parents=True)
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [config-invalid]: ") and str(tmp_path / "site" / relative) in err
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write('\n[mllp]\nhost = "127.0.0.1"\nport = 0\ntls = false\n[intake]\nsite = "site"\n')
    assert main(["serve", "--config", str(hospital_cfg)]) == 2
    err = capsys.readouterr().err
    assert "listening" not in err and str(tmp_path / "site" / relative) in err


def test_a_dangling_link_where_an_overlay_file_belongs_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "site" / "hl7v2" / "valuesets"
    folder.mkdir(parents=True)
    (folder / "his-charge-item.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    assert str(folder / "his-charge-item.yaml") in capsys.readouterr().err


def test_a_fee_class_overlay_dropping_a_class_the_charge_items_use_names_the_overlay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "site" / "hl7v2" / "valuesets"
    folder.mkdir(parents=True)
    text = (ROOT / "mappings" / "hl7v2" / "valuesets" / "his-fee-category.yaml").read_text(
        encoding="utf-8")
    row = '  - {code: "13", display: "西药费", target: "HDSD00.11.098", equivalence: equivalent}\n'
    assert row in text
    overlay = folder / "his-fee-category.yaml"
    overlay.write_text(text.replace(row, ""), encoding="utf-8")
    [line] = [i for i, r in enumerate(text.splitlines(), 1) if r.startswith("concepts:")]
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert f"{overlay}:{line} concepts" in err and "his-charge-item.yaml" in err


def test_a_linked_folder_of_the_site_is_checked_as_a_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The loaders read a site's files through a linked folder, so the check does too:
    its overlays are listed, and a file no site may overlay in it is refused."""
    shared = tmp_path / "shared-valuesets"
    shared.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "mappings" / "hl7v2" / "valuesets"
                / "his-charge-item.yaml", shared / "his-charge-item.yaml")
    (tmp_path / "site" / "hl7v2").mkdir(parents=True)
    (tmp_path / "site" / "hl7v2" / "valuesets").symlink_to(shared, target_is_directory=True)
    # A link back up does not make the walk loop.
    (shared / "again").symlink_to(tmp_path / "site", target_is_directory=True)
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "hl7v2/valuesets/his-charge-item.yaml" in out and "0 file(s)" not in out
    (shared / "notes.txt").write_text("which codes are ours\n", encoding="utf-8")
    assert main(["mappings", "check", "--site", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert "not a file a site may overlay" in err and "notes.txt" in err
