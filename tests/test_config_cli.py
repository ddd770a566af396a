"""Configuration files and the command line, as an operator meets them."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from e2e_support import consent_for, make_workdir, special_as_secondary

from bridge.cli import main
from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.samples import inpatient_records


@pytest.fixture
def configs(tmp_path: Path) -> tuple[Path, Path]:
    return make_workdir(tmp_path)


def test_demo_configuration_loads_with_paths_resolved(configs: tuple[Path, Path]) -> None:
    hospital_cfg, _ = configs
    config = load_config(hospital_cfg)
    assert config.controller.id == "hospital-a"
    assert config.tls.cert.is_absolute() and config.tls.cert.exists()
    assert config.store.path.parent == hospital_cfg.parent / "hospital-a"
    assert config.link("claims-to-insurer-b").partner == "insurer-b"


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda t: t.replace('cert = "pki/hospital-a/tls.pem"\n', ""), "tls.cert"),
        (lambda t: t.replace("[server]\n", "[server]\nbogus = 1\n"), "server.bogus"),
        (lambda t: t.replace('partner = "insurer-b"', 'partner = "nobody"'), "links[0].partner"),
        (lambda t: t.replace("port = ", "port = -"), "server.port"),
        (
            lambda t: t.replace('direction = "outbound"', 'direction = "sideways"'),
            "links[0].direction",
        ),
    ],
)
def test_configuration_errors_name_file_and_key(
    configs: tuple[Path, Path], edit, where: str
) -> None:
    hospital_cfg, _ = configs
    hospital_cfg.write_text(edit(hospital_cfg.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(hospital_cfg)
    assert str(hospital_cfg) in str(err.value)
    assert where in str(err.value)


def test_unreadable_and_malformed_configuration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[controller\nid = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_map_prints_a_valid_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_file = tmp_path / "record.json"
    record_file.write_text(
        json.dumps(inpatient_records(1, seed=2)[0], ensure_ascii=False), encoding="utf-8"
    )
    assert main(["map", "--from", "ws445", str(record_file)]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["resourceType"] == "Bundle"
    assert {"Patient", "Claim", "Encounter"} <= {
        e["resource"]["resourceType"] for e in bundle["entry"]
    }
    assert main(["map", "--from", "ws445", "--check", str(record_file)]) == 0
    assert capsys.readouterr().out == ""


def test_map_errors_name_the_element_not_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = inpatient_records(1, seed=2)[0]
    record["elements"]["HDSD00.11.109"] = "7"  # not a GB/T 2261.1 sex code
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    assert main(["map", "--from", "ws445", str(record_file)]) == 2
    err = capsys.readouterr().err
    assert "HDSD00.11.109" in err

    record = inpatient_records(1, seed=2)[0]
    name = record["elements"]["HDSD00.11.110"]
    record["elements"]["HDSD00.11.999"] = name
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    assert main(["map", "--from", "ws445", str(record_file)]) == 2
    err = capsys.readouterr().err
    assert "HDSD00.11.999" in err and name not in err

    record_file.write_text('{"dataset": "WS445.10", "elements": {', encoding="utf-8")
    assert main(["map", "--from", "ws445", str(record_file)]) == 2
    assert "error [parse-error]" in capsys.readouterr().err


def test_certs_init_refuses_to_overwrite_a_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert main(["certs", "init", str(pki), "--controllers", "hospital-a", "insurer-b"]) == 0
    assert (pki / "ca.pem").exists() and (pki / "insurer-b" / "sign.key").exists()
    assert (pki / "hospital-a" / "tls.key").stat().st_mode & 0o077 == 0
    before = (pki / "ca.pem").read_bytes()
    assert main(["certs", "init", str(pki)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (pki / "ca.pem").read_bytes() == before


def test_consent_and_push_from_the_command_line(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    record = inpatient_records(3, seed=5)[2]
    record_file = tmp_path / "claim.json"
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    push = [
        "push",
        "--config",
        str(hospital_cfg),
        "--link",
        "claims-to-insurer-b",
        str(record_file),
    ]

    assert main(push) == 2  # no consent yet: refused, nothing queued
    assert "consent-denied" in capsys.readouterr().err

    consent_file = tmp_path / "consent.json"
    consent_file.write_bytes(orjson.dumps(consent_for(record, consent_id="cli-1")))
    assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
    assert main(["consent", "list", "--config", str(hospital_cfg)]) == 0
    assert "cli-1\tactive" in capsys.readouterr().out

    assert main(push) == 0
    first = capsys.readouterr().out
    assert " queued on link claims-to-insurer-b" in first
    assert main(push) == 0
    assert "duplicate suppressed" in capsys.readouterr().out
    assert main(["outbox", "--config", str(hospital_cfg)]) == 0
    assert "queued\t1" in capsys.readouterr().out
    assert main(["audit", "verify", "--config", str(hospital_cfg)]) == 0


def test_audit_verify_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no store at this path" in capsys.readouterr().err


def test_consent_revoke_and_show(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    record = inpatient_records(4, seed=5)[3]
    consent_file = tmp_path / "consent.json"
    consent_file.write_bytes(orjson.dumps(consent_for(record, consent_id="cli-2")))
    assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
    assert main(["consent", "revoke", "--config", str(hospital_cfg), "cli-2"]) == 0
    assert main(["consent", "show", "--config", str(hospital_cfg), "cli-2"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out[out.out.index("{") :])["status"] == "inactive"
    assert "\tactive\t" in out.err and "\tinactive\t" in out.err

    record_file = tmp_path / "claim.json"
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    link = "claims-to-insurer-b"
    assert main(["push", "--config", str(hospital_cfg), "--link", link, str(record_file)]) == 2
    assert "consent-denied" in capsys.readouterr().err
    assert main(["consent", "revoke", "--config", str(hospital_cfg), "nope"]) == 2


def test_consent_explain_shows_what_is_sent_and_held_back(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    from bridge.policy.classify import default_sensitive_codes

    codes = default_sensitive_codes()
    icd10 = "urn:oid:2.16.156.10011.2.3.3.11"
    record = special_as_secondary(next(
        r
        for r in inpatient_records(200, seed=13)
        if any(
            codes.classes_of(icd10, d.get("HDSD00.11.020") or d.get("HDSD00.11.023"))
            for d in r["groups"].get("diagnoses", [])
        )
    ))
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    explain = [
        "consent",
        "explain",
        "--config",
        str(hospital_cfg),
        "--link",
        "claims-to-insurer-b",
        str(record_file),
    ]

    assert main(explain) == 1  # no consent: refused, and the output says why
    assert "REFUSED" in capsys.readouterr().out

    consent_file = tmp_path / "consent.json"
    consent_file.write_bytes(orjson.dumps(consent_for(record, consent_id="ex-1", sensitive=())))
    assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
    capsys.readouterr()
    assert main([*explain, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    outcomes = {e["outcome"] for e in report["elements"]}
    assert {"sent", "removed-by-profile", "held-back-by-consent"} <= outcomes
    held = [e for e in report["elements"] if e["outcome"] == "held-back-by-consent"]
    assert all(e["path"].startswith(("Condition", "Claim")) for e in held)
    sent = [e for e in report["elements"] if e["outcome"] == "sent"]
    assert any(e["path"].startswith("Patient") for e in sent)
    assert [c["id"] for c in report["decision"]["consents"]] == ["ex-1"]
    assert report["decision"]["provisions"][0]["consent"] == "ex-1"
    # Paths and ids only: the patient's name never appears in the explanation.
    assert record["elements"]["HDSD00.11.110"] not in json.dumps(report, ensure_ascii=False)


def test_status_reports_links_and_what_needs_attention(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    record = inpatient_records(6, seed=5)[5]
    consent_file = tmp_path / "consent.json"
    consent_file.write_bytes(orjson.dumps(consent_for(record, consent_id="st-1")))
    record_file = tmp_path / "claim.json"
    record_file.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
    link = "claims-to-insurer-b"
    assert main(["push", "--config", str(hospital_cfg), "--link", link, str(record_file)]) == 0
    capsys.readouterr()

    assert main(["status", "--config", str(hospital_cfg)]) == 0
    out = capsys.readouterr().out
    assert "audit chain verified" in out
    assert "claims-to-insurer-b → insurer-b: queued 1" in out and "oldest waiting seq 1" in out

    # A dead-lettered claim is something an operator must see, and the exit code says so.
    from bridge.config import load_config
    from bridge.ledger import open_store
    from bridge.ledger.audit import AuditRecord

    config = load_config(hospital_cfg)
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    with open_store(config.store) as store:
        (row,) = store.claim_due(link, now=now)
        store.mark_dead(
            row.message_id,
            error="transport-error",
            now=now,
            audit=AuditRecord(
                time=now,
                actor="hospital-a",
                action="claim.dead",
                subject=row.message_id,
                outcome="failure",
            ),
        )
    assert main(["status", "--config", str(hospital_cfg)]) == 1
    assert "seq 1 dead (transport-error)" in capsys.readouterr().out


def test_a_record_without_a_claim_is_refused_on_a_claim_link(
    configs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab report has no place on the insurer's claim link: refused, nothing queued."""
    hospital_cfg, _ = configs
    golden = Path(__file__).parent / "golden" / "ws445"
    lab = json.loads((golden / "lab-01.input.json").read_text(encoding="utf-8"))
    record_file = tmp_path / "lab.json"
    record_file.write_text(json.dumps(lab, ensure_ascii=False), encoding="utf-8")
    consent_file = tmp_path / "consent.json"
    consent_file.write_bytes(orjson.dumps(consent_for(lab, consent_id="lab-1")))
    assert main(["consent", "add", "--config", str(hospital_cfg), str(consent_file)]) == 0
    capsys.readouterr()
    link = "claims-to-insurer-b"
    assert main(["push", "--config", str(hospital_cfg), "--link", link, str(record_file)]) == 2
    err = capsys.readouterr().err
    assert "yields no Claim" in err and "$.dataset" in err
    assert main(["outbox", "--config", str(hospital_cfg)]) == 0
    assert "queued\t0" in capsys.readouterr().out
