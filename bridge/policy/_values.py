"""Frozen dataclass instances built where many are made per disclosure."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def made(cls: type[T], /, **fields: Any) -> T:
    """``cls(**fields)`` for a frozen dataclass without ``__post_init__``, given every
    field in the order the class declares them (the order its JSON form follows): the
    fields are stored at once, where the generated constructor sets each one through
    ``object.__setattr__``."""
    if len(fields) != len(cls.__dataclass_fields__):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} needs every field")
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj
