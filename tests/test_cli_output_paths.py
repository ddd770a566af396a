"""Paths a command writes to or reads from that an operator can get wrong: a file in a
folder that does not exist, a folder where a file belongs, a folder to export into whose
parent is missing. Each is a usage error naming the option or argument (exit status 2),
before anything is read from the store or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from ops_support import bridge, init_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_site(tmp_path_factory.mktemp("outputs"))


CONFIG = ("--config", "site/hospital.toml")


@pytest.mark.parametrize(("args", "says"), [
    (("compliance", "report", *CONFIG, "--html", "missing/dir/report.html"),
     "--html: no such folder (at missing/dir)"),
    (("compliance", "report", *CONFIG, "--html", "site"),
     "--html is a folder, not a file (at site)"),
    (("audit", "export", *CONFIG, "--fhir", "--out", "missing/audit.json"),
     "--out: no such folder (at missing)"),
    (("audit", "export", *CONFIG, "--fhir", "--out", "site"),
     "--out is a folder, not a file (at site)"),
    (("audit", "check-proof", "--cert", "site/pki/ca.pem", "site"),
     "proof file (FILE) is a folder, not a file (at site)"),
    (("inbox", "export", *CONFIG, "--to", "missing/path"),
     "--to: the folder to make it in does not exist (at missing)"),
])
def test_a_path_the_command_cannot_use_is_a_usage_error_naming_it(
    site: Path, args: tuple[str, ...], says: str
) -> None:
    before = sorted(p.relative_to(site).as_posix() for p in site.rglob("*"))
    run = bridge(*args, cwd=site)
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"error [usage]: {says}\n", run.stderr
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*")) == before


def test_a_report_is_written_into_a_folder_that_exists(site: Path) -> None:
    run = bridge("compliance", "report", *CONFIG, "--html", "report.html", cwd=site)
    assert run.returncode in (0, 1), run.stderr
    assert (site / "report.html").is_file()
