"""Every place the bridge states its exchange protocol version states the one it speaks:
the version of ``conformance/PROTOCOL.md``, which the conformance kit checks.

``bridge --version``, the CapabilityStatement a serving bridge answers at
``GET [base]/metadata``, the ``bridge_build_info`` metric of its operations port, and
the README, all read from outside the running bridge.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from e2e_support import client_ssl
from ops_support import bridge, http, make_site, serve

from bridge.resources import conformance_dir

REPO = Path(__file__).resolve().parent.parent


def _spoken() -> str:
    heading = (conformance_dir() / "PROTOCOL.md").read_text(encoding="utf-8").splitlines()[0]
    found = re.fullmatch(r"# ws-fhir-bridge exchange protocol, version (\d+\.\d+)", heading)
    assert found, heading
    return found.group(1)


def test_the_version_command_states_the_protocol_version_spoken() -> None:
    run = bridge("--version")
    assert run.returncode == 0, run.stderr
    found = re.search(r"protocol version ([0-9.]+)\)", run.stdout)
    assert found, run.stdout
    assert found.group(1) == _spoken(), run.stdout


def test_a_serving_bridge_states_the_same_version_on_the_wire_and_in_its_metrics(
        tmp_path: Path) -> None:
    site = make_site(tmp_path)
    served = serve(site.hospital)
    try:
        port = site.ports["hospital"]
        request = urllib.request.Request(f"https://127.0.0.1:{port}/fhir/metadata",
                                          headers={"Accept": "application/fhir+json"})
        with urllib.request.urlopen(request, timeout=15,
                                    context=client_ssl(site.root, "insurer-b")) as resp:
            capability = json.loads(resp.read())
        stated = [e["valueString"] for e in capability.get("extension", [])
                  if e.get("url") == "urn:ws-fhir-bridge:ext:protocol-version"]
        status, metrics = http(site.ops("hospital") + "/metrics")
    finally:
        served.stop()
    assert stated == [_spoken()], capability.get("extension")
    assert status == 200
    info = re.search(r'^bridge_build_info\{[^}]*protocol_version="([^"]+)"', metrics, re.MULTILINE)
    assert info and info.group(1) == _spoken(), metrics[:2000]


def test_the_readme_states_the_protocol_version_spoken() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"protocol, version (\d+\.\d+)|PROTOCOL\.md \(normative, v(\d+\.\d+)\)",
                        readme)
    assert len(stated) == 2, stated
    assert {a or b for a, b in stated} == {_spoken()}
