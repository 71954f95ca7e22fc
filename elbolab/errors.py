"""The one exception type a user's mistake raises.

Every error a user can cause -- a bad file, a bad shape, an unknown name, NaN in the data, an
option out of range -- is an :class:`InputError` whose message names the input and the problem.
The CLI prints it on one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "closest_names"]

import difflib
from collections.abc import Iterable


class InputError(ValueError):
    """A user's input (file, flag, option, data, config) is invalid; the message says which and why."""


def closest_names(name: str, valid: Iterable[str]) -> str:
    """A hint such as ``"did you mean 'iwae'?"`` listing the valid names, for unknown-name errors."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid names: {', '.join(valid)}"
