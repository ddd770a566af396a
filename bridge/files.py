"""Files the bridge reads and writes where an operator names them.

:func:`read_bounded` reads a file the operator named, refusing a device, a pipe or a
file far larger than what the command reads.

:func:`write_private` writes one file readable by its owner only, and
:func:`private_folder` makes the folder such files go into. What held the name before
(a file with a looser mode, or a symbolic link someone else planted in a shared
folder) is replaced, never written through.

:func:`load_or_make_key` reads a secret key kept as hex in a file, making it on first use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

from bridge.errors import ConfigError, UsageError


def read_bounded(file: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. Raises ``OSError`` as
    opening and reading do, and :class:`UsageError` for anything else (a device, a
    pipe, a file over the limit), naming the file."""
    # Non-blocking open: a named pipe with no writer would otherwise hang the command
    # before it could be told apart from a file (regular files ignore the flag).
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError("not a regular file", location=str(file))
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"larger than {limit // (1024 * 1024)} MiB; not read",
                         location=str(file))
    return data


def private_folder(path: Path) -> Path:
    """Make ``path`` (and its parents) if missing; a new folder is the owner's only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create_private(path: Path) -> Path:
    """Create ``path`` empty with mode 600, refusing a name already taken
    (:class:`FileExistsError`), for a tool that writes into it afterwards (SQLite, whose
    write-ahead log and shared memory files take the mode of the database file;
    ``pg_dump --file``)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
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


def load_or_make_key(path: Path, *, what: str = "key") -> bytes:
    """The 32-byte key kept as hex in ``path``; a missing file is made (mode 600) with a
    new random key. Two processes making it at once agree: the second reads the first's.

    The new key is written whole under a temporary name and linked into place, so no
    process ever reads a key file another is still writing; a file that does not hold a
    32-byte key is refused, never used (an empty key would pseudonymise under a key
    anyone has)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".bridge-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp creates the file with mode 600
                fh.write(key.hex())
            os.link(temp, path)  # fails if another process made it first
        except FileExistsError:
            return load_or_make_key(path, what=what)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return key
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} file is not hex", location=str(path)) from None
    if len(key) != 32:
        raise ConfigError(f"{what} file does not hold a 32-byte key (64 hex digits)",
                          location=str(path))
    return key


__all__ = ["create_private", "load_or_make_key", "private_folder", "read_bounded", "write_private"]
