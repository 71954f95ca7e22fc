"""Simulation-based calibration (SBC) of an amortized guide, one rank histogram per latent dimension.

Talts, Betancourt, Simpson, Vehtari & Gelman (2018), "Validating Bayesian inference algorithms
with simulation-based calibration". For s = 1 .. S, draw from the model's joint

    z_s ~ p(z),    x_s ~ p(x | z_s),

then L draws ``z_s^(1) .. z_s^(L) ~ q(z | x_s)`` from the guide, and for each latent dimension d
the rank of the truth among them,

    r_sd = #{l : z_s^(l)[d] < z_s[d]}  in {0, .., L},

with ties (discrete sites) broken uniformly at random: ``r_sd = #{<} + U{0, .., #{=}}``. Averaged
over the prior, the exact posterior is the prior, ``int p(z | x) p(x) dx = p(z)``; so if
``q(z | x) = p(z | x)``, ``z_s`` and the ``z_s^(l)`` are L + 1 exchangeable draws given ``x_s`` and
``r_sd`` is uniform on {0, .., L}. A departure from uniformity says how q is wrong:

- a U-shape (the truth too often below or above every draw): q too narrow, *under-dispersed*;
- a hump in the middle: q too wide, *over-dispersed*;
- a slope (ranks piled on one side): q *biased*, its mass shifted to one side of the truth
  (low ranks: q's draws too large).

Two tests of uniformity per dimension: Pearson's chi-square on the ranks binned into ``bins``
bins, with expected counts proportional to the number of rank values each bin holds (bins need
not divide L + 1), and Kolmogorov-Smirnov on the jittered normalized ranks
``(r + U(0, 1)) / (L + 1)``, which are exactly U(0, 1) when the ranks are uniform.

Randomness comes from Pyro's and torch's global generators: seed with ``pyro.set_rng_seed``.
"""

from __future__ import annotations

__all__ = ["Calibration", "calibration", "plot_calibration"]

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import stats
from torch import Tensor

from elbolab.analysis.plots import save_figure
from elbolab.config import is_integer, is_real
from elbolab.contract import DataPlateScale
from elbolab.errors import InputError
from elbolab.inference.evaluate import Chunk, evaluation_inputs, over_chunks
from elbolab.inference.traces import PARTICLE_PLATE

# The site whose generated value is the data fed to the guide, as in models/draws.py.
DATA_SITE = "x"
VERDICTS = ("calibrated", "under-dispersed", "over-dispersed", "biased")
# The standard deviation of a U(0, 1) rank, and the standard error of S ranks' standard deviation
# relative to it, under uniform ranks: sqrt((mu_4 / sigma^4 - 1) / 4S) = 1 / sqrt(5 S).
_UNIFORM_STD = math.sqrt(1 / 12)
_SPREAD_SE_FACTOR = 5.0


@dataclass(frozen=True)
class Calibration:
    """The SBC ranks of a guide and their per-dimension tests, as :func:`calibration` returns them.

    Attributes:
        ranks: one row per simulation, one integer column in ``0 .. num_draws`` per latent
            dimension, named ``"site[d]"`` (``"z[0]"``, ...; a site's event is flattened in C order).
        table: one row per latent dimension, indexed by its column name in ``ranks``
            (``dimension``), in the columns' order: ``site``, ``dim`` (the index
            in the flattened event), ``chi2_p`` and ``ks_p`` (p-values of the two uniformity
            tests), ``mean_rank`` (mean of ``r / L``: 0.5 when calibrated), ``rank_std_ratio``
            (standard deviation of ``r / L`` over a uniform rank's: 1 when calibrated, > 1 for a
            U-shape, < 1 for a hump) and ``verdict`` (see :func:`calibration`).
        num_simulations: S.
        num_draws: L, guide draws per simulation.
        bins: the bins of the chi-square test (and of :func:`plot_calibration`'s histograms).
        alpha: the level of the tests.
    """

    ranks: pd.DataFrame
    table: pd.DataFrame
    num_simulations: int
    num_draws: int
    bins: int
    alpha: float = 0.01

    @property
    def failed(self) -> pd.DataFrame:
        """The rows of :attr:`table` whose verdict is not ``"calibrated"``."""
        return self.table[self.table.verdict != "calibrated"]


@torch.no_grad()
def calibration(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_simulations: int = 1000,
    num_draws: int = 99,
    bins: int = 20,
    alpha: float = 0.01,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Calibration:
    """Simulation-based calibration of ``guide`` against ``model``, per latent dimension.

    One generating run ``model(None, *args, batch_size=S)`` draws S latents and data points from
    the joint; the generated data are the value of the site ``"x"``, which must be the model's
    one observed site, observing its input ``x`` itself (rows first), so that the guide is fed
    exactly what the model generated. Then ``guide(x, *args)`` draws L samples per point,
    vectorized in a particle plate, in chunks of simulations sized to bound memory (as every
    estimator of elbolab; ``batch_size`` fixes the simulations per chunk). Every latent site
    the guide samples inside the data plate is ranked, dimension by dimension; sites the model
    sums out by enumeration (``infer={"enumerate": "parallel"}``) have no guide draws and are
    skipped. The model and guide run without gradients, in whichever mode (train / eval) they
    are in.

    Verdict of a dimension: ``"calibrated"`` unless a test rejects uniformity,
    ``chi2_p < alpha`` or ``ks_p < alpha`` (so a calibrated dimension is flagged with
    probability at most ``2 alpha``, and among many dimensions a few false alarms are expected).
    A flagged dimension is named after the larger of two departures, each in units of its
    standard error: of the mean, the t statistic ``t = |mean_rank - 0.5| sqrt(S) / sd`` with
    ``sd`` the normalized ranks' standard deviation (``rank_std_ratio / sqrt(12)``), and of the
    spread, ``z = (rank_std_ratio - 1) sqrt(5 S)`` (``1 / sqrt(5 S)`` is the standard error of
    ``rank_std_ratio`` under uniform ranks). ``"biased"`` when ``t >= |z|``; else
    ``"under-dispersed"`` (q too narrow, U-shaped ranks) when ``rank_std_ratio > 1``, and
    ``"over-dispersed"`` (q too wide, a hump) when it is below 1. (The mean's standard error
    comes from the ranks themselves so that ranks piled at one end, q far to one side of the
    truth, whose spread is small, read as biased.)

    SBC checks q averaged over the prior's data: a guide that ignores ``x`` and returns the
    prior ``p(z)`` passes it, as does any q whose errors cancel over the data. Pair it with the
    per-point diagnostics (:func:`~elbolab.analysis.importance_diagnostics`).

    Arguments:
        model: a model following the contract, whose latents all sit inside the data plate
            (a global latent has one value for all S simulations, so the ranks would not be
            independent draws: refused, by name).
        guide: its amortized guide ``q(z | x, *args)``.
        *args: further per-simulation inputs of both (the labels of a conditional model), each
            a tensor with ``num_simulations`` rows, passed to the model and the guide.
        num_simulations: S, simulated data points (the tests' sample size).
        num_draws: L, guide draws per simulation; ranks take L + 1 values.
        bins: bins of the chi-square test. They split the L + 1 rank values into runs of as equal
            lengths as possible (L + 1 = 100 and 20 bins: 5 values each); when ``bins`` does not
            divide L + 1 the expected counts follow each bin's length, and more bins than
            L + 1 become L + 1. The chi-square approximation wants about 5 or more expected
            counts per bin: ``num_simulations / bins >= 5``.
        alpha: level of the uniformity tests, in (0, 1).
        batch_size: simulations per chunk of guide draws (default: as many as fit in memory).
        progress: a progress bar over simulations (``None``: only on a terminal).

    Returns:
        A :class:`Calibration` with the ranks and the per-dimension table.

    Example:
        >>> pyro.set_rng_seed(0)
        >>> model = LinearGaussian.random(x_dim=16, z_dim=4)
        >>> result = calibration(model, ExactPosteriorGuide(model, scale_factor=0.5), num_simulations=500)
        >>> result.table.verdict.tolist()
        ['under-dispersed', 'under-dispersed', 'under-dispersed', 'under-dispersed']
        >>> plot_calibration(result, "sbc.png")
    """
    num_simulations = _positive_integer(num_simulations, "num_simulations")
    num_draws = _positive_integer(num_draws, "num_draws")
    if not is_integer(bins) or bins < 2:
        raise InputError(f"bins must be an integer >= 2, got {bins!r}")
    if not is_real(alpha) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a level in (0, 1), got {alpha!r}")
    if batch_size is not None:
        batch_size = _positive_integer(batch_size, "batch_size")
    bins = min(int(bins), num_draws + 1)
    args = tuple(_per_simulation(arg, i, num_simulations) for i, arg in enumerate(args))

    generated = _generate(model, args, num_simulations)
    x = generated.nodes[DATA_SITE]["value"]
    x, args, contract = evaluation_inputs(model, guide, x, args, what=f"the data generated at site {DATA_SITE!r}")
    if len(contract.observed) > 1:
        raise InputError(
            f"calibration feeds the guide the data the model generates, and this model observes several sites "
            f"({', '.join(map(repr, contract.observed))}): it needs one observed site, {DATA_SITE!r}, observing x"
        )
    if contract.input_support is None or contract.input_support[0] != DATA_SITE:
        raise InputError(
            f"the model's observed site {contract.observed[0]!r} does not observe its input x itself (obs=x, rows "
            f"first): calibration feeds the guide the value the model generates at {DATA_SITE!r}, which must be x"
        )
    if contract.global_latents:
        raise InputError(
            f"the model's latent site(s) {', '.join(map(repr, contract.global_latents))} sit outside the data plate "
            f"{contract.data_plate!r}: simulation-based calibration per data point needs every latent inside it "
            "(a global latent would be shared by all simulations)"
        )
    names = list(contract.local_latents)
    if not names:
        raise InputError(
            "the guide samples no latent site of the model inside the data plate (enumerated sites "
            f"{', '.join(map(repr, contract.enumerated)) or 'none'} are summed out): there is nothing to rank"
        )
    data_dims = {name: _data_dim(generated.nodes[name], contract.data_plate) for name in names}
    truth = {name: _per_point(generated.nodes[name], data_dims[name]) for name in names}

    def ranks_of(chunk: Chunk) -> dict[str, Tensor]:
        rows = slice(chunk.start, chunk.start + chunk.size)
        nesting = contract.plate_nesting
        with (
            DataPlateScale(contract.plates, 1.0, chunk.rows),
            poutine.trace() as tracer,
            pyro.plate(PARTICLE_PLATE, num_draws, dim=-(nesting + 1)),
        ):
            guide(*chunk.batch)
        result = {}
        for name in names:
            points = truth[name][rows]
            result[name] = _rank(_draws(tracer.trace.nodes[name], data_dims[name], nesting, num_draws, points, name), points)
        return result

    parts = [
        part
        for _, part in over_chunks(ranks_of, x, args, num_draws, batch_size=batch_size, split_samples=False,
                                   progress=progress, desc="SBC ranks")
    ]
    columns, sites, dims = {}, [], []
    for name in names:
        ranks = torch.cat([part[name] for part in parts]).cpu().numpy()
        for d in range(ranks.shape[1]):
            columns[f"{name}[{d}]"] = ranks[:, d].astype(np.int64)
            sites.append(name)
            dims.append(d)
    ranks = pd.DataFrame(columns)
    ranks.index.name = "simulation"
    table = _table(ranks, sites, dims, num_draws, bins, float(alpha))
    return Calibration(ranks, table, num_simulations, num_draws, bins, float(alpha))


def _positive_integer(value: Any, what: str) -> int:
    if not is_integer(value) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _per_simulation(arg: Any, index: int, num_simulations: int) -> Tensor:
    """A further argument of model and guide: a tensor with one row per simulation."""
    if isinstance(arg, np.ndarray):
        arg = torch.as_tensor(arg)
    if not isinstance(arg, Tensor) or arg.dim() == 0 or arg.shape[0] != num_simulations:
        shape = tuple(arg.shape) if isinstance(arg, Tensor) else type(arg).__name__
        raise InputError(
            f"args[{index}] must be a tensor with one row per simulation (num_simulations={num_simulations}), got {shape}"
        )
    return arg


def _generate(model: Callable[..., Any], args: tuple[Tensor, ...], num_simulations: int) -> poutine.Trace:
    """The trace of one generating run ``model(None, *args, batch_size=S)``, its data and latents checked finite."""
    try:
        with poutine.trace() as tracer:
            model(None, *args, batch_size=num_simulations)
    except (InputError, RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError,
            NotImplementedError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"the model does not generate with x=None (model(None, *args, batch_size={num_simulations})): {reason}"
        ) from None
    sites = {
        name: site for name, site in tracer.trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    }
    if DATA_SITE not in sites:
        raise InputError(
            f"the model's generating run (x=None) has no sample site {DATA_SITE!r} (its sites: "
            f"{', '.join(map(repr, sites)) or 'none'}): calibration reads the generated data off the site "
            f"{DATA_SITE!r}, which observes x"
        )
    for name, site in sites.items():
        value = site["value"]
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InputError(f"the model generates NaN or infinite values at site {name!r} (x=None)")
    return tracer.trace


def _data_dim(site: dict, data_plate: str) -> int:
    """The (negative) dim of the data plate among a site's batch dims."""
    return next(frame.dim for frame in site["cond_indep_stack"] if frame.name == data_plate)


def _per_point(site: dict, data_dim: int) -> Tensor:
    """The generated value of a latent, one flattened row per simulation: ``[S, D_site]``."""
    value = site["value"]
    position = value.dim() - len(site["fn"].event_shape) + data_dim
    return value.movedim(position, 0).reshape(value.shape[position], -1)


def _draws(site: dict, data_dim: int, nesting: int, num_draws: int, truth: Tensor, name: str) -> Tensor:
    """The guide's draws of a latent under the particle plate, ``[L, n, D_site]`` like ``truth`` ``[n, D_site]``.

    The contract puts the guide's plate over the points at the model's data dim, and the
    particle plate sits left of every plate, at ``-(nesting + 1)``.
    """
    value = site["value"]
    batch_dims = value.dim() - len(site["fn"].event_shape)
    particle, data = batch_dims - (nesting + 1), batch_dims + data_dim
    if particle < 0 or value.shape[particle] != num_draws or value.shape[data] != truth.shape[0]:
        raise InputError(
            f"the guide's site {name!r} does not draw along the particle plate (value shape {tuple(value.shape)}, "
            f"expected {num_draws} draws of {truth.shape[0]} points): calibration vectorizes the guide's draws in "
            f"pyro.plate({PARTICLE_PLATE!r}, L) left of its plates"
        )
    return value.movedim((particle, data), (0, 1)).reshape(num_draws, *truth.shape)


def _rank(draws: Tensor, truth: Tensor) -> Tensor:
    """``#{l : draws_l < truth} + U{0 .. #{l : draws_l == truth}}``, per point and dimension: ``[n, D]``."""
    below = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    return below + (torch.rand(ties.shape, device=ties.device) * (ties + 1)).floor().long().clamp(max=ties)


def _bin_edges(num_draws: int, bins: int) -> np.ndarray:
    """Integer edges splitting the rank values ``0 .. L`` into ``bins`` runs of near-equal lengths."""
    return np.floor(np.arange(bins + 1) * (num_draws + 1) / bins).astype(np.int64)


def _table(ranks: pd.DataFrame, sites: list[str], dims: list[int], num_draws: int, bins: int, alpha: float) -> pd.DataFrame:
    num_simulations = len(ranks)
    edges = _bin_edges(num_draws, bins)
    expected = num_simulations * np.diff(edges) / (num_draws + 1)
    uniform_std = math.sqrt(num_draws * (num_draws + 2) / 12) / num_draws  # of r / L, r uniform on 0 .. L
    jitter = torch.rand(ranks.shape, dtype=torch.float64).numpy()
    rows = []
    for j, column in enumerate(ranks.columns):
        r = ranks[column].to_numpy()
        counts = np.bincount(np.searchsorted(edges, r, side="right") - 1, minlength=bins)
        chi2_p = float(stats.chisquare(counts, expected).pvalue)
        ks_p = float(stats.kstest((r + jitter[:, j]) / (num_draws + 1), "uniform").pvalue)
        normalized = r / num_draws
        mean_rank = float(normalized.mean())
        std_ratio = float(normalized.std() / uniform_std)
        rows.append({
            "site": sites[j],
            "dim": dims[j],
            "chi2_p": chi2_p,
            "ks_p": ks_p,
            "mean_rank": mean_rank,
            "rank_std_ratio": std_ratio,
            "verdict": _verdict(chi2_p, ks_p, mean_rank, std_ratio, num_simulations, alpha),
        })
    return pd.DataFrame(rows, index=pd.Index(ranks.columns, name="dimension"))


def _verdict(chi2_p: float, ks_p: float, mean_rank: float, std_ratio: float, num_simulations: int, alpha: float) -> str:
    if chi2_p >= alpha and ks_p >= alpha:
        return "calibrated"
    # The mean's standard error comes from the ranks' own spread, not a uniform's: ranks piled at
    # one end (q far off to one side) have little spread, and their mean is then all the more certain.
    shift = abs(mean_rank - 0.5) * math.sqrt(num_simulations)
    t_mean = 0.0 if shift == 0 else shift / (std_ratio * _UNIFORM_STD) if std_ratio > 0 else math.inf
    z_spread = (std_ratio - 1) * math.sqrt(_SPREAD_SE_FACTOR * num_simulations)
    if t_mean >= abs(z_spread):
        return "biased"
    return "under-dispersed" if std_ratio > 1 else "over-dispersed"


def plot_calibration(
    result: Calibration, path: str | Path, *, max_dimensions: int = 16, title: str | None = None
) -> Path:
    """A grid of rank histograms, one per latent dimension, written to ``path`` (PNG) atomically.

    Each panel shows the counts of the chi-square test's bins over the normalized rank
    ``r / (L + 1)``, the expected count of a uniform histogram and its 99% band (the 0.5% and
    99.5% quantiles of a binomial count, ``scipy.stats.binom``, bin by bin: about 1 bin in 100
    falls outside it by chance). Dimensions whose verdict is not ``"calibrated"`` are drawn in
    red with their verdict. With more than ``max_dimensions`` dimensions, the failing ones are
    shown first, then the others, in the table's order.

    Arguments:
        result: what :func:`calibration` returned.
        path: the PNG file to write.
        max_dimensions: most panels to draw.
        title: the figure's title (S and L are added to it).

    Returns:
        ``path``.

    Example:
        >>> plot_calibration(calibration(model, guide), "runs/vae/sbc.png")
    """
    if not is_integer(max_dimensions) or max_dimensions < 1:
        raise InputError(f"max_dimensions must be a positive integer, got {max_dimensions!r}")
    table = result.table
    failing = list(table.index[table.verdict != "calibrated"])
    chosen = set((failing + [c for c in table.index if c not in failing])[: int(max_dimensions)])
    shown = [c for c in table.index if c in chosen]
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), dpi=110, squeeze=False)
    edges = _bin_edges(result.num_draws, result.bins)
    probabilities = np.diff(edges) / (result.num_draws + 1)
    left, widths = edges[:-1] / (result.num_draws + 1), np.diff(edges) / (result.num_draws + 1)
    low = stats.binom.ppf(0.005, result.num_simulations, probabilities)
    high = stats.binom.ppf(0.995, result.num_simulations, probabilities)
    expected = result.num_simulations * probabilities
    steps = np.append(left, 1.0)
    for ax, column in zip(axes.flat, shown, strict=False):
        row = table.loc[column]
        r = result.ranks[column].to_numpy()
        counts = np.bincount(np.searchsorted(edges, r, side="right") - 1, minlength=result.bins)
        bad = row.verdict != "calibrated"
        ax.fill_between(steps, np.append(low, low[-1]), np.append(high, high[-1]), step="post", color="0.85",
                        label="99% band of a uniform histogram")
        ax.step(steps, np.append(expected, expected[-1]), where="post", color="0.4", lw=0.8)
        ax.bar(left, counts, width=widths, align="edge", color="C3" if bad else "C0", alpha=0.8,
               edgecolor="white", lw=0.3)
        label = f"{column}: {row.verdict}" if bad else column
        ax.set_title(f"{label}\nchi² p={row.chi2_p:.2g}, KS p={row.ks_p:.2g}", fontsize=8,
                     color="C3" if bad else "black")
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower left", fontsize=7, frameon=False)
    note = f", {len(shown)} of {len(table)} dimensions" if len(shown) < len(table) else ""
    fig.suptitle(
        f"{title or 'simulation-based calibration: rank histograms'}\n"
        f"S = {result.num_simulations} simulations, L = {result.num_draws} draws per simulation{note}",
        fontsize=9,
    )
    fig.supxlabel("normalized rank r / (L + 1)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
