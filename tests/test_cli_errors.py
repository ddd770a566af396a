"""Careless inputs at the command line: one line naming what is wrong and where, never a
traceback; exit status 2 for usage and configuration errors, 1 for runtime failures."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import make_workdir

from bridge.cli import main


def _bridge(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _serve_error(stderr: str) -> str:
    """``bridge serve`` writes its log to stderr: the failure is the one line after it."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error [")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


@pytest.fixture
def configs(tmp_path: Path) -> tuple[Path, Path]:
    return make_workdir(tmp_path)


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_serve_on_an_http_port_already_in_use_names_the_key(configs: tuple[Path, Path]) -> None:
    hospital_cfg, _ = configs
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        text = hospital_cfg.read_text(encoding="utf-8")
        hospital_cfg.write_text(
            text.replace("[server]\nhost = \"127.0.0.1\"\nport = ", f"[server]\nport = {port}\n#"),
            encoding="utf-8",
        )
        run = _bridge("serve", "--config", str(hospital_cfg))
    line = _serve_error(run.stderr)
    assert run.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in line
    assert f"{hospital_cfg}: server.port" in line


def test_serve_on_an_mllp_port_already_in_use_names_the_key(configs: tuple[Path, Path]) -> None:
    hospital_cfg, _ = configs
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        with hospital_cfg.open("a", encoding="utf-8") as fh:
            fh.write(f"\n[mllp]\nport = {port}\n")
        run = _bridge("serve", "--config", str(hospital_cfg))
    line = _serve_error(run.stderr)
    assert run.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in line and "mllp.port" in line


def test_a_port_given_as_a_word_is_a_configuration_error(
    configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    text = hospital_cfg.read_text(encoding="utf-8")
    hospital_cfg.write_text(
        text.replace('[server]\nhost = "127.0.0.1"\nport = ', '[server]\nport = "https"\n#'),
        encoding="utf-8",
    )
    assert main(["serve", "--config", str(hospital_cfg)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "server.port" in line and "integer" in line


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_consent_add_with_a_missing_file_or_a_directory(
    configs: tuple[Path, Path], tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, _ = configs
    target = tmp_path / "nothing.json" if which == "missing" else tmp_path
    assert main(["consent", "add", "--config", str(hospital_cfg), str(target)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(target) in line
    assert ("no such file" if which == "missing" else "is a folder") in line


def test_certs_init_twice_says_which_flag_replaces_the_ca(tmp_path: Path) -> None:
    first = _bridge("certs", "init", str(tmp_path / "pki"))
    assert first.returncode == 0, first.stderr
    # What was written, for a person: no Python representation of objects.
    assert "DevPKI(" not in first.stdout and "PosixPath" not in first.stdout
    assert "ca.pem" in first.stdout and "hospital-a/tls.pem" in first.stdout
    again = _bridge("certs", "init", str(tmp_path / "pki"))
    line = _one_line(again.stderr)
    assert again.returncode == 2
    assert "--force" in line and "force=True" not in line
    assert str(tmp_path / "pki" / "ca.pem") in line


def test_certs_init_onto_an_existing_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    run = _bridge("certs", "init", str(afile))
    line = _one_line(run.stderr)
    assert run.returncode == 2
    assert "not a folder" in line and str(afile) in line


@pytest.mark.parametrize("claims", ["-5", "many"])
def test_demo_with_a_bad_claim_count(claims: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--claims", claims, "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--claims" in line


def test_demo_workdir_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    assert main(["demo", "--claims", "1", "--quiet", "--workdir", str(afile)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "not a folder" in line and str(afile) in line and "--workdir" in line


def _pg_config(configs: tuple[Path, Path], dsn: str) -> Path:
    hospital_cfg, _ = configs
    text = hospital_cfg.read_text(encoding="utf-8")
    text = text.replace(
        'path = "hospital-a/bridge.sqlite"', f'kind = "postgresql"\ndsn = "{dsn}"'
    )
    hospital_cfg.write_text(text, encoding="utf-8")
    return hospital_cfg


@pytest.mark.parametrize(
    ("dsn", "status", "reason"),
    [
        # Nobody listens on port 1: the server is down or the address is wrong.
        ("host=127.0.0.1 port=1 dbname=test connect_timeout=3", 1, "connection refused"),
        # The server answers, but there is no such database.
        ("host=127.0.0.1 port=5432 dbname=no_such_db_here", 1, "no_such_db_here"),
        # Not a connection string libpq can read: a configuration mistake.
        ("host=127.0.0.1 bogus_option=1", 2, "bogus_option"),
    ],
)
def test_a_wrong_postgresql_dsn_says_why(
    configs: tuple[Path, Path],
    dsn: str,
    status: int,
    reason: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _pg_config(configs, dsn)
    assert main(["consent", "list", "--config", str(cfg)]) == status
    line = _one_line(capsys.readouterr().err)
    assert reason in line.lower()
    assert "store.dsn" in line and str(cfg) in line
    assert line.strip() != "OperationalError"


def test_usage_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--config" in line and "bridge status" in line
    assert main(["no-such-command"]) == 2
    assert "no-such-command" in _one_line(capsys.readouterr().err)
    assert main([]) == 2
    _one_line(capsys.readouterr().err)


def test_every_option_has_help_text() -> None:
    import argparse

    from bridge.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "bridge")
    assert missing == []


def test_version_names_package_fhir_and_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert version("ws-fhir-bridge") in out
    assert "FHIR 4.0.1" in out and "protocol" in out


def test_store_status_and_migrate(configs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bridge.ledger.migrations import MIGRATIONS

    hospital_cfg, _ = configs
    assert main(["store", "status", "--config", str(hospital_cfg)]) == 2
    assert "no store at this path yet" in _one_line(capsys.readouterr().err)
    assert main(["store", "migrate", "--config", str(hospital_cfg)]) == 0
    assert "(up to date)" in capsys.readouterr().out
    assert main(["store", "status", "--config", str(hospital_cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["applied"] == [m.name for m in MIGRATIONS] and report["up_to_date"]


@pytest.mark.parametrize("command", [["outbox"], ["audit", "verify"]])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_store_path_is_a_usage_error(
    command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--store", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--store" in err and "internal" not in err
