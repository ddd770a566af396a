"""Mistakes in a configuration made with ``bridge init`` are refused when the file is
read, naming the file and the key, by every command that reads it: not found later by a
bridge that starts and then fails in a way that blames something else (a partner that
cannot be reached, another process on the port, the patient's consent).

Each check runs ``bridge`` as its own process, as an operator does. ``bridge store
migrate`` stands for any command that reads the configuration: it succeeds with a
configuration that loads (it creates the store).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ops_support import bridge

from bridge.demo import free_port
from bridge.resources import mappings_dir


def _init(root: Path, role: str = "hospital", *extra: str) -> Path:
    run = bridge("init", role, str(root), "--port", str(free_port()),
                 "--ops-port", str(free_port()), *extra)
    assert run.returncode == 0, run.stderr
    return root / f"{role}.toml"


def _edit(config: Path, old: str, new: str) -> None:
    text = config.read_text(encoding="utf-8")
    assert old in text, text
    config.write_text(text.replace(old, new, 1), encoding="utf-8")


def _refused(config: Path, *keys: str) -> str:
    """``bridge store migrate`` with ``config`` fails as a configuration error naming the
    file and each of ``keys``; its one line of error."""
    run = bridge("store", "migrate", "--config", str(config))
    assert run.returncode == 2, (run.stdout, run.stderr)
    line = run.stderr.strip()
    assert "\n" not in line and line.startswith("error [config-invalid]:"), line
    assert str(config) in line, line
    for key in keys:
        assert key in line, line
    return line


@pytest.mark.parametrize("url", [
    "htp:/x",                           # the tester's: no https, no host
    "http://127.0.0.1:8444/fhir",       # plain HTTP: the exchange is mutual TLS
    "https:///fhir",                    # no host
    "https://127.0.0.1:99999/fhir",     # no such port
    "127.0.0.1:8444/fhir",              # no scheme
])
def test_a_partner_address_that_is_not_https_with_a_host_is_refused(
        tmp_path: Path, url: str) -> None:
    config = _init(tmp_path)
    text = config.read_text(encoding="utf-8")
    old = re.search(r'^base_url = "[^"]+"', text, re.MULTILINE)
    assert old is not None
    _edit(config, old.group(0), f'base_url = "{url}"')
    line = _refused(config, "partners[0].base_url")
    assert "https" in line and "host" in line, line


def test_the_address_partners_are_told_is_https_with_a_host(tmp_path: Path) -> None:
    config = _init(tmp_path)
    _edit(config, "[server]\n", '[server]\npublic_url = "htp:/bridge.example/fhir"\n')
    _refused(config, "server.public_url")
    _edit(config, '"htp:/bridge.example/fhir"', '"https://bridge.example:8443/fhir"')
    assert bridge("store", "migrate", "--config", str(config)).returncode == 0


def test_init_refuses_one_port_for_the_server_and_the_operations_port(tmp_path: Path) -> None:
    port = str(free_port())
    run = bridge("init", "hospital", str(tmp_path), "--port", port, "--ops-port", port)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "--ops-port" in run.stderr and "--port" in run.stderr, run.stderr
    assert not (tmp_path / "hospital.toml").exists()
    # The role's default server port counts as well.
    run = bridge("init", "insurer", str(tmp_path), "--ops-port", "8444")
    assert run.returncode == 2 and "--ops-port" in run.stderr, run.stderr
    assert not (tmp_path / "insurer.toml").exists()


def test_a_configuration_with_two_listeners_on_one_port_is_refused(tmp_path: Path) -> None:
    config = _init(tmp_path)
    text = config.read_text(encoding="utf-8")
    server = re.search(r"^\[server\]\nhost = \"127.0.0.1\"\nport = (\d+)$", text, re.MULTILINE)
    ops = re.search(r"^\[operations\].*\nhost = \"127.0.0.1\"\nport = (\d+)$", text, re.MULTILINE)
    assert server is not None and ops is not None, text
    _edit(config, f"port = {ops.group(1)}", f"port = {server.group(1)}")
    _refused(config, "server.port", "operations.port")
    # The HL7 v2 listener too; a port of 0 (a free one, picked at start) never clashes.
    config.write_text(text + f"\n[mllp]\nhost = \"127.0.0.1\"\nport = {ops.group(1)}\n",
                      encoding="utf-8")
    _refused(config, "operations.port", "mllp.port")
    _edit(config, f"\n[mllp]\nhost = \"127.0.0.1\"\nport = {ops.group(1)}\n",
          "\n[mllp]\nhost = \"127.0.0.1\"\nport = 0\n")
    assert bridge("store", "migrate", "--config", str(config)).returncode == 0


@pytest.mark.parametrize(("old", "new", "key"), [
    ('purpose = "HPAYMT"', 'purpose = "HPAYMTT"', "links[0].purpose"),
    ('purpose = "HPAYMT"', 'purpose = "HPAYMT"\npartner_consent_purposes = ["TRAET"]',
     "links[0].partner_consent_purposes"),
])
def test_a_misspelt_purpose_of_use_is_refused_listing_the_purposes(
        tmp_path: Path, old: str, new: str, key: str) -> None:
    config = _init(tmp_path)
    _edit(config, old, new)
    line = _refused(config, key)
    for known in ("HPAYMT", "TREAT", "HOPERAT", "PUBHLTH", "HRESCH"):
        assert known in line, line


def test_a_misspelt_link_profile_is_refused_naming_the_key_and_the_installed_ones(
        tmp_path: Path) -> None:
    config = _init(tmp_path)
    # A store made with the configuration as written: bridge status then reports on it.
    assert bridge("store", "migrate", "--config", str(config)).returncode == 0
    assert bridge("status", "--config", str(config)).returncode == 0
    _edit(config, 'profile = "commercial-insurance"', 'profile = "commercial-insurence"')
    line = _refused(config, "links[0].profile", "commercial-insurence")
    installed = sorted(p.stem for p in (mappings_dir() / "links").glob("*.yaml"))
    assert "commercial-insurance" in installed
    for name in installed:
        assert name in line, line
    status = bridge("status", "--config", str(config))
    assert status.returncode == 2, (status.stdout, status.stderr)
    assert "links[0].profile" in status.stderr and str(config) in status.stderr


def test_a_profile_level_the_profile_lacks_is_refused(tmp_path: Path) -> None:
    config = _init(tmp_path, "hospital", "--partners", "platform")
    _edit(config, '"regional-interoperability:authorise"', '"regional-interoperability:authorize"')
    line = _refused(config, "links[0].profile")
    assert "authorize" in line, line
    # A profile file of the operator's own that is not there.
    _edit(config, '"regional-interoperability:authorize"', '"narrow.yaml"')
    _refused(config, "links[0].profile", str(tmp_path / "narrow.yaml"))
