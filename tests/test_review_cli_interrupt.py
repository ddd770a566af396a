"""Ctrl-C at any moment of a ``bridge`` command ends it with status 130 and no traceback,
including while Python is still loading the bridge's modules (the first few hundred
milliseconds of every command, when a person who typed the wrong thing presses it).

The interrupt is made to arrive exactly while the command line is being imported, by
an import hook in the child process, so the test does not depend on timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HOOK = """
import builtins, signal, os, sys
# As at a terminal: a suite started in the background hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
real = builtins.__import__
def interrupting(name, *args, **kwargs):
    if name == {module!r}:
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)
builtins.__import__ = interrupting
sys.argv = ["bridge", "status", "--config", "nowhere.toml"]
{start}
"""


@pytest.mark.parametrize("module", ["orjson", "bridge.cli_common", "argparse"])
@pytest.mark.parametrize("start", ["from bridge.entry import run; run()",
                                   "import runpy; runpy.run_module('bridge', run_name='__main__')"])
def test_ctrl_c_while_the_command_loads_is_quiet(tmp_path: Path, module: str,
                                                 start: str) -> None:
    run = subprocess.run([sys.executable, "-c", HOOK.format(module=module, start=start)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr
