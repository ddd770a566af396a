"""A ``bridge serve`` refused at start for a certificate or key leaves no store behind.

The TLS certificate and key, the CA bundle and the signing key are read before the
store is opened (or made): an operator fixing the file and starting again finds the
folder as it was, not a new empty store and its lock files. A file that is not there is
named by the configuration file and the key that names it, with the path. Each start
is its own process.
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
    if broken != "tls.key":
        key = {"tls.pem": "tls.cert", "sign.key": "signing.key"}[broken]
        assert f"{config}: {key}" in started.stderr, started.stderr
        assert str(target) in started.stderr


@pytest.mark.parametrize(("path", "key"), [
    ("pki/ca.pem", "tls.ca"),
    ("pki/insurer-b/sign.pem", "partners[0].signing_certs[0]"),
])
def test_a_missing_file_is_named_by_its_configuration_key(
        tmp_path: Path, path: str, key: str) -> None:
    assert cli("init", "hospital", str(tmp_path)).returncode == 0
    config = tmp_path / "hospital.toml"
    (tmp_path / path).unlink()
    started = cli("serve", "--config", str(config))
    assert started.returncode == 2, started.stdout + started.stderr
    assert "Traceback" not in started.stderr
    assert f"{config}: {key}" in started.stderr, started.stderr
    assert f"{tmp_path / path}, which does not exist" in started.stderr
