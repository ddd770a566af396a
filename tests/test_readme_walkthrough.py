"""The README's walk-through, run as written: each ``$ bridge ...`` line as a subprocess
in a fresh folder, its output compared with what the README shows.

The only liberty taken is the ports: the README's fixed ports become free ones (the
``init`` commands get ``--port``/``--ops-port``, and the expected output is read with
the ports substituted), so the test does not collide with anything on the machine.
A command ending in ``&`` is started in the background and its first line compared.
A command whose output depends on the other side catching up (the insurer's view of
the claim) is run again, as a person would, until it shows what the README shows or
30 seconds pass.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.demo import free_port

README = Path(__file__).resolve().parent.parent / "README.md"

# README port -> role, for substitution.
PORTS = {8444: "insurer", 9465: "insurer-ops", 8443: "hospital", 9464: "hospital-ops"}


def _blocks(marker: str) -> list[tuple[str, list[str]]]:
    """The ``$ command`` lines of the console block after ``marker``, each with its output."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- walkthrough:{marker} -->")
    block = text[start:].split("```console\n", 1)[1].split("```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line.rstrip())
    return steps


def _substitute(text: str, ports: dict[str, int]) -> str:
    for readme_port, role in PORTS.items():
        text = re.sub(rf"\b{readme_port}\b", str(ports[role]), text)
    return text


def _argv(command: str, ports: dict[str, int]) -> list[str]:
    words = shlex.split(command.removesuffix("&").strip())
    assert words[0] == "bridge", command
    if words[1] == "init":
        role = words[2]
        words += ["--port", str(ports[role]), "--ops-port", str(ports[f"{role}-ops"])]
    return [sys.executable, "-m", "bridge", *words[1:]]


def _matches(expected: list[str], actual: str) -> bool:
    got = [line.rstrip() for line in actual.splitlines()]
    return got == expected


@pytest.mark.battery  # about 20 s: seven subprocesses, two of them bridges
def test_the_readme_walks_a_newcomer_to_an_exchange(tmp_path: Path) -> None:
    ports = {role: free_port() for role in PORTS.values()}
    steps = _blocks("init") + _blocks("exchange")
    assert [c.split()[1] for c, _ in steps] == [
        "init", "init", "serve", "serve", "consent", "push", "status"
    ]
    background: list[subprocess.Popen[str]] = []
    try:
        for command, shown in steps:
            expected = [_substitute(line, ports) for line in shown]
            argv = _argv(command, ports)
            if command.endswith("&"):
                proc = subprocess.Popen(
                    argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True,
                )
                background.append(proc)
                assert proc.stdout is not None
                first = proc.stdout.readline().rstrip()
                assert [first] == expected, command
                continue
            deadline = time.monotonic() + 30
            while True:
                run = subprocess.run(
                    argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
                )
                if _matches(expected, run.stdout) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert run.returncode == 0, f"{command}: {run.stderr}"
            assert run.stdout.splitlines() == expected, command
    finally:
        for proc in background:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
