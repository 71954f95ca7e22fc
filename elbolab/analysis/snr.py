"""The signal-to-noise ratio of an objective's gradient, per parameter, for the encoder and the decoder.

For a parameter element theta_j and independent estimates g^(1), ..., g^(M) of the objective's
gradient on the same data x (each from fresh draws of the guide),

    SNR_j = |E[g_j]| / std[g_j],   estimated as |mean_m g_j^(m)| / s_j,
    s_j^2 = (1 / (M - 1)) sum_m (g_j^(m) - mean_m g_j^(m))^2   (the unbiased variance)

(Rainforth et al. 2018, "Tighter variational bounds are not necessarily better", eq. 7). They
show that for the importance-weighted bound L_K (Burda et al. 2016) the SNR of the decoder's
(the model's) gradient rises as O(sqrt(K)) with the number of particles K, while that of the
encoder's (the guide's, the inference network's) falls as O(1 / sqrt(K)): the expected gradient
shrinks as 1/K faster than its standard deviation, 1/sqrt(K). The doubly reparameterized
estimator (Tucker et al. 2019, "Doubly reparameterized gradient estimators for Monte Carlo
objectives"; ``iwae-dreg``) removes the score term behind the fall, and its encoder SNR rises
with K; sticking the landing (Roeder et al. 2017; ``iwae-stl``) drops it too, with a bias for
K > 1.

- :func:`gradient_snr`: one row per parameter tensor and one ``(all)`` row per group;
- :func:`snr_against_k`: the ``(all)`` rows for several objectives and numbers of particles,
  the data of Rainforth et al.'s figure 1;
- :func:`plot_snr_against_k`: that figure, log-log, with the K^(-1/2) and K^(+1/2) slopes dotted;
- :class:`SNRMonitor`: :func:`snr_against_k` at chosen epochs of :func:`~elbolab.inference.fit`,
  leaving the training bitwise as it would be without it.

The estimates are accumulated as a running mean and sum of squared deviations (Welford's
algorithm, in float64), never stored: memory is that of two copies of the parameters.
"""

from __future__ import annotations

__all__ = ["SNRMonitor", "gradient_snr", "plot_snr_against_k", "snr_against_k"]

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbolab.analysis.plots import save_figure
from elbolab.config import is_integer
from elbolab.data.checks import as_points
from elbolab.errors import InputError
from elbolab.inference.objectives import as_objective, get_objective, parse_objective_spec
from elbolab.programs import modules_behind
from elbolab.random_state import kept_rng_state

Model = Callable[..., Any]
Guide = Callable[..., Any]

GROUPS = ("encoder", "decoder")
ALL = "(all)"
COLUMNS = ["group", "parameter", "elements", "zero_elements", "snr_mean", "snr_median"]
K_COLUMNS = ["objective", "k", "group", "snr_mean", "snr_median"]
# The slope of log SNR against log K that Rainforth et al. show for IWAE, per group: the plot's dotted reference.
REFERENCE_SLOPES = {"encoder": -0.5, "decoder": 0.5}


def gradient_snr(
    model: Model,
    guide: Guide,
    x: Tensor,
    *args: Any,
    objective: str | Any = "iwae:k=64",
    num_estimates: int = 100,
) -> pd.DataFrame:
    """The signal-to-noise ratio of ``objective``'s gradient on ``x``, per parameter tensor and per group.

    Each of the ``num_estimates`` estimates is one call of ``objective.differentiable_loss(model,
    guide, x, *args)`` (the negative bound, summed over the data points) differentiated by
    ``torch.autograd.grad``: nothing is accumulated in ``.grad``. The gradient estimated is that
    of the whole of ``x``, not of each point. SNR_j = ``|mean_j| / std_j`` over the estimates, with
    the unbiased standard deviation (see the module docstring).

    The parameters are those (with ``requires_grad``) of the ``nn.Module`` objects the model and
    the guide are, or hold behind a wrapper (``config_enumerate(model)``, a ``functools.partial``,
    a closure: :func:`~elbolab.programs.modules_behind`). The guide's form the ``"encoder"``
    group, the model's the ``"decoder"`` group. A parameter in both (the same tensor: a ladder
    guide reusing the model's top-down network, a VQ guide the model's codebook) is counted once,
    in the decoder: it is a parameter of the generative model that the guide borrows. A program
    without modules (a plain Pyro function; its ``pyro.param`` sites are not counted) has no
    group. The modules' train/eval mode is left as it is (the gradient is the one training would
    see) and their buffers are put back afterwards (no batch-norm statistics or codebook updates
    from the estimates).

    An element whose gradient is exactly zero in every estimate (mean and std both 0: an unused
    parameter, the masked upper triangle of a Cholesky factor) has no SNR: it is counted in
    ``zero_elements`` and left out of ``snr_mean`` and ``snr_median``. An element whose gradient
    is the same non-zero value in every estimate has SNR ``inf``; a non-finite estimate makes its
    elements' SNR NaN.

    Arguments:
        model, guide: a pair following elbolab's contract.
        x: the data points ``[N, ...]``, a tensor on the pair's device.
        *args: further per-point inputs of the pair (e.g. labels), as for the objective.
        objective: a spec (``"iwae:k=64"``, ``"iwae-dreg:k=16"``, ``"elbo"``, see
            :func:`~elbolab.inference.objectives.parse_objective_spec`) or an objective instance
            with ``differentiable_loss`` (a ``pyro.infer.ELBO`` among them).
        num_estimates: M >= 2, independent gradient estimates.

    Returns:
        A data frame with columns ``group`` (``"encoder"``, ``"decoder"``), ``parameter`` (the
        tensor's name in ``named_parameters()``; ``"(all)"`` for the row aggregating every element
        of the group), ``elements``, ``zero_elements``, ``snr_mean`` and ``snr_median`` (mean and
        median of SNR_j over the non-zero elements; NaN when none). Per group, the tensors in
        ``named_parameters()`` order and then the ``(all)`` row; the encoder first.

    Raises:
        InputError: ``x`` is not a tensor of points, ``num_estimates`` < 2, an unknown objective
            or one that back-propagates itself, or neither program has parameters.

    Example:
        >>> table = gradient_snr(model, guide, x[:8], objective="iwae:k=64", num_estimates=200)
        >>> table[table.parameter == "(all)"]
    """
    x = _points(x, "gradient_snr: x")
    num_estimates = _estimates(num_estimates)
    objective = _objective(objective)
    groups = _parameter_groups(model, guide)
    params = [tensor for _, tensors in groups for _, tensor in tensors]
    count = 0
    mean = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    squares = [torch.zeros_like(m) for m in mean]  # sum of squared deviations from the running mean
    with _kept_buffers(model, guide):
        for _ in range(num_estimates):
            gradients = _gradient(objective, model, guide, x, args, params)
            count += 1
            for g, m, s in zip(gradients, mean, squares, strict=True):
                g = g.detach().to(torch.float64)
                delta = g - m
                m.add_(delta / count)
                s.add_(delta * (g - m))
    rows, index = [], 0
    for group, tensors in groups:
        ratios = []
        for name, _ in tensors:
            ratio, zero = _ratios(mean[index], squares[index], count)
            index += 1
            rows.append(_row(group, name, ratio, zero))
            ratios.append((ratio, zero))
        rows.append(_row(group, ALL, torch.cat([r for r, _ in ratios]), sum(z for _, z in ratios)))
    return pd.DataFrame(rows, columns=COLUMNS)


def snr_against_k(
    model: Model,
    guide: Guide,
    x: Tensor,
    *args: Any,
    objectives: Sequence[str] = ("iwae", "iwae-dreg", "iwae-stl"),
    ks: Sequence[int] = (1, 4, 16, 64),
    num_estimates: int = 100,
    progress: bool | None = None,
) -> pd.DataFrame:
    """The ``(all)`` rows of :func:`gradient_snr` for each objective and number of particles K.

    Each objective is built as ``get_objective(name, num_particles=k, **options)`` from its spec
    (``"renyi:alpha=0.5"``; the spec names no ``k``, which comes from ``ks``), and every pair
    draws its own ``num_estimates`` estimates, in the order objectives x ks.

    Arguments:
        model, guide, x, *args: as for :func:`gradient_snr`.
        objectives: objective specs without ``k``: ``iwae``, ``iwae-dreg``, ``iwae-stl``, ``elbo``, ...
        ks: the numbers of particles, positive integers.
        num_estimates: gradient estimates per (objective, K), at least 2.
        progress: a progress bar over the (objective, K) pairs (``None``: only on a terminal).

    Returns:
        A long data frame: ``objective`` (the spec as given), ``k``, ``group``, ``snr_mean``,
        ``snr_median``; one row per objective, K and group.

    Raises:
        InputError: as :func:`gradient_snr`, an empty ``objectives`` or ``ks``, a K that is not a
            positive integer, or a spec with its own ``k``.

    Example:
        >>> table = snr_against_k(model, guide, x[:8], ks=(1, 4, 16, 64), num_estimates=200)
        >>> plot_snr_against_k(table, "snr.png")
    """
    x = _points(x, "snr_against_k: x")
    num_estimates = _estimates(num_estimates)
    grid = _objective_grid(objectives, ks)
    frames = []
    bar = tqdm(grid, desc="gradient SNR", unit="K", disable=None if progress is None else not progress)
    for spec, k, objective in bar:
        bar.set_postfix(objective=spec, k=k)
        table = gradient_snr(model, guide, x, *args, objective=objective, num_estimates=num_estimates)
        rows = table[table.parameter == ALL]
        frames.append(pd.DataFrame({"objective": spec, "k": k, "group": rows.group.to_numpy(),
                                    "snr_mean": rows.snr_mean.to_numpy(), "snr_median": rows.snr_median.to_numpy()}))
    return pd.concat(frames, ignore_index=True)[K_COLUMNS]


def plot_snr_against_k(table: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Rainforth et al.'s figure: the mean SNR against K, log-log, one panel per group.

    One line with markers per objective. The dotted line is the slope the theory gives IWAE,
    K^(-1/2) on the encoder's panel and K^(+1/2) on the decoder's, through the ``iwae`` line's
    point at its smallest K (the first objective's when there is no ``iwae``). Points with a
    non-positive or NaN SNR are not drawn (log axes).

    Arguments:
        table: :func:`snr_against_k`'s table (or :class:`SNRMonitor`'s, restricted to one epoch).
        path: the figure file; its extension gives the format (``.png``).
        title: the figure's title (default: "gradient SNR against K").

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        InputError: a table without the columns ``objective``, ``k``, ``group``, ``snr_mean``,
            an empty one, or one holding several epochs.

    Example:
        >>> plot_snr_against_k(snr_against_k(model, guide, x[:8]), "snr.png", title="VAE on MNIST")
    """
    if not isinstance(table, pd.DataFrame) or (missing := [c for c in K_COLUMNS[:4] if c not in table]):
        raise InputError(f"plot_snr_against_k takes snr_against_k's table; it lacks the columns {missing or K_COLUMNS}")
    if table.empty:
        raise InputError("plot_snr_against_k: the table is empty")
    if "epoch" in table and table.epoch.nunique() > 1:
        raise InputError(
            f"plot_snr_against_k: the table holds epochs {sorted(table.epoch.unique().tolist())}; "
            "plot one at a time, e.g. table[table.epoch == E]"
        )
    present = list(table.group.unique())
    groups = [g for g in GROUPS if g in present] + [g for g in present if g not in GROUPS]
    objectives = list(table.objective.unique())
    anchor = "iwae" if "iwae" in objectives else objectives[0]
    ks = np.sort(table.k.unique()).astype(float)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), dpi=120, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        rows = table[table.group == group]
        for objective in objectives:
            line = rows[rows.objective == objective].sort_values("k")
            shown = line[line.snr_mean > 0]  # NaN compares False: neither is drawn on log axes
            ax.plot(shown.k, shown.snr_mean, marker="o", label=objective)
        first = rows[rows.objective == anchor].sort_values("k").head(1)
        slope = REFERENCE_SLOPES.get(group)
        if slope is not None and not first.empty and np.isfinite(first.snr_mean.iloc[0]) and first.snr_mean.iloc[0] > 0:
            k0, snr0 = float(first.k.iloc[0]), float(first.snr_mean.iloc[0])
            sign = "-" if slope < 0 else "+"
            ax.plot(ks, snr0 * (ks / k0) ** slope, linestyle=":", color="gray", label=f"$K^{{{sign}1/2}}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (particles)")
        ax.set_ylabel("mean gradient SNR")
        ax.set_title(group)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title or "gradient SNR against K")
    fig.tight_layout()
    return save_figure(fig, path)


class SNRMonitor:
    """:func:`snr_against_k` at chosen epochs of training: a monitor for :func:`~elbolab.inference.fit`.

    Passed as ``fit(..., monitor=SNRMonitor(x, epochs=[1, 10, 50]))``: after each chosen epoch it
    computes :func:`snr_against_k` of the model and guide as they are then, on ``x`` (moved to
    the model's device), in the modules' current (training) mode. The random generators (torch's,
    CUDA's when initialized, Python's, NumPy's: Pyro's) are put back afterwards and the modules'
    buffers too, so that the training goes on bitwise as it would without the monitor.

    Arguments:
        x: the data points the gradients are taken on (a handful is enough: the SNR is of the
            gradient of their sum), and ``*args`` the pair's further per-point inputs.
        epochs: the epochs (1-based, as in fit's history) after which to measure.
        objectives, ks, num_estimates: as for :func:`snr_against_k`.

    Attributes:
        table: the rows of every chosen epoch reached so far (see :attr:`table`).

    Raises:
        InputError: ``x`` is not a tensor of points, ``epochs`` is empty or holds a non-positive
            or non-integer value, or the objectives, ``ks`` or ``num_estimates`` are refused as
            by :func:`snr_against_k`.

    Example:
        >>> monitor = SNRMonitor(train.x[:8], epochs=[1, 20])
        >>> fit(model, guide, train, epochs=20, monitor=monitor)
        >>> monitor.table.query("epoch == 20 and group == 'encoder'")
    """

    def __init__(
        self,
        x: Tensor,
        *args: Any,
        epochs: Iterable[int],
        objectives: Sequence[str] = ("iwae", "iwae-dreg", "iwae-stl"),
        ks: Sequence[int] = (1, 4, 16, 64),
        num_estimates: int = 50,
    ) -> None:
        self.x = _points(x, "SNRMonitor: x")
        self.args = args
        if isinstance(epochs, str) or not isinstance(epochs, Iterable) or not (epochs := list(epochs)):
            raise InputError(f"SNRMonitor: epochs must be a non-empty list of epoch numbers, got {epochs!r}")
        if bad := [e for e in epochs if not is_integer(e) or e < 1]:
            raise InputError(f"SNRMonitor: epochs are positive integers (1 is the first), got {bad[0]!r}")
        self.epochs = frozenset(int(e) for e in epochs)
        _objective_grid(objectives, ks)  # refused now, not after the first chosen epoch
        self.objectives, self.ks = tuple(objectives), tuple(int(k) for k in ks)
        self.num_estimates = _estimates(num_estimates)
        self._frames: list[pd.DataFrame] = []

    @property
    def table(self) -> pd.DataFrame:
        """``epoch`` and :func:`snr_against_k`'s columns, for every chosen epoch reached, in order."""
        if not self._frames:
            return pd.DataFrame(columns=["epoch", *K_COLUMNS])
        return pd.concat(self._frames, ignore_index=True)

    def step(self, step: int, sums: Tensor, beta: float, lr: float) -> None:
        """Nothing: the SNR is measured between epochs."""

    def epoch(self, row: dict[str, Any], model: Model, guide: Guide) -> None:
        """After epoch ``row["epoch"]`` of fit's history: measure when it is one of ``epochs``."""
        epoch = int(row["epoch"])
        if epoch not in self.epochs:
            return
        device = _device(model, guide, self.x.device)
        x = self.x.to(device)
        args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in self.args)
        with kept_rng_state():
            table = snr_against_k(model, guide, x, *args, objectives=self.objectives, ks=self.ks,
                                  num_estimates=self.num_estimates, progress=False)
        table.insert(0, "epoch", epoch)
        self._frames.append(table)

    def close(self) -> None:
        """Nothing to release (the table stays readable); for :func:`~elbolab.analysis.compare_runs`."""


def _points(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a tensor of data points [N, D], got {type(x).__name__}")
    return as_points(x, what)


def _estimates(num_estimates: Any) -> int:
    if not is_integer(num_estimates) or num_estimates < 2:
        raise InputError(f"num_estimates must be an integer of at least 2 (a standard deviation needs two), "
                         f"got {num_estimates!r}")
    return int(num_estimates)


def _objective(objective: str | Any) -> Any:
    """An objective instance from a spec string or an instance, refusing one that back-propagates itself."""
    if isinstance(objective, str):
        name, options = parse_objective_spec(objective)
        objective = get_objective(name, **options)
    objective = as_objective(objective)
    if getattr(objective, "computes_own_gradients", False):
        raise InputError(
            f"objective {getattr(objective, 'name', type(objective).__name__)} back-propagates itself, into .grad; "
            "gradient_snr needs a differentiable loss: use elbolab's objective of the same bound (renyi, ...)"
        )
    return objective


def _objective_grid(objectives: Sequence[str], ks: Sequence[int]) -> list[tuple[str, int, Any]]:
    """``(spec, k, objective)`` for every objective spec and K, all built (and so checked) up front."""
    if isinstance(objectives, str):
        objectives = (objectives,)
    if not objectives:
        raise InputError("snr_against_k needs at least one objective")
    if isinstance(ks, int) or not ks:
        raise InputError(f"ks must be a non-empty list of numbers of particles, got {ks!r}")
    if bad := [k for k in ks if not is_integer(k) or k < 1]:
        raise InputError(f"ks are numbers of particles, positive integers; got {bad[0]!r}")
    grid = []
    for spec in objectives:
        if not isinstance(spec, str):
            raise InputError(f"snr_against_k takes objective specs (names such as 'iwae'), got {type(spec).__name__}")
        name, options = parse_objective_spec(spec)
        if "num_particles" in options:
            raise InputError(f"objective spec {spec!r} names its own k; snr_against_k takes K from ks=")
        for k in ks:
            grid.append((spec, int(k), _objective(get_objective(name, num_particles=int(k), **options))))
    return grid


def _parameter_groups(model: Model, guide: Guide) -> list[tuple[str, list[tuple[str, Tensor]]]]:
    """``[(group, [(name, parameter), ...]), ...]``: the encoder's (guide's) first, a shared one in the decoder."""
    decoder = _named_parameters(model)
    taken = {id(p) for _, p in decoder}
    encoder = [(name, p) for name, p in _named_parameters(guide) if id(p) not in taken]
    groups = [(group, tensors) for group, tensors in zip(GROUPS, (encoder, decoder), strict=True) if tensors]
    if not groups:
        raise InputError(
            "gradient_snr: neither the model nor the guide has parameters (nn.Module parameters with requires_grad): "
            "nothing to measure; the pyro.param sites of plain Pyro functions are not counted"
        )
    return groups


def _named_parameters(program: Any) -> list[tuple[str, Tensor]]:
    """The trainable parameters of the modules behind ``program``, once each, by name (``i.name`` for several modules)."""
    modules = modules_behind(program)
    seen: set[int] = set()
    named = []
    for index, module in enumerate(modules):
        prefix = f"{index}." if len(modules) > 1 else ""
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((prefix + name, p))
    return named


def _gradient(objective: Any, model: Model, guide: Guide, x: Tensor, args: tuple, params: list[Tensor]) -> list[Tensor]:
    """One estimate of the loss's gradient for each parameter (zeros where the loss does not reach it)."""
    loss = objective.differentiable_loss(model, guide, x, *args)
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    gradients = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, params, strict=True)]


def _ratios(mean: Tensor, squares: Tensor, count: int) -> tuple[Tensor, int]:
    """``|mean| / std`` of the elements not zero in every estimate (flat), and how many were."""
    mean, std = mean.reshape(-1), (squares.reshape(-1) / (count - 1)).sqrt()
    zero = (mean == 0) & (std == 0)
    return (mean.abs() / std)[~zero], int(zero.sum())


def _row(group: str, name: str, ratio: Tensor, zero: int) -> dict[str, Any]:
    has = ratio.numel() > 0
    return {
        "group": group, "parameter": name, "elements": ratio.numel() + zero, "zero_elements": zero,
        "snr_mean": ratio.mean().item() if has else float("nan"),
        # torch's median of an even count is the lower middle value; NumPy's averages the two.
        "snr_median": float(np.median(ratio.cpu().numpy())) if has else float("nan"),
    }


def _device(model: Model, guide: Guide, default: torch.device) -> torch.device:
    """The device of the pair's first parameter or buffer, else ``default``."""
    for module in modules_behind(model) + modules_behind(guide):
        for tensor in [*module.parameters(), *module.buffers()]:
            return tensor.device
    return default


@contextmanager
def _kept_buffers(*programs: Any) -> Iterator[None]:
    """Put every buffer of the modules behind ``programs`` back as it was (in place, or the tensor itself)."""
    kept, seen = [], set()
    for program in programs:
        for module in modules_behind(program):
            for sub in module.modules():
                if id(sub) in seen:  # a guide holding its model: the model's buffers once
                    continue
                seen.add(id(sub))
                kept += [(sub, name, b, b.clone()) for name, b in sub.named_buffers(recurse=False) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, tensor, value in kept:
                if getattr(module, name, None) is not tensor:
                    setattr(module, name, tensor)
                tensor.copy_(value)
