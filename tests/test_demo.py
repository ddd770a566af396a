"""The README's first command: the demo runs end to end and accounts for every claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_pushes_claims_and_loses_none(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "demo",
            "--claims",
            "30",
            "--quiet",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in run.stdout.splitlines()
        if line.count("│") == 3
    }
    assert rows["lost"] == "0"
    assert rows["signature failures"] == "0"
    assert rows["refused at dispatch (consent revoked)"] == "3"
    assert rows["hospital audit chain"].startswith("verified")
    assert rows["insurer audit chain"].startswith("verified")
    assert int(rows["delivered, with signed receipt"]) == int(rows["claims in the insurer's inbox"])
    assert int(rows["refused: no consent"]) > 0
    # The work folder holds what an operator would need to look further.
    assert (tmp_path / "hospital.toml").exists() and (tmp_path / "insurer.log").exists()
    assert (tmp_path / "pki" / "ca.pem").exists()
    # Run again in the same folder: refused, naming --workdir, instead of counting the
    # earlier run's stores as this run's claims and reporting claims lost.
    again = subprocess.run(
        [sys.executable, "-m", "bridge", "demo", "--claims", "1", "--quiet", "--workdir",
         str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert again.returncode == 2, again.stdout + again.stderr
    assert "--workdir" in again.stderr and "earlier run" in again.stderr
    assert "FAILED" not in again.stdout and "Traceback" not in again.stderr
