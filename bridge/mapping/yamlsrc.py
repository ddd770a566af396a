"""YAML reading that remembers where every key came from.

Mapping files are data written by people; a mistake must be reported as
``file:line key``. PyYAML's safe loader drops positions, so mappings are built as
:class:`SourceMap` objects that keep the line of each key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bridge.errors import LoadError


class SourceMap(dict[str, Any]):
    """A YAML mapping that knows its file and the line of each key."""

    file: str
    line: int
    key_lines: dict[str, int]

    def where(self, key: str | None = None) -> str:
        """``file:line key`` for a key of this mapping (or the mapping itself)."""
        if key is None:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.key_lines.get(key, self.line)} {key}"


class SourceList(list[Any]):
    """A YAML sequence that knows its file and line."""

    file: str
    line: int


def _loader_for(file: str) -> type[yaml.SafeLoader]:
    class _Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> SourceMap:
        result = SourceMap()
        result.file = file
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise LoadError("mapping keys must be strings", location=f"{file}:{line}")
            if key in result:
                raise LoadError("duplicate key", location=f"{file}:{line} {key}")
            result[key] = loader.construct_object(value_node, deep=True)
            result.key_lines[key] = line
        return result

    def construct_sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> SourceList:
        result = SourceList(loader.construct_object(child, deep=True) for child in node.value)
        result.file = file
        result.line = node.start_mark.line + 1
        return result

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, construct_sequence)
    return _Loader


def load_yaml(path: Path) -> Any:
    """Load one YAML document; syntax errors become :class:`LoadError` with file and line."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"file cannot be read: {type(exc).__name__}", location=name) from None
    try:
        return yaml.load(text, Loader=_loader_for(name))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise LoadError(f"YAML syntax error: {exc.problem}", location=f"{name}:{line}") from None
    except yaml.YAMLError as exc:
        raise LoadError(f"YAML error: {type(exc).__name__}", location=name) from None
