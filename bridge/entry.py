"""The ``bridge`` command's entry point.

The command line is imported here, inside the same boundary as the command itself:
Ctrl-C while Python is still loading the bridge ends the command quietly with status
130, as it does once the command runs (:func:`bridge.cli.main`), never with a
traceback.
"""

from __future__ import annotations

import sys


def run() -> None:
    """Run ``bridge`` with the process's arguments and exit with its status."""
    try:
        from bridge.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(main())


__all__ = ["run"]
