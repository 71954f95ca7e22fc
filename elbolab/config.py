"""Filling configuration dataclasses from plain dicts (TOML tables, JSON objects, CLI flags).

Every config is a ``@dataclass`` validated in ``__post_init__``; this is the one place that turns
a dict into one, refusing keys the dataclass does not have.
"""

from __future__ import annotations

__all__ = ["dataclass_from_dict", "is_integer", "is_real"]

import math
from dataclasses import fields
from typing import Any, TypeVar

from elbolab.errors import InputError, closest_names

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: Any, source: str) -> T:
    """``cls(**values)``, with an :class:`InputError` naming ``source`` for a non-table or an unknown key."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a table of options, got {type(values).__name__}")
    annotations = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
    for key, value in values.items():
        if key not in annotations:
            raise InputError(f"{source}: unknown key {key!r}; {closest_names(key, annotations)}")
        # Text options (names, paths, devices) are checked here; numbers by each class's __post_init__.
        if annotations[key] in ("str", "str | None") and not (
            isinstance(value, str) or (value is None and annotations[key] == "str | None")
        ):
            raise InputError(f"{source}: {key} must be a string, got {value!r}")
    try:
        return cls(**values)
    except InputError:
        raise
    except (TypeError, ValueError, OverflowError) as error:  # a value of the wrong type for a check
        raise InputError(f"{source}: {error}") from None


def is_integer(value: Any) -> bool:
    """An int, or a float with an integral value (TOML and JSON may give 3.0); never a bool, NaN or infinity."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def is_real(value: Any) -> bool:
    """A finite int or float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)
