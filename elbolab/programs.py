"""The networks behind a model or guide that is not itself an ``nn.Module``.

Pyro's handlers wrap a program in a function: ``config_enumerate(model)``, ``poutine.scale(model,
0.5)``, ``functools.partial(model, beta=2)`` all return callables whose networks are out of
sight, and a trainer that asks the callable for its parameters finds none. :func:`modules_behind`
looks through the wrappers Python and Pyro build (``__wrapped__``, ``functools.partial``, bound
methods, closures) for the modules they hold, and :func:`as_module` puts them in an ``nn.Module``
that calls the wrapper: its parameters, buffers, device and training mode are then theirs, and
checkpoints hold their state.

A network the wrapper reaches some other way (a global variable read inside a plain function)
is still trained: ``fit`` also takes every leaf tensor the first step's loss depends on
(:func:`~elbolab.inference.step.collect_params`).
"""

from __future__ import annotations

__all__ = ["ProgramModule", "as_module", "is_traced", "modules_behind"]

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

MAX_DEPTH = 6


def modules_behind(program: Any) -> list[nn.Module]:
    """The ``nn.Module`` objects a callable holds, through wrappers; ``[program]`` for a module itself.

    Looked through, up to :data:`MAX_DEPTH` levels: ``__wrapped__`` (``functools.wraps`` and
    Pyro's handlers), a ``functools.partial``'s function and arguments, a bound method's object,
    and the variables a closure captures. Modules nested in a found module are not listed apart.
    """
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()
    frontier = [program]
    for _ in range(MAX_DEPTH):
        reachable = []
        for item in frontier:
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, nn.Module):
                found.setdefault(id(item), item)
                continue
            reachable += _held_by(item)
        frontier = reachable
    return list(found.values())


def _held_by(item: Any) -> list[Any]:
    held = []
    if hasattr(item, "__wrapped__"):
        held.append(item.__wrapped__)
    if isinstance(item, functools.partial):
        held += [item.func, *item.args, *item.keywords.values()]
    if hasattr(item, "__self__") and not isinstance(item.__self__, type):
        held.append(item.__self__)
    for cell in getattr(item, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return held


class ProgramModule(nn.Module):
    """An ``nn.Module`` that calls ``program`` and owns the modules behind it (see the module docstring).

    Attributes:
        program: the wrapped callable, called as it is.
        behind: the modules :func:`modules_behind` found.
    """

    def __init__(self, program: Callable[..., Any], modules: list[nn.Module]) -> None:
        super().__init__()
        self.program = program
        self.behind = nn.ModuleList(modules)
        plate = getattr(program, "data_plate", None) or next(
            (m.data_plate for m in modules if getattr(m, "data_plate", None)), None
        )
        if plate is not None:
            self.data_plate = plate

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


def as_module(program: Any) -> Any:
    """``program`` itself when it is a module or holds none; else a :class:`ProgramModule` over its modules."""
    if program is None or isinstance(program, nn.Module):
        return program
    modules = modules_behind(program)
    return ProgramModule(program, modules) if modules else program


def is_traced() -> bool:
    """Whether the program runs under ``make_fx`` (the compiled step's tracer): checks that read values on the host skip then.

    A program checks its inputs eagerly on its first run (the pair's check, the first step); a
    trace of it must not branch on tensor values, so such checks are left out of the graph.
    """
    from torch.fx.experimental.proxy_tensor import (
        get_proxy_mode,  # torch.fx internals: imported when asked
    )

    return get_proxy_mode() is not None
