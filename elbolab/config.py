"""Filling configuration dataclasses from plain dicts (TOML tables, JSON objects, CLI flags).

Every config is a ``@dataclass`` validated in ``__post_init__``; this is the one place that turns
a dict into one, refusing keys the dataclass does not have.
"""

from __future__ import annotations

__all__ = ["dataclass_from_dict"]

from dataclasses import fields
from typing import Any, TypeVar

from elbolab.errors import InputError, closest_names

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: Any, source: str) -> T:
    """``cls(**values)``, with an :class:`InputError` naming ``source`` for a non-table or an unknown key."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a table of options, got {type(values).__name__}")
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in allowed:
            raise InputError(f"{source}: unknown key {key!r}; {closest_names(key, allowed)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise InputError(f"{source}: {error}") from None
