"""Which data points the amortized guide fails on: per-point PSIS k-hat and effective sample size.

For each data point n, K draws ``z_k ~ q(z | x_n)`` give log importance weights
``log w_nk = log p(x_n, z_k) - log q(z_k | x_n)``. From that one set:

- ``log_likelihood``: ``log mean_k w_nk``, the importance-sampled log p(x_n);
- ``elbo``: ``mean_k log w_nk``; ``gap``: their difference, a lower bound on KL(q || p(z | x_n));
- ``ess``: ``1 / sum_k wbar_nk^2`` with ``wbar`` the normalized weights, in ``[1, K]``;
- ``pareto_k``: the shape k-hat of a generalized Pareto distribution fitted to the largest weights
  by Pareto-smoothed importance sampling (Vehtari et al. 2015/2024, "Pareto smoothed importance
  sampling"), as used to check variational posteriors by Yao et al. (2018, "Yes, but did it
  work?: Evaluating variational inference"). The weights' distribution has finite variance only
  for k < 0.5, and finite mean only for k < 1. Thresholds: k-hat < 0.5, q is close to the
  posterior of x_n and importance sampling from it is reliable; 0.5 <= k-hat < 0.7, usable, with
  slower convergence; k-hat >= 0.7, the guide misses mass of the posterior for that point (its
  tails are too light), estimates of log p(x_n) from it cannot be trusted, and the encoder fails
  on it.

The Pareto fit is ArviZ's (``arviz.psislw``).

:func:`to_inference_data` exports draws of the guide as an ``arviz.InferenceData`` (see its
docstring for the groups), :func:`save_inference_data` / :func:`load_inference_data` write and read
it as netCDF, and :func:`plot_khat` / :func:`plot_ppc_statistics` draw ArviZ's k-hat and posterior
predictive check plots. Every ArviZ call of elbolab lives in this module, so that moving to ArviZ
1.x, which changes these APIs, is a change to one file.
"""

from __future__ import annotations

__all__ = [
    "IMAGE_STATISTICS",
    "K_HAT_BAD",
    "K_HAT_GOOD",
    "importance_diagnostics",
    "load_inference_data",
    "plot_khat",
    "plot_ppc_statistics",
    "save_inference_data",
    "to_inference_data",
]

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from matplotlib.lines import Line2D
from pyro import poutine
from torch import Tensor

from elbolab.analysis.plots import save_figure
from elbolab.contract import DataPlateScale, check_traced_rows
from elbolab.errors import InputError
from elbolab.files import atomic_path
from elbolab.inference import log_importance_weights
from elbolab.inference.evaluate import Chunk, chunk_elements, evaluation_inputs, over_chunks
from elbolab.inference.traces import (
    PARTICLE_PLATE,
    data_plate_dim,
    local_latent_sites,
    log_weights_per_point,
    per_point,
    run_traced,
    site_log_prob,
)
from elbolab.version import __version__

K_HAT_GOOD = 0.5  # below: importance sampling from q is reliable for this point
K_HAT_BAD = 0.7  # above: the guide cannot be trusted for this point

# Log weights that vary by less than this (nats, standard deviation) are equal up to float
# rounding: q is the posterior, the weights are bounded and k-hat is -inf (a Pareto fit to
# rounding noise would report any value).
EQUAL_WEIGHTS_STD = 1e-3


def importance_diagnostics(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 1000,
    batch_size: int | None = None,
    progress: bool | None = False,
    compile: bool = False,
) -> pd.DataFrame:
    """One row per data point: ``log_likelihood``, ``elbo``, ``gap``, ``ess``, ``pareto_k``.

    Arguments:
        model, guide: a model following the contract and its guide.
        x: data ``[N, ...]`` on the model's device; ``*args``: further per-point tensors.
        num_samples: K, importance samples per point (ArviZ's Pareto fit needs a few hundred).
        batch_size, progress, compile: as in :func:`~elbolab.inference.importance_estimate`.

    Returns:
        A DataFrame indexed by data point (0 .. N-1); see the module docstring for the columns
        and the k-hat thresholds :data:`K_HAT_GOOD` and :data:`K_HAT_BAD`.

    Example:
        >>> table = importance_diagnostics(model, guide, test_x, num_samples=1000)
        >>> table[table.pareto_k > K_HAT_BAD]  # the points the encoder fails on
    """
    log_w = log_importance_weights(
        model, guide, x, *args, num_samples=num_samples, batch_size=batch_size, progress=progress, compile=compile
    ).double()  # [K, N]
    log_likelihood = log_w.logsumexp(0) - math.log(num_samples)
    elbo = log_w.mean(0)
    ess = (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp()
    return pd.DataFrame({
        "log_likelihood": log_likelihood.numpy(),
        "elbo": elbo.numpy(),
        "gap": (log_likelihood - elbo).numpy(),
        "ess": ess.numpy(),
        "pareto_k": _pareto_k(log_w.T.numpy()),
    })


def _arviz() -> Any:
    # Imported when first used, not with elbolab: arviz is slow to import and prints a FutureWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def _pareto_k(log_weights: np.ndarray) -> np.ndarray:
    """PSIS k-hat of each row of ``[N, K]`` log weights (independent draws: relative efficiency 1)."""
    arviz = _arviz()
    with warnings.catch_warnings():
        # ArviZ warns once per call when some k-hat is high: the table reports it point by point.
        warnings.simplefilter("ignore")
        _, k_hat = arviz.psislw(log_weights, reff=1.0)
    k_hat = np.asarray(k_hat, dtype=float)
    k_hat[log_weights.std(axis=1) < EQUAL_WEIGHTS_STD] = -np.inf
    return k_hat


# Summary statistics of an image for posterior predictive checks: replicated images should match
# the observed ones in these, point by point and in distribution.
IMAGE_STATISTICS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean_intensity": lambda x: x.mean(-1),
    "on_pixels": lambda x: (x > 0.5).sum(-1),
}


def _site_dims(name: str, event_shape: tuple[int, ...]) -> list[str]:
    """Named dims of one data point's value: ``z`` of shape [20] -> ``["z_dim"]``."""
    if len(event_shape) == 1:
        return [f"{name}_dim"]
    return [f"{name}_dim_{i}" for i in range(len(event_shape))]


@torch.no_grad()
def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 100,
    prior_samples: int = 0,
    labels: Tensor | None = None,
    statistics: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    objective: str | None = None,
    attrs: Mapping[str, str | int | float] | None = None,
    obs: Sequence[int] | np.ndarray | None = None,
) -> Any:
    """Draws of the guide for every data point, as an ``arviz.InferenceData``.

    ``num_samples`` draws ``z_s ~ q(z | x_n)`` per point, one chain; every group shares the
    coordinate ``obs``: ``obs`` if given (e.g. the points' rows in a larger table), else 0 .. N-1,
    the row of ``x`` (and of :func:`importance_diagnostics`'s table).

    Groups:
        ``posterior``: every latent site of the model, dims ``(chain, draw, obs, <site>_dim)``.
        These are draws of the variational posterior q, not of p(z | x): weigh them by
        ``exp(sample_stats.log_weight)`` (self-normalized per point) for p(z | x).
        ``posterior_predictive``: ``x`` replicated from ``p(x | z_s)``, dims ``(chain, draw, obs,
        x_dim)``, and each of ``statistics`` of the replicas, dims ``(chain, draw, obs)``.
        ``log_likelihood``: ``x``, ``log p(x_n | z_s)``. ``sample_stats``: ``log_weight``, ``log
        p(x_n, z_s) - log q(z_s | x_n)``. ``observed_data``: ``x`` and its ``statistics``.
        ``constant_data``: ``label`` when ``labels`` are given. ``prior`` and
        ``prior_predictive``: with ``prior_samples > 0``, that many draws of every latent and of
        ``x`` from the model's prior, ``N`` per draw.

    Arguments:
        model, guide: a model following the contract and its guide; the model's latents must all
            sit inside ``pyro.plate("data")`` (global latents would be drawn afresh per chunk).
        x: data ``[N, D]`` on the model's device; ``*args``: further per-point tensors.
        num_samples: draws per point.
        prior_samples: draws from the prior (0: no prior groups).
        labels: optional class labels ``[N]``.
        statistics: name -> function of images ``[..., D]`` giving ``[...]``, e.g.
            :data:`IMAGE_STATISTICS`, for posterior predictive checks (:func:`plot_ppc_statistics`).
        objective: the objective the model was trained with, recorded in the attrs.
        attrs: further attributes (strings or numbers) for every group.
        obs: the ``obs`` coordinate, one integer per point (default 0 .. N-1).

    Example:
        >>> idata = to_inference_data(model, guide, test_x[:500], num_samples=100, statistics=IMAGE_STATISTICS)
        >>> arviz.summary(idata, var_names=["z"])
    """
    if int(num_samples) != num_samples or num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples}")
    if int(prior_samples) != prior_samples or prior_samples < 0:
        raise InputError(f"prior_samples must be a non-negative integer, got {prior_samples}")
    x, args, contract = evaluation_inputs(model, guide, x, args)
    num_points = x.shape[0]
    if labels is not None and labels.shape[0] != num_points:
        raise InputError(f"labels hold {labels.shape[0]} entries for {num_points} data points")
    obs = np.arange(num_points) if obs is None else np.asarray(obs, dtype=np.int64)
    if obs.shape != (num_points,):
        raise InputError(f"obs holds {obs.size} coordinates for {num_points} data points")
    statistics = dict(statistics or {})
    observed_names = contract.observed
    if statistics and len(observed_names) > 1:
        raise InputError(
            f"statistics summarize one observed site, and the model observes {len(observed_names)} "
            f"({', '.join(map(repr, observed_names))}): leave statistics out"
        )
    nesting = contract.plate_nesting
    shapes: dict[str, tuple[int, ...]] = {}

    def draws(chunk: Chunk) -> dict[str, dict[str, np.ndarray]]:
        """Every array of the chunk's points, ``[S, n, ...]`` (observed data: ``[n, ...]``)."""
        n = chunk.size
        with DataPlateScale(contract.plates, 1.0, chunk.rows):
            model_trace, guide_trace = run_traced(
                model, guide, chunk.batch, {}, num_samples, nesting, enumerated=bool(contract.enumerated)
            )
        check_traced_rows(model_trace, contract, chunk.start)
        data_dim = data_plate_dim(model_trace, contract.data_plate)
        part: dict[str, dict[str, np.ndarray]] = {"posterior": {}, "replicated": {}, "observed": {}, "log_lik": {}}
        for name, site in local_latent_sites(model_trace, "to_inference_data", plate=contract.data_plate):
            if name in contract.enumerated:
                continue  # summed out: it has no draws
            shapes[name] = _point_shape(site, data_dim)
            part["posterior"][name] = _numpy(site["value"], num_samples, n, shapes[name])
        for name in observed_names:
            site = model_trace.nodes[name]
            if len(site["fn"].batch_shape) > nesting + 1:
                raise InputError(
                    f"to_inference_data: the observed site {name!r} depends on the enumerated site(s) "
                    f"{', '.join(map(repr, contract.enumerated))}, so its replicated draws and pointwise log-likelihood "
                    "would need draws of them from their posterior, which elbolab does not take; importance_estimate "
                    "and importance_diagnostics sum them out"
                )
            shapes[name] = _point_shape(site, data_dim)
            part["replicated"][name] = _numpy(site["fn"].sample(), num_samples, n, shapes[name])
            part["observed"][name] = site["value"].reshape(n, *shapes[name]).cpu().numpy()
            part["log_lik"][name] = (
                per_point(site_log_prob(site), -(nesting + 1), data_dim).expand(num_samples, n).cpu().numpy()
            )
        w, _ = log_weights_per_point(model_trace, guide_trace, nesting, contract)
        part["sample_stats"] = {"log_weight": w.cpu().numpy()}
        return part

    # One number of points per chunk for the posterior and the prior draws, sized by the larger
    # of the two, so that a seed gives the same draws whether or not prior draws are asked for.
    points_per_chunk = max(1, chunk_elements(x.device) // (max(int(num_samples), int(prior_samples)) * max(1, math.prod(x.shape[1:]))))
    with pyro.validation_enabled(False):
        parts = [part for _, part in over_chunks(draws, x, args, int(num_samples), batch_size=points_per_chunk,
                                                 split_samples=False)]
    posterior = _joined([p["posterior"] for p in parts], axis=1, chain=True)
    x_rep = _joined([p["replicated"] for p in parts], axis=1, chain=True)  # [1, S, N, ...]
    x_obs = _joined([p["observed"] for p in parts], axis=0)
    dims = {name: ["obs", *_site_dims(name, shape)] for name, shape in shapes.items()}
    dims |= {name: ["obs"] for name in (*statistics, "log_weight", "label")}
    coords = {"obs": obs}
    model_name = type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")
    guide_name = type(guide).__name__ if isinstance(guide, torch.nn.Module) else getattr(guide, "__name__", "guide")
    group_attrs = {
        "model": model_name,
        "guide": guide_name,
        "objective": objective or "unknown",
        "elbolab_version": __version__,
        "num_samples": int(num_samples),
        "posterior_is": "draws of the variational posterior q(z | x); importance weights in sample_stats.log_weight",
        **({"global_latents": ", ".join(contract.global_latents), "conditional_on": (
            "every per-point quantity is conditional on global draws from q, one per draw; the global latents "
            "themselves are not exported"
        )} if contract.global_latents else {}),
        **(attrs or {}),
    }
    arviz = _arviz()

    def dataset(variables: dict[str, np.ndarray], sampled: bool = True, per_point: bool = False) -> Any:
        # per_point: one value per data point and draw (log p(x_n | z_s)), so "x" has no pixel dims.
        group_dims = {name: ["obs"] for name in variables} if per_point else dims
        return arviz.dict_to_dataset(variables, attrs=group_attrs, library=pyro, coords=coords, dims=group_dims,
                                     default_dims=None if sampled else [])

    def with_statistics(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not statistics:
            return values
        tensor = torch.from_numpy(values[observed_names[0]])
        return values | {name: fn(tensor).numpy() for name, fn in statistics.items()}

    groups = {
        "posterior": dataset(posterior),
        "posterior_predictive": dataset(with_statistics(x_rep)),
        "log_likelihood": dataset(_joined([p["log_lik"] for p in parts], axis=1, chain=True), per_point=True),
        "sample_stats": dataset(_joined([p["sample_stats"] for p in parts], axis=1, chain=True)),
        "observed_data": dataset(with_statistics(x_obs), sampled=False),
    }
    if labels is not None:
        groups["constant_data"] = dataset({"label": labels.detach().cpu().numpy()}, sampled=False)
    if prior_samples:
        prior, prior_x = _prior_draws(model, x, int(prior_samples), nesting, contract, shapes, points_per_chunk)
        groups["prior"] = dataset(prior)
        groups["prior_predictive"] = dataset(with_statistics(prior_x))
    return arviz.InferenceData(**groups)


def _numpy(value: Tensor, draws: int, points: int, event_shape: tuple[int, ...]) -> np.ndarray:
    return value.reshape(draws, points, *event_shape).cpu().numpy()


def _point_shape(site: dict, data_dim: int) -> tuple[int, ...]:
    """The shape of one data point's value at a site: the dims right of the data plate's."""
    position = site["value"].dim() - len(site["fn"].event_shape) + data_dim
    return tuple(site["value"].shape[position + 1 :])


def _joined(parts: list[dict[str, np.ndarray]], axis: int, chain: bool = False) -> dict[str, np.ndarray]:
    """Each name's arrays of the chunks joined along ``axis`` (the points'), after a chain dim if ``chain``."""
    joined = {name: np.concatenate([part[name] for part in parts], axis=axis) for name in parts[0]}
    return {name: value[None] for name, value in joined.items()} if chain else joined


def _prior_draws(
    model: Callable[..., Any], x: Tensor, draws: int, nesting: int, contract: Any, shapes: dict, points_per_chunk: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``draws`` runs of the model with ``x=None``, N points each: latents and generated observations, ``[1, draws, N, ...]``."""

    def prior(chunk: Chunk) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        n = chunk.size
        with (
            poutine.trace() as tracer,
            DataPlateScale(contract.plates, 1.0, chunk.rows),
            pyro.plate(PARTICLE_PLATE, draws, dim=-(nesting + 1)),
        ):
            try:
                model(None, batch_size=n)
            except TypeError as error:
                raise InputError(
                    f"prior draws run model(None, batch_size=n), the model contract's way to generate; this model "
                    f"cannot ({error}): leave prior_samples at 0"
                ) from None
        latents = {
            name: _numpy(site["value"], draws, n, shapes[name])
            for name, site in local_latent_sites(tracer.trace, "to_inference_data", plate=contract.data_plate)
        }
        generated = {name: _numpy(tracer.trace.nodes[name]["value"], draws, n, shapes[name]) for name in contract.observed}
        return latents, generated

    parts = [part for _, part in over_chunks(prior, x, (), draws, batch_size=points_per_chunk, split_samples=False)]
    return _joined([p[0] for p in parts], axis=1, chain=True), _joined([p[1] for p in parts], axis=1, chain=True)


def save_inference_data(idata: Any, path: str | Path) -> Path:
    """Write ``idata`` as compressed netCDF, atomically (:func:`~elbolab.files.atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp))
    return path


def load_inference_data(path: str | Path) -> Any:
    """Read an ``InferenceData`` netCDF file written by :func:`save_inference_data` (nothing unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        idata = _arviz().from_netcdf(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable InferenceData netCDF file ({error})") from None
    for group in idata.groups():
        idata[group].load()  # into memory, so that the file is closed and can be replaced
    return idata


def plot_khat(pareto_k: np.ndarray | pd.Series, path: str | Path, title: str = "") -> Path:
    """PSIS k-hat per data point (ArviZ's ``plot_khat``) with the 0.5 and 0.7 thresholds marked.

    Points whose weights are all equal (k-hat = -inf: q is the posterior) are drawn at the bottom of
    the axis.
    """
    k_hat = np.asarray(pareto_k, dtype=float)
    finite = k_hat[np.isfinite(k_hat)]
    floor = min(finite.min(), 0.0) - 0.1 if finite.size else -0.5
    shown = np.where(np.isfinite(k_hat), k_hat, floor)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _arviz().plot_khat(
            shown, ax=ax, show_hlines=True, markersize=12 if k_hat.size > 2000 else 24, textsize=10,
            hlines_kwargs={"hlines": [K_HAT_GOOD, K_HAT_BAD], "linestyle": ["--", "-"], "color": ["C2", "C3"]},
        )
    ax.set_xlabel("data point (row of diagnostics.csv)")
    ax.set_ylabel("PSIS shape k-hat")
    share_bad = float((k_hat > K_HAT_BAD).mean()) * 100
    share_ok = float(((k_hat > K_HAT_GOOD) & (k_hat <= K_HAT_BAD)).mean()) * 100
    ax.legend(handles=[
        Line2D([], [], color="C3", label=f"k-hat > {K_HAT_BAD}: q unreliable ({share_bad:.1f}% of points)"),
        Line2D([], [], color="C2", linestyle="--", label=f"{K_HAT_GOOD} < k-hat <= {K_HAT_BAD}: usable ({share_ok:.1f}%)"),
    ], fontsize=8, loc="best")
    ax.set_title(title or "PSIS k-hat of q(z|x) per data point", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ppc_statistics(idata: Any, path: str | Path, var_names: list[str], num_pp_samples: int = 50) -> Path:
    """ArviZ's posterior predictive check of summary statistics, one panel per statistic.

    For each of ``num_pp_samples`` posterior draws, the distribution over data points of the
    statistic of the replicated images (thin lines) against that of the observed images (black).
    """
    predictive = idata.posterior_predictive
    num_pp_samples = min(num_pp_samples, predictive.sizes["chain"] * predictive.sizes["draw"])
    fig, axes = plt.subplots(1, len(var_names), figsize=(5 * len(var_names), 4), dpi=120, squeeze=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _arviz().plot_ppc(idata, var_names=var_names, ax=axes[0], num_pp_samples=num_pp_samples, random_seed=0,
                          textsize=10)
    for ax, name in zip(axes[0], var_names, strict=True):
        ax.set_xlabel(name.replace("_", " ") + " per image")
        ax.set_ylabel("density over data points")
        ax.legend(fontsize=8)  # ArviZ sizes its legends differently per panel
    fig.suptitle("posterior predictive check\nreplicated x ~ p(x | z), z ~ q(z | x), against the observed x", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
