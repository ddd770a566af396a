"""A ``bridge serve`` refused at start for a certificate or key leaves no store behind.

The TLS certificate and key, the CA bundle and the signing key are read before the
store is opened (or made): an operator fixing the file and starting again finds the
folder as it was, not a new empty store and its lock files. Each start is its own
process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import cli


@pytest.mark.parametrize("broken", ["tls.pem", "tls.key", "sign.key"])
def test_a_start_refused_for_a_certificate_or_key_makes_no_store(
        tmp_path: Path, broken: str) -> None:
    assert cli("init", "hospital", str(tmp_path)).returncode == 0
    config = tmp_path / "hospital.toml"
    folder = tmp_path / "hospital-a"
    before = sorted(p.name for p in folder.iterdir())
    assert "bridge.sqlite" not in before
    target = tmp_path / "pki" / "hospital-a" / broken
    if broken == "tls.key":
        target.write_text("not a key\n", encoding="ascii")  # damaged in a copy
    else:
        target.unlink()
    started = cli("serve", "--config", str(config))
    assert started.returncode == 2, started.stdout + started.stderr
    assert "Traceback" not in started.stderr
    assert sorted(p.name for p in folder.iterdir()) == before
