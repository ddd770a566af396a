"""Files a careless operator names instead of a record, a consent or a configuration: an
endless device, a named pipe nobody writes to, a file of hundreds of megabytes. Each is
refused at once with one line naming the file, exit status 2, and the command does not
read it into memory first."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def bridge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    run = bridge("init", "hospital", "site", "--port", "0", "--ops-port", "0", cwd=root)
    assert run.returncode == 0, run.stderr
    os.mkfifo(root / "pipe")
    with open(root / "big.json", "wb") as fh:
        fh.truncate(300 * 1024 * 1024)  # sparse: costs no disk
    return root


@pytest.mark.parametrize("name", ["/dev/zero", "pipe", "big.json"])
@pytest.mark.parametrize("command", [
    ("consent", "add", "--config", "site/hospital.toml"),
    ("push", "--config", "site/hospital.toml", "--link", "claims-to-insurer-b"),
    ("map", "--from", "ws445"),
])
def test_a_file_that_is_not_an_input_is_refused_at_once(
    site: Path, command: tuple[str, ...], name: str
) -> None:
    started = time.monotonic()
    run = bridge(*command, name, cwd=site)
    assert run.returncode == 2, run.stderr
    assert time.monotonic() - started < 30
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [") and name in lines[0], run.stderr
    assert "not a regular file" in lines[0] or "larger than" in lines[0], lines[0]


@pytest.mark.parametrize("name", ["/dev/zero", "pipe", "big.json"])
def test_a_configuration_that_is_not_one_is_refused_at_once(site: Path, name: str) -> None:
    run = bridge("status", "--config", name, cwd=site)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error [config-invalid]: configuration file:"), run.stderr


def test_a_pipe_or_huge_file_in_a_folder_is_named_and_skipped(site: Path) -> None:
    folder = site / "folder"
    folder.mkdir()
    os.mkfifo(folder / "a-pipe.json")
    os.link(site / "big.json", folder / "big.json")
    run = bridge("map", "--from", "ws445", "--check", str(folder), cwd=site)
    assert run.returncode == 1, run.stderr
    # map reads the folder's files (a pipe is not one) and names the one it refused
    assert "big.json: [usage] larger than 64 MiB" in " ".join(run.stderr.split())
    from pull_support import write_site

    hospital, _, _ = write_site(site / "pull")
    run = bridge("records", "import", "--config", str(hospital), str(folder), cwd=site)
    assert run.returncode == 2, run.stderr
    assert "a-pipe.json" in run.stderr and "big.json" in run.stderr
