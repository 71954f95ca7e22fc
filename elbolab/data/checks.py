"""The checks of data handed to a public entry point, and of data against a site's support.

:func:`as_points` is the one gate that ``log_likelihood``, ``importance_estimate``, the
diagnostics and the latent-space tools pass their ``x`` through: it turns a tensor, a NumPy array
or anything else :func:`numpy.asarray` reads as numbers into a tensor of points ``[N, ...]``, and
refuses, naming the input, what would otherwise fail deep inside a network or give a silent NaN.
:func:`check_rows_in_support` refuses observed data outside the support of the site that observes
it (a 0.5 fed to a Bernoulli likelihood), naming the rows.
"""

from __future__ import annotations

__all__ = ["as_points", "check_rows_in_support", "describe_support"]

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import constraints

from elbolab.errors import InputError

SHOWN_ROWS = 5
# numpy kinds that are numbers torch can hold: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"
SUPPORT_NAMES = {
    id(constraints.boolean): "binary values {0, 1}",
    id(constraints.nonnegative_integer): "non-negative integers",
    id(constraints.positive_integer): "positive integers",
    id(constraints.unit_interval): "the unit interval [0, 1]",
    id(constraints.real): "real numbers",
    id(constraints.positive): "positive numbers",
    id(constraints.nonnegative): "non-negative numbers",
    id(constraints.simplex): "the probability simplex (non-negative, summing to 1)",
    id(constraints.one_hot): "one-hot vectors",
}


def as_points(x: Any, what: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    """``x`` as a tensor of data points ``[N, ...]`` with N >= 1 and finite values, or an :class:`InputError`.

    Floating data keep their dtype unless ``dtype`` is given; integer and boolean data (counts,
    binary pixels) become ``dtype`` or :func:`torch.get_default_dtype`, so that they feed a float
    network. A clean floating input costs one extra reduction (the sum is finite); only when it is
    not are the bad rows located. The result may share memory with ``x`` when nothing is converted.

    Arguments:
        x: a tensor, a NumPy array, or anything :func:`numpy.asarray` reads as an array of numbers.
        what: the input's name in messages, e.g. ``"x"`` or ``"log_likelihood: x"``.
        dtype: a floating dtype to cast to.
        device: a device to move to.

    Returns:
        A tensor of shape ``[N, ...]`` (two or more dimensions), on ``device`` when given.

    Example:
        >>> as_points(np.ones((3, 4), dtype=np.uint8), "x").dtype
        torch.float32
        >>> as_points(torch.ones(4), "x")
        Traceback (most recent call last):
        elbolab.errors.InputError: x must be a batch of points of shape [N, D]; got shape (4,) (a single point needs shape [1, D], e.g. x[None])
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"as_points: dtype must be a floating dtype, got {dtype}")
    points, integral = (x, not x.is_floating_point()) if isinstance(x, Tensor) else _from_array(x, what)
    if points.is_complex():
        raise InputError(f"{what} must be real numbers, got a complex tensor ({points.dtype})")
    if points.dim() < 2:
        raise InputError(
            f"{what} must be a batch of points of shape [N, D]; got shape {tuple(points.shape)} "
            "(a single point needs shape [1, D], e.g. x[None])"
        )
    if points.numel() == 0:
        empty = "no points" if points.shape[0] == 0 else "points with no values"
        raise InputError(f"{what} has shape {tuple(points.shape)}: {empty}")
    target = dtype if dtype is not None or not integral else torch.get_default_dtype()
    converted = target is not None and target != points.dtype
    points = points.to(device=device, dtype=target)
    if points.is_floating_point() and not bool(torch.isfinite(points.sum())):
        # The sum also overflows on large finite values: only the per-row check decides.
        bad = (~torch.isfinite(points).reshape(points.shape[0], -1).all(dim=1)).nonzero().flatten()
        if bad.numel():
            after = f" (after conversion to {points.dtype})" if converted else ""
            raise InputError(f"{what} has NaN or infinite values{after} in {_rows(bad)}")
    return points


def check_rows_in_support(values: Tensor, support: constraints.Constraint, what: str, site: str) -> None:
    """Refuse ``values`` with rows outside ``support``, the support of the sample site ``site``.

    A row is a data point: ``values`` is ``[N, ...]`` with the data dimension first (move it there
    before calling). A row is refused when any of its values is outside the support, e.g. a 0.5
    in data observed by a Bernoulli likelihood.

    Arguments:
        values: the observed data, ``[N, ...]``.
        support: the site's support, ``site["fn"].support``.
        what: the input's name in messages, e.g. ``"x"``.
        site: the name of the sample site that observes ``values``.

    Returns:
        Nothing; raises :class:`InputError` naming ``what``, ``site``, the support, the first
        offending value and up to five offending rows.

    Example:
        >>> check_rows_in_support(torch.tensor([[0.0, 1.0], [0.5, 1.0]]), constraints.boolean, "x", "x")
        Traceback (most recent call last):
        elbolab.errors.InputError: x has values outside the support of site 'x', binary values {0, 1}, in 1 row (row 1); the first is 0.5
    """
    if values.dim() == 0:
        raise ValueError("check_rows_in_support: values must be [N, ...], got a scalar")
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    elementwise = base.event_dim == 0
    inside = (base if elementwise else support).check(values)
    inside_rows = inside.reshape(values.shape[0], -1).all(dim=1)
    if bool(inside_rows.all()):
        return
    bad = (~inside_rows).nonzero().flatten()
    first = f"; the first is {values[~inside][0].item():.6g}" if elementwise else ""
    raise InputError(
        f"{what} has values outside the support of site {site!r}, {describe_support(support)}, in {_rows(bad)}{first}"
    )


def describe_support(support: constraints.Constraint) -> str:
    """A support in words, e.g. ``"binary values {0, 1}"``; ``str(support)`` for one without a name.

    Independent (event) wrappers are looked through: a Bernoulli row's support is binary values.
    """
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return SUPPORT_NAMES.get(id(support), str(support))


def _from_array(x: Any, what: str) -> tuple[Tensor, bool]:
    """``x`` as a tensor, and whether it holds integers or booleans."""
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:  # ragged nested lists, objects numpy cannot read
        raise InputError(f"{what} must be an array of numbers; could not read the {type(x).__name__}: {error}") from None
    if array.dtype.kind not in NUMERIC_KINDS:
        raise InputError(
            f"{what} must be an array of numbers; got {type(x).__name__} with dtype {array.dtype} "
            f"({'complex numbers' if array.dtype.kind == 'c' else 'not numeric'})"
        )
    integral = array.dtype.kind != "f"
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch has little arithmetic on uint16/32/64
        array = array.astype(np.float64)
    elif not array.flags.writeable:  # torch.as_tensor warns on a read-only array
        array = array.copy()
    return torch.as_tensor(array), integral


def _rows(rows: Tensor) -> str:
    shown = ", ".join(str(i) for i in rows[:SHOWN_ROWS].tolist())
    more = ", ..." if rows.numel() > SHOWN_ROWS else ""
    plural = "s" if rows.numel() > 1 else ""
    return f"{rows.numel()} row{plural} (row{plural} {shown}{more})"
