"""DE records that are valid JSON text but no record the bridge can take: a number too
long for any format (or for Python to convert), a lone surrogate, nesting no record has,
an element named twice, an integer JSON readers round. ``bridge push``, ``bridge map``
and ``bridge consent explain`` refuse each with one line naming the file and the place
(exit status 2, never an internal error), and a push queues nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ops_support import bridge, init_site

ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital made by ``bridge init`` (its samples, its empty outbox)."""
    return init_site(tmp_path_factory.mktemp("records"))


def _claim(site: Path) -> dict[str, Any]:
    return json.loads((site / "site/hospital-a/samples/claim-1.json").read_text("utf-8"))


def _with(site: Path, element: str, written: str) -> str:
    """The sample claim's JSON text with ``element``'s value written as ``written``."""
    record = _claim(site)
    record["elements"][element] = "@@"
    return json.dumps(record).replace('"@@"', written, 1)


def _prescription() -> str:
    record = json.loads((ROOT / "golden/ws445/prescription-01.input.json").read_text("utf-8"))
    record["elements"]["HDSD00.04.002"] = "@@"  # 处方编号, format N..30
    return json.dumps(record).replace('"@@"', "1" * 25, 1)


# name -> (the record's text, what the error says, where)
CASES: dict[str, Any] = {
    "amount-401-digits": (lambda s: _with(s, "HDSD00.11.142", "9" * 401),
                          "[mapping-error]: number longer than the declared format",
                          "HDSD00.11.142"),
    "amount-5000-digits": (lambda s: _with(s, "HDSD00.11.142", "9" * 5000),
                           "[parse-error]: number longer than the declared format",
                           "$.elements.HDSD00.11.142"),
    "lone-surrogate-in-name": (lambda s: _with(s, "HDSD00.11.110", '"\\ud800"'),
                               "[parse-error]: text with a lone surrogate",
                               "$.elements.HDSD00.11.110"),
    "lone-surrogate-unmapped": (lambda s: _with(s, "HDSD00.11.005", '"a\\udc00b"'),
                                "[parse-error]: text with a lone surrogate",
                                "$.elements.HDSD00.11.005"),
    "element-twice": (lambda s: json.dumps(_claim(s)).replace(
        '"HDSD00.11.110": ', '"HDSD00.11.110": "a", "HDSD00.11.110": ', 1),
                      "[parse-error]: a member name appears twice", "HDSD00.11.110"),
    "nested-100000": (lambda s: "[" * 100_000 + "]" * 100_000,
                      "[parse-error]: malformed JSON: nested", ""),
    "integer-beyond-2^53": (lambda s: _prescription(),
                            "[mapping-error]: integer beyond ±(2^53 - 1)", "HDSD00.04.002"),
}

COMMANDS = {
    "push": ("push", "--config", "site/hospital.toml", "--link", "claims-to-insurer-b"),
    "map": ("map", "--from", "ws445"),
    "explain": ("consent", "explain", "--config", "site/hospital.toml",
                "--link", "claims-to-insurer-b"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_record_the_bridge_cannot_take_is_refused_naming_the_place(
    site: Path, case: str, command: str
) -> None:
    text, says, where = CASES[case]
    path = site / f"{case}.json"
    if not path.exists():
        path.write_text(text(site), encoding="utf-8")
    run = bridge(*COMMANDS[command], path.name, cwd=site)
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error " + says), run.stderr
    assert "internal" not in run.stderr and "Traceback" not in run.stderr
    if where.startswith("$"):
        assert f"(at {path.name} {where})" in lines[0], lines[0]
    elif where:
        assert where in lines[0], lines[0]
    else:
        assert f"(at {path.name})" in lines[0], lines[0]
    if command == "push":
        listed = bridge("outbox", "list", "--config", "site/hospital.toml", "--json", cwd=site)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []


def test_a_folder_run_names_a_file_nested_too_deep_and_maps_the_others(site: Path) -> None:
    folder = site / "folder"
    folder.mkdir()
    (folder / "a-deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    (folder / "b-twice.json").write_text(CASES["element-twice"][0](site), encoding="utf-8")
    (folder / "c-claim.json").write_text(json.dumps(_claim(site)), encoding="utf-8")
    run = bridge("map", "--from", "ws445", "--check", str(folder), cwd=site)
    assert run.returncode == 1, run.stderr
    said = " ".join(run.stderr.split())
    assert "a-deep.json: [parse-error] malformed JSON: nested" in said, said
    assert "b-twice.json: [parse-error] a member name appears twice" in said, said
    assert "3 files: 1 mapped, 2 refused" in said, said


def test_a_research_batch_file_is_read_as_records_are(site: Path) -> None:
    batch = site / "batch.json"
    claim = json.dumps(_claim(site))
    twice = CASES["element-twice"][0](site)
    batch.write_text(f"[{claim}, {twice}]", encoding="utf-8")
    command = ("research", "report", "--config", "site/hospital.toml", "--link",
               "claims-to-insurer-b")
    run = bridge(*command, str(batch), cwd=site)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error [parse-error]: a member name appears twice in one "
                                 f"object (at {batch} HDSD00.11.110)"), run.stderr
    run = bridge(*command, str(site / "site"), cwd=site)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error [usage]: records file is a folder"), run.stderr
