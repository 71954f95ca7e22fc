"""Where an amortized posterior loses its nats: the approximation gap and the amortization gap, per data point.

For a data point x, an amortized guide ``q(z | x) = q(z; lambda(x))`` of a family Q, and
``q* = argmax_{q in Q} ELBO(q)`` the best member of Q for x alone (Cremer, Li & Duvenaud 2018,
"Inference Suboptimality in Variational Autoencoders", Table 1):

    log p(x) - ELBO(q)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q)]
        inference gap        approximation gap        amortization gap

The approximation gap is ``KL(q* || p(z | x))``, the price of the family; the amortization gap
the price of sharing one encoder over all points. :func:`inference_gaps` finds ``q*`` by
optimizing a :class:`~elbolab.guides.per_point.PerPointGuide` (the guide's own family, its
parameters per point, started at the encoder's output) with the model frozen, and also the best
member of a more flexible family, a per-point Gaussian over all the local latents with a full
covariance (:class:`~elbolab.guides.per_point.PerPointGaussian`, started at the moments of the
amortized guide's draws), whose approximation gap bounds how much a better family could buy.
Every point's parameters are its own, so optimizing the sum of the points' ELBOs with Adam (an
elementwise optimizer) is optimizing each point alone, for a whole batch of points at once.

Each ELBO is ``mean_k log w_k`` over ``num_samples`` fresh draws of its guide; ``log p(x)`` is
the importance-sampled ``log mean_k w_k`` under whichever optimized guide has the larger ELBO
for that point (the proposal closest to the posterior). Both carry Monte Carlo error, so a gap
near zero can come out slightly negative; a clearly negative amortization gap means the
per-point optimization had too few ``steps``.
"""

from __future__ import annotations

__all__ = ["GAP_FAMILIES", "inference_gaps", "plot_inference_gaps"]

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import TransformedDistribution
from tqdm.auto import tqdm

from elbolab.analysis.plots import save_figure
from elbolab.distributions import without_event_dims
from elbolab.errors import InputError
from elbolab.guides.per_point import COVARIANCES, PerPointGaussian, PerPointGuide
from elbolab.inference import get_objective, log_importance_weights
from elbolab.inference.evaluate import evaluation_inputs
from elbolab.inference.objectives import parse_objective_spec
from elbolab.inference.traces import PARTICLE_PLATE

GAP_FAMILIES = COVARIANCES  # the flexible family: a per-point Gaussian with a "full" or "diagonal" covariance
MOMENT_DRAWS = 256  # draws of the amortized guide whose moments start the flexible family
STICKING_THE_LANDING = "elbo-stl:k=16"  # the per-point guides' default objective
PATHWISE = "elbo:k=16"  # ... for a flow family, whose sticking-the-landing gradient needs its inverse


def inference_gaps(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    family: str = "full",
    steps: int = 500,
    num_samples: int = 1000,
    objective: str | None = None,
    learning_rate: float = 0.05,
    batch_size: int = 100,
    progress: bool | None = None,
) -> pd.DataFrame:
    """One row per data point: log p(x), the ELBOs of the amortized and the per-point optimized guides, the two gaps.

    Arguments:
        model, guide: a trained model following the contract, with all its latents per point,
            and its amortized guide (one of elbolab's guide families, see
            :class:`~elbolab.guides.per_point.PerPointGuide`).
        x: data ``[N, ...]`` on the model's device; ``*args``: further per-point tensors.
        family: the flexible family's covariance, ``"full"`` or ``"diagonal"``.
        steps: Adam steps of the per-point optimization.
        num_samples: K, draws per point for each ELBO and for log p(x).
        objective: what the per-point guides maximize, an objective spec. By default
            :data:`STICKING_THE_LANDING` (``elbo-stl:k=16``: its gradient noise vanishes as q
            reaches the posterior) for the Gaussian, mixture and Gaussian-base families, and
            :data:`PATHWISE` (``elbo:k=16``) for a family that is a flow: sticking the landing
            scores draws with the flow's parameters detached, at points the flow did not just
            draw, so it needs the flow's inverse (an autoregressive flow's costs one network
            pass per latent dimension; planar and radial flows have none). Given, it is used
            for both per-point guides; ``iwae-dreg:k=N`` finds the guide of the tightest IWAE
            bound instead, whose ELBO is then not the best of the family.
        learning_rate: Adam's, decayed linearly to a tenth over the steps.
        batch_size: points optimized together.
        progress: a progress bar over the optimization (``None``: only on a terminal).

    Returns:
        A DataFrame indexed by data point with ``log_likelihood``, ``elbo_amortized``,
        ``elbo_optimized`` (the guide's family, per point), ``elbo_<family>`` (the flexible
        family), ``approximation_gap`` = log p(x) - elbo_optimized, ``amortization_gap`` =
        elbo_optimized - elbo_amortized, ``approximation_gap_<family>``, all in nats.

    Example:
        >>> gaps = inference_gaps(model, guide, test_x[:200], steps=500)
        >>> gaps[["approximation_gap", "amortization_gap"]].mean()
    """
    if family not in GAP_FAMILIES:
        raise InputError(f"inference_gaps: family must be one of {GAP_FAMILIES}, got {family!r}")
    for name, value in (("steps", steps), ("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"inference_gaps: {name} must be a positive integer, got {value!r}")
    if not learning_rate > 0:
        raise InputError(f"inference_gaps: learning_rate must be positive, got {learning_rate!r}")
    if objective is not None:
        objective = _objective(objective)
    x, args, contract = evaluation_inputs(model, guide, x, args)
    if contract.global_latents:
        raise InputError(
            f"inference_gaps: the model has global latents {list(contract.global_latents)} outside its data plate "
            f"{contract.data_plate!r}; the gaps are per data point, for models whose latents are all per point"
        )
    # Only the trainable ones, so that restoring them leaves a parameter the user froze frozen.
    frozen = [p for module in (model, guide) if isinstance(module, nn.Module) for p in module.parameters() if p.requires_grad]
    blocks = range(0, x.shape[0], batch_size)
    bar = tqdm(total=2 * steps * len(blocks), desc="per-point guides", unit="step", disable=_disable(progress), leave=False)
    tables = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        with pyro.validation_enabled(False):
            for start in blocks:
                batch = (x[start : start + batch_size], *(a[start : start + batch_size] for a in args))
                tables.append(_gaps_of_batch(model, guide, batch, contract.plate_nesting, family, steps, num_samples,
                                             objective, learning_rate, bar))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        bar.close()
    table = pd.concat(tables, ignore_index=True)
    table.index.name = "point"
    return table


def _gaps_of_batch(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    batch: tuple[Tensor, ...],
    plate_nesting: int,
    family: str,
    steps: int,
    num_samples: int,
    objective: Any | None,
    learning_rate: float,
    bar: Any,
) -> pd.DataFrame:
    size = batch[0].shape[0]
    same = PerPointGuide(guide, *batch)
    draws, is_flow = _draws(guide, batch, plate_nesting)
    flexible = PerPointGaussian.from_draws(model, *batch, draws=draws, covariance=family)
    for per_point, flow in ((same, is_flow), (flexible, False)):
        chosen = objective if objective is not None else _objective(PATHWISE if flow else STICKING_THE_LANDING)
        _maximize(chosen, model, per_point, batch, steps, learning_rate, bar)
    bounds = {}
    for label, q in (("amortized", guide), ("optimized", same), (family, flexible)):
        log_w = log_importance_weights(model, q, *batch, num_samples=num_samples, batch_size=size).double().cpu()  # [K, n]
        bounds[label] = (log_w.mean(0), log_w.logsumexp(0) - math.log(num_samples))
    best = torch.where(bounds["optimized"][0] >= bounds[family][0], bounds["optimized"][1], bounds[family][1])
    elbo = {label: value[0] for label, value in bounds.items()}
    return pd.DataFrame({
        "log_likelihood": best.numpy(),
        "elbo_amortized": elbo["amortized"].numpy(),
        "elbo_optimized": elbo["optimized"].numpy(),
        f"elbo_{family}": elbo[family].numpy(),
        "approximation_gap": (best - elbo["optimized"]).numpy(),
        "amortization_gap": (elbo["optimized"] - elbo["amortized"]).numpy(),
        f"approximation_gap_{family}": (best - elbo[family]).numpy(),
    })


@torch.no_grad()
def _draws(guide: Callable[..., Any], batch: tuple[Tensor, ...], plate_nesting: int) -> tuple[dict[str, Tensor], bool]:
    """:data:`MOMENT_DRAWS` draws of every latent site of the guide, ``[S, n, *event]``, and whether it is a flow.

    A flow: some sample site (an auxiliary one among them, as an automatic guide's ``q(u)``) has a
    ``TransformedDistribution``, under any ``Independent``.
    """
    with poutine.trace() as tracer, pyro.plate(PARTICLE_PLATE, MOMENT_DRAWS, dim=-(plate_nesting + 1)):
        guide(*batch)
    sites = [(name, site) for name, site in tracer.trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]]
    is_flow = any(isinstance(without_event_dims(site["fn"]), TransformedDistribution) for _, site in sites)
    return {name: site["value"] for name, site in sites if not site["infer"].get("is_auxiliary")}, is_flow



def _maximize(
    objective: Any, model: Callable[..., Any], per_point: nn.Module, batch: tuple[Tensor, ...], steps: int,
    learning_rate: float, bar: Any,
) -> None:
    """Adam on the per-point guide's parameters alone; the model's and the amortized guide's are frozen by the caller."""
    parameters = list(per_point.parameters())
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.9 * step / steps)
    for _ in range(steps):
        loss = objective.differentiable_loss(model, per_point, *batch)
        gradients = torch.autograd.grad(loss, parameters)
        if all(torch.isfinite(g).all() for g in gradients):  # a rare overflowing draw: skip its step
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.grad = gradient
            optimizer.step()
        schedule.step()
        bar.update(1)


def _objective(spec: str) -> Any:
    name, options = parse_objective_spec(spec)
    return get_objective(name, **options)


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def plot_inference_gaps(table: pd.DataFrame, path: str | Path, *, max_points: int = 60, title: str | None = None) -> Path:
    """A stacked bar per data point: the approximation gap below the amortization gap, largest total first.

    ``table`` is :func:`inference_gaps`' result; the ``max_points`` points with the largest total
    gap are drawn, next to a bar of the mean over every point; the flexible family's
    approximation gap is marked on each bar. Returns ``path``.
    """
    flexible = next((c for c in table.columns if c.startswith("approximation_gap_")), None)
    if flexible is None or not {"approximation_gap", "amortization_gap"} <= set(table.columns):
        raise InputError(f"plot_inference_gaps: table has columns {list(table.columns)}; it takes inference_gaps' table "
                         "(approximation_gap, amortization_gap, approximation_gap_<family>)")
    total = table["approximation_gap"] + table["amortization_gap"]
    shown = table.loc[total.sort_values(ascending=False).index[:max_points]]
    labels = ["mean"] + [str(point) for point in shown.index]
    approximation = np.concatenate([[table["approximation_gap"].mean()], shown["approximation_gap"].to_numpy()])
    amortization = np.concatenate([[table["amortization_gap"].mean()], shown["amortization_gap"].to_numpy()])
    marks = np.concatenate([[table[flexible].mean()], shown[flexible].to_numpy()])
    figure, axis = plt.subplots(figsize=(max(6.0, 0.18 * len(labels) + 2), 4.0))
    positions = np.arange(len(labels))
    axis.bar(positions, approximation, color="tab:blue", label="approximation gap: log p(x) - ELBO(q*)")
    axis.bar(positions, amortization, bottom=approximation, color="tab:orange",
             label="amortization gap: ELBO(q*) - ELBO(q(z|x))")
    axis.scatter(positions, marks, marker="_", s=120, color="black", zorder=3,
                 label=f"approximation gap of a per-point {flexible.removeprefix('approximation_gap_')}-covariance Gaussian")
    axis.axvline(0.5, color="grey", linewidth=0.8)
    axis.set_xticks(positions, labels, rotation=90, fontsize=7)
    axis.set_xlabel(f"data point (mean over {len(table)}, then the {len(shown)} with the largest gap)")
    axis.set_ylabel("nats")
    axis.set_title(title or "where the amortized guide loses its nats (Cremer et al. 2018)")
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()  # the rotated point labels and the axis label inside the figure
    return save_figure(figure, path)
