"""Option values an operator can mistype: a validity of millions of days, an address that
is no IP address, a DNS name with spaces. Each is a usage error naming the option (exit
status 2), and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from ops_support import bridge


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki") / "pki"
    made = bridge("certs", "init", str(folder), "--controllers", "insurer-b", cwd=folder.parent)
    assert made.returncode == 0, made.stderr
    return folder


@pytest.mark.parametrize(("args", "option"), [
    (("issue", "{pki}", "clinic-y", "--days", "99999999"), "--days"),
    (("issue", "{pki}", "clinic-y", "--ip", "999.1.1.1"), "--ip"),
    (("issue", "{pki}", "clinic-y", "--dns", "bad name!"), "--dns"),
    (("issue", "{pki}", "clinic-y", "--dns", "a..b"), "--dns"),
    (("rotate", "{pki}", "insurer-b", "tls", "--days", "99999999"), "--days"),
    (("rotate", "{pki}", "insurer-b", "tls", "--ip", "1.2.3"), "--ip"),
    (("revoke", "{pki}", "{pki}/insurer-b/tls.pem", "--crl-days", "99999999"), "--crl-days"),
    (("crl", "{pki}", "--crl-days", "99999999"), "--crl-days"),
])
def test_a_certificate_option_out_of_range_is_a_usage_error(
    pki: Path, args: tuple[str, ...], option: str
) -> None:
    before = sorted(p.name for p in pki.rglob("*"))
    run = bridge("certs", *(a.format(pki=pki) for a in args), cwd=pki.parent)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"error [usage]: argument {option}: "), run.stderr
    assert "internal" not in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in pki.rglob("*")) == before


def test_certificate_names_and_addresses_that_are_well_formed_are_issued(pki: Path) -> None:
    run = bridge("certs", "issue", str(pki), "clinic-z", "--dns", "*.clinic.example",
                 "--dns", "bridge-1.clinic.example", "--ip", "::1", "--ip", "10.0.0.5",
                 "--days", "36500", cwd=pki.parent)
    assert run.returncode == 0, run.stderr
    assert (pki / "clinic-z" / "tls.pem").is_file()


@pytest.mark.parametrize("days", ["99999999", "-4"])
def test_an_operator_certificate_validity_out_of_range_is_a_usage_error(
    tmp_path: Path, days: str
) -> None:
    run = bridge("operators", "issue", "--config", "bridge.toml", "ana", "--role", "viewer",
                 "--days", days, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error [usage]: argument --days: "), run.stderr
