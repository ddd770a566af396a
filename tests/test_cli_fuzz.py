"""Careless and hostile command lines, generated: every subcommand the parser knows (new
ones included, as they are registered), with options and arguments drawn from words,
numbers, missing paths, folders, and files of random content; the valid configuration
and record files are among the choices so that commands get past their first check.

Whatever the input, the command line never shows a traceback, never falls through to
its ``internal`` error, and a failure is one line naming what is wrong with exit status
1 or 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import make_workdir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import build_parser, main
from bridge.samples import inpatient_records

# Commands that would run until stopped, or for minutes, when given valid input; the
# fuzz gives them only input that must be refused (they are run whole elsewhere).
LONG_RUNNING = {("serve",), ("demo",)}


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            # A command that also runs without a subcommand is fuzzed that way too.
            if path and parser.get_default("func") is not None:
                found.append((path, parser))
            for name, sub in action.choices.items():
                found.extend(_leaves(sub, (*path, name)))
            return found
    return [(path, parser)]


COMMANDS = _leaves(build_parser())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    hospital_cfg, insurer_cfg = make_workdir(root)
    record = root / "record.json"
    record.write_text(json.dumps(inpatient_records(1, seed=3)[0], ensure_ascii=False), "utf-8")
    (root / "folder").mkdir()
    return {
        "config": hospital_cfg,
        "insurer": insurer_cfg,
        "record": record,
        "folder": root / "folder",
        "missing": root / "does-not-exist.json",
        "root": root,
    }


CONTENTS = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    st.sampled_from(
        [
            b"{}",
            b"[]",
            b"null",
            b'{"resourceType": "Consent"}',
            b'{"dataset": "WS445.10", "elements": {}}',
            b'{"dataset": "WS445.10", "elements": {"HDSD00.11.999": "x"}}',
            b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r",
            b"[controller]\nid = 1\n",
            (
                b'[controller]\nid = "x"\nname = "y"\n[tls]\nca = "a"\ncert = "b"\nkey = "c"\n'
                b'[signing]\ncert = "d"\nkey = "e"\n[server]\nport = "https"\n'
            ),
            b"\xff\xfe\x00bad",
        ]
    ),
)


@st.composite
def command_lines(draw: st.DrawFn, files: dict[str, Path]) -> list[str]:
    path, parser = draw(st.sampled_from(COMMANDS))
    counter = draw(st.integers(min_value=0, max_value=10**9))

    def value() -> str:
        kind = draw(
            st.sampled_from(
                ["word", "number", "config", "record", "folder", "missing", "file", "insurer"]
            )
        )
        if kind == "word":
            return draw(st.text(min_size=0, max_size=20).filter(lambda t: "\x00" not in t))
        if kind == "number":
            return str(draw(st.integers(min_value=-(10**6), max_value=10**6)))
        if kind == "file":
            target = files["root"] / f"fuzz-{counter}-{draw(st.integers(0, 10**6))}.json"
            target.write_bytes(draw(CONTENTS))
            return str(target)
        return str(files[kind])

    argv = list(path)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        include = action.required or draw(st.booleans())
        if not include:
            continue
        if not action.option_strings:  # positional
            argv.append(value())
            continue
        option = action.option_strings[-1]
        if action.nargs == 0:
            argv.append(option)
        elif action.choices is not None and draw(st.booleans()):
            argv += [option, str(draw(st.sampled_from(list(action.choices))))]
        else:
            argv += [option, value()]
    if tuple(path) in LONG_RUNNING:
        # Valid input would start a bridge or a demo: make sure something is refused.
        argv += draw(
            st.sampled_from(
                [
                    ["--config", str(files["folder"])],
                    ["--claims", "-1"],
                    ["--workdir", str(files["record"])],
                    ["--no-such-option"],
                ]
            )
        )
        if path == ("serve",):
            argv = [a for a in argv if a not in (str(files["config"]), str(files["insurer"]))]
            if "--config" not in argv or argv[-1] == "--config":
                argv += ["--config", str(files["folder"])]
    if draw(st.booleans()) and draw(st.booleans()):
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--json", "-x", "--"])))
    return argv


def _run(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # Relative paths the fuzz draws (a PKI folder, a report file) land in a scratch
    # folder, never in the checkout the tests run from.
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _check(argv: list[str], status: int, stdout: str, stderr: str) -> None:
    shown = f"bridge {' '.join(argv)!r}: {status}\n{stderr}"
    assert "Traceback" not in stderr + stdout, shown
    assert status in (0, 1, 2), shown
    assert "error [internal]" not in stderr, shown
    if "error [" in stderr:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error ["), shown
        assert status in (1, 2), shown


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_command_line_gives_a_traceback(files: dict[str, Path], data: st.DataObject) -> None:
    argv = data.draw(command_lines(files))
    scratch = files["root"] / "cwd"
    scratch.mkdir(exist_ok=True)
    status, stdout, stderr = _run(argv, scratch)
    _check(argv, status, stdout, stderr)


def test_every_subcommand_is_fuzzed() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    # The fuzz reaches every command registered, including the ones added later.
    assert {"init", "demo", "serve", "push", "consent add", "status", "outbox"}.union(
        {"outbox list", "outbox requeue"}) <= names


@pytest.mark.parametrize(
    "make_argv",
    [
        lambda f: ["consent", "add", "--config", str(f["config"]), str(f["folder"])],
        lambda f: ["demo", "--claims", "-5"],
        lambda f: ["status", "--config", str(f["record"])],
        lambda f: ["map", "--from", "hl7v2", str(f["config"])],
        lambda f: ["push", "--config", str(f["config"]), "--link", "nope", str(f["record"])],
        lambda f: ["init", "hospital", str(f["record"])],
        lambda f: ["serve", "--config", str(f["missing"])],
    ],
)
def test_a_few_as_a_user_runs_them(files: dict[str, Path], make_argv) -> None:  # type: ignore[no-untyped-def]
    argv = make_argv(files)
    run = subprocess.run(
        [sys.executable, "-m", "bridge", *argv],
        cwd=files["root"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _check(argv, run.returncode, run.stdout, run.stderr)
    assert run.returncode in (1, 2)
    assert run.stderr.startswith("error [")
