"""YAML loading that remembers where each key was written, for errors that name file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bridge.errors import LoadError

Key = tuple[str | int, ...]


class LocatedYAML:
    """A parsed YAML document plus the 1-based line of every mapping key and list item."""

    def __init__(self, path: Path, data: Any, lines: dict[Key, int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    def where(self, key: Key) -> str:
        """``file:line key`` for the nearest known position of ``key``."""
        probe = key
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe, 1)
        dotted = ".".join(str(k) for k in key) or "(document)"
        return f"{self.path}:{line} {dotted}"

    def error(self, message: str, key: Key) -> LoadError:
        return LoadError(message, location=self.where(key))


def load_located(path: Path) -> LocatedYAML:
    """Parse a YAML file; a syntax error becomes a LoadError naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LoadError("cannot read file", location=str(path)) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise LoadError("not valid YAML", location=f"{path}:{line}") from None
    lines: dict[Key, int] = {}
    data = _build(node, (), lines) if node is not None else None
    return LocatedYAML(path, data, lines)


def _build(node: yaml.Node, key: Key, lines: dict[Key, int]) -> Any:
    lines.setdefault(key, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            name = yaml.SafeLoader(b"").construct_object(knode) if not isinstance(
                knode, yaml.ScalarNode
            ) else knode.value
            child = (*key, str(name))
            lines[child] = knode.start_mark.line + 1
            out[str(name)] = _build(vnode, child, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*key, i), lines) for i, item in enumerate(node.value)]
    # Scalars: resolve with the safe constructor so "1" is an int and "yes" a bool as usual.
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
