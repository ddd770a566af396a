"""Files holding health data that the bridge writes where an operator asks it to.

:func:`write_private` writes one file readable by its owner only, and
:func:`private_folder` makes the folder such files go into. What held the name before
(a file with a looser mode, or a symbolic link someone else planted in a shared
folder) is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def private_folder(path: Path) -> Path:
    """Make ``path`` (and its parents) if missing; a new folder is the owner's only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` as ``path`` with mode 600: to a new file beside it, renamed over
    the name, so no half-written file is ever left under it."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".bridge-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file with mode 600
            fh.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


__all__ = ["private_folder", "write_private"]
