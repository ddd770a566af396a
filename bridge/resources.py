"""Locate the data files that ship with the bridge (``mappings/``, ``conformance/``).

In a wheel they live under ``bridge/_data``; in a source checkout (editable install)
they are the top-level folders of the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def installed_link_profiles() -> list[str]:
    """The names of the link profiles that ship with the bridge (``mappings/links``)."""
    return sorted(p.stem for p in (mappings_dir() / "links").glob("*.yaml"))


# --- site overlays -----------------------------------------------------------------------------

#: Files of ``mappings/`` a site directory may overlay: (folder, file name pattern).
OVERLAYABLE: tuple[tuple[str, str], ...] = (
    ("valuesets", "*.yaml"),
    ("hl7v2/valuesets", "*.yaml"),
    ("hl7v2/messages", "*.yaml"),
    ("hl7v2/visits", "*.yaml"),
    ("hl7v2", "facilities.yaml"),
)


@dataclass(frozen=True)
class Overlay:
    """One file of a site directory and what it does to the shipped set."""

    relative: str  # path under mappings/, e.g. ``hl7v2/valuesets/his-charge-item.yaml``
    path: Path  # the site's file
    action: str  # ``overrides`` (a shipped file of that name exists) or ``adds``


@dataclass(frozen=True)
class MappingFiles:
    """The mapping files in effect: the shipped ``mappings/`` with a site's overlay on top.

    A site directory mirrors the layout of ``mappings/``; each of its files replaces the
    shipped file at the same relative path, or adds one, file by file. Only the files in
    :data:`OVERLAYABLE` may be overlaid; the installed package is never edited. Loaders
    take a ``MappingFiles`` and cache per instance, so one process can hold the shipped
    set and a site's set side by side.
    """

    site: Path | None = None

    @property
    def shipped(self) -> Path:
        return mappings_dir()

    def file(self, relative: str) -> Path:
        """The site's file when it has one, else the shipped one."""
        if self.site is not None:
            own = self.site / relative
            if own.is_file():
                return own
        return self.shipped / relative

    def folder(self, relative: str, pattern: str = "*.yaml") -> list[Path]:
        """Files of one folder, by name: the site's replace the shipped ones of that name."""
        found = {p.name: p for p in sorted((self.shipped / relative).glob(pattern))}
        if self.site is not None:
            found.update({p.name: p for p in sorted((self.site / relative).glob(pattern))
                          if p.is_file()})
        return [found[name] for name in sorted(found)]

    def overlays(self) -> list[Overlay]:
        """Every file of the site directory and whether it overrides or adds.

        Raises :class:`~bridge.errors.ConfigError` naming a file the site may not overlay
        (a catalog, a WS 445 mapping, a link profile, a misspelt folder), or anything but a
        regular file where an overlay file belongs (a folder named ``his-charge-item.yaml``,
        a dangling link). Hidden files and ``*.md`` notes are ignored.
        """
        from bridge.errors import ConfigError

        if self.site is None:
            return []
        if not self.site.is_dir():
            raise ConfigError("site directory does not exist", location=str(self.site))
        out: list[Overlay] = []
        for path in _everything_under(self.site):
            relative = path.relative_to(self.site).as_posix()
            if any(part.startswith(".") for part in relative.split("/")) \
                    or relative.endswith(".md"):
                continue
            folder, _, name = relative.rpartition("/")
            overlayable = any(folder == f and Path(name).match(pattern)
                              for f, pattern in OVERLAYABLE)
            if path.is_dir() and not overlayable:
                continue  # a folder: its files are checked one by one
            if overlayable and not path.is_file():
                # A folder, a dangling link or a device where an overlay file belongs
                # would be passed over by the loaders, and the shipped file used unsaid.
                raise ConfigError("not a regular file: an overlay must be a YAML file",
                                  location=str(path))
            if not overlayable:
                raise ConfigError(
                    "not a file a site may overlay (value sets, identifier type codes, HL7 "
                    "message mappings, visit assembly, charge items, facilities)",
                    location=str(path))
            action = "overrides" if (self.shipped / relative).is_file() else "adds"
            out.append(Overlay(relative, path, action))
        return out


def _everything_under(root: Path) -> list[Path]:
    """Every path below ``root``, sorted, through linked folders too (the loaders follow
    them, so the check must; ``Path.rglob`` does not), each real folder once (a link
    back up does not loop)."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found.extend(Path(folder) / name for name in [*dirs, *files])
    return sorted(found)


SHIPPED = MappingFiles()
