"""Locate the data files that ship with the bridge (``mappings/``, ``conformance/``).

In a wheel they live under ``bridge/_data``; in a source checkout (editable install)
they are the top-level folders of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the folder ``mappings`` or ``conformance`` for this installation."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"data folder {name!r} is not installed with the bridge")


def mappings_dir() -> Path:
    return data_dir("mappings")


def conformance_dir() -> Path:
    return data_dir("conformance")
