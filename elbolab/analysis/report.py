"""Every diagnostic of a trained model on one data split, written to a folder: what ``elbolab diagnose`` runs.

One call computes the per-point importance diagnostics (PSIS k-hat, ESS, log p(x), ELBO, gap), an
``InferenceData`` with posterior predictive replicas, unit activity and KL per latent dimension,
and draws the figures a user looks at to see where the amortized guide fails:

    diagnostics.csv          one row per data point (see importance_diagnostics), with its label
    inference_data.nc        to_inference_data of points spread over the data, netCDF
    khat.png                 PSIS k-hat per point, 0.5 and 0.7 marked (ArviZ's plot_khat)
    gap_histogram.png        log p(x) - ELBO over points
    latent_scatter.png       posterior means in 2-D, by label and by k-hat
    kl_per_dimension.png     KL per latent dimension, inactive units grey (diagonal-Gaussian guides)
    worst_best_khat.png      the worst-k-hat points and their reconstructions, above the best  (images)
    interpolations.png       linear and spherical paths between test points                    (images)
    traversals.png           the most informative latent dimensions swept over +-3             (images)
    ppc_images.png           observed images above images replicated from their posteriors     (images)
    ppc_statistics.png       ArviZ's posterior predictive check of per-image statistics         (images)
    gaps.csv, gaps.png       approximation and amortization gaps of points spread over the data  (gaps=N)

Files are written to a temporary folder first and moved into place at the end, so a failure leaves
the folder as it was.
"""

from __future__ import annotations

__all__ = ["Diagnosis", "diagnose"]

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from torch import Tensor

from elbolab.analysis.diagnostics import (
    IMAGE_STATISTICS,
    K_HAT_BAD,
    K_HAT_GOOD,
    importance_diagnostics,
    plot_khat,
    plot_ppc_statistics,
    save_inference_data,
    to_inference_data,
)
from elbolab.analysis.gaps import inference_gaps, plot_inference_gaps
from elbolab.analysis.latent import (
    ACTIVE_UNIT_THRESHOLD,
    interpolate,
    kl_per_dimension,
    latent_projection,
    traverse,
    unit_activity,
)
from elbolab.analysis.plots import (
    plot_gap_histogram,
    plot_image_rows,
    plot_kl_per_dimension,
    plot_latent_scatter,
)
from elbolab.errors import InputError
from elbolab.files import atomic_write
from elbolab.guides.per_point import require_local_parameters
from elbolab.models.draws import decode_posterior_draws

TRAVERSAL_VALUES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found: the per-point table, a summary, the per-dimension table, the files."""

    table: pd.DataFrame
    summary: dict[str, Any]
    dimensions: pd.DataFrame
    files: list[Path]


def diagnose(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    folder: str | Path,
    *,
    labels: Tensor | None = None,
    image_shape: tuple[int, int] | None = None,
    binary: bool = False,
    num_samples: int = 1000,
    draws: int = 50,
    inference_points: int = 500,
    objective: str | None = None,
    attrs: Mapping[str, str | int | float] | None = None,
    point_ids: Sequence[int] | None = None,
    progress: bool | None = None,
    gaps: int = 0,
    gap_steps: int = 500,
) -> Diagnosis:
    """Compute every diagnostic of ``model`` and ``guide`` on ``x`` and write it into ``folder``.

    Arguments:
        model, guide: a trained model following the contract and its guide.
        x: data ``[N, D]`` on the model's device; ``labels``: optional class labels ``[N]``.
        folder: where to write (created if missing; files of the same names are replaced).
        image_shape: ``(height, width)`` of image rows; the image figures need it.
        binary: the data are 0/1 (the predictive check then uses the on-pixel count alone,
            which is the mean intensity times D).
        num_samples: importance samples per point for the table (K).
        draws: posterior draws per point in ``inference_data.nc``.
        inference_points: how many points ``inference_data.nc`` holds, evenly spaced over ``x``
            (data sets are often sorted by class); its size grows as ``draws * points * D``.
        objective, attrs: recorded in the InferenceData's attributes.
        point_ids: what to call the points (the table's index ``point`` and the InferenceData's
            ``obs``), e.g. their rows in the full split when ``x`` is a subset; default 0 .. N-1.
        progress: progress bar of the importance sampling (``None``: only on a terminal).
        gaps: how many points, evenly spaced over ``x``, get their approximation and amortization
            gaps (:func:`~elbolab.analysis.gaps.inference_gaps`, ``gap_steps`` steps per point,
            ``num_samples`` draws per ELBO); 0: none.

    Returns:
        A :class:`Diagnosis`.
    """
    if inference_points < 1 or draws < 1:
        raise InputError("inference_points and draws must be positive")
    if gaps:
        require_local_parameters(guide)  # before minutes of other diagnostics, not after
    folder = Path(folder)
    num_points = x.shape[0]
    point_ids = np.arange(num_points) if point_ids is None else np.asarray(point_ids, dtype=np.int64)
    if point_ids.shape != (num_points,):
        raise InputError(f"point_ids holds {point_ids.size} entries for {num_points} data points")
    if labels is not None and labels.shape != (num_points,):
        raise InputError(f"labels must be one per data point, [{num_points}], got shape {tuple(labels.shape)}")
    folder.mkdir(parents=True, exist_ok=True)
    with pyro.validation_enabled(False):
        table = importance_diagnostics(model, guide, x, num_samples=num_samples, progress=progress)
        rows = _spread(num_points, inference_points)
        picked = torch.as_tensor(rows, device=x.device)
        statistics = None
        if image_shape is not None:  # for 0/1 images the mean intensity is the on-pixel count over D
            statistics = {"on_pixels": IMAGE_STATISTICS["on_pixels"]} if binary else IMAGE_STATISTICS
        idata = to_inference_data(model, guide, x[picked], num_samples=draws,
                                  labels=labels[picked.cpu()] if labels is not None else None, statistics=statistics,
                                  objective=objective, attrs=attrs, obs=point_ids[rows])
        dimensions = unit_activity(guide, x)
        try:
            dimensions = dimensions.merge(kl_per_dimension(model, guide, x), on=["site", "dim"])
        except InputError as error:
            kl_note = str(error)
        else:
            kl_note = None
        coords, axis_labels = latent_projection(guide, x)
    gap_table = None
    if gaps:
        gap_rows = _spread(num_points, gaps)
        gap_table = inference_gaps(model, guide, x[torch.as_tensor(gap_rows, device=x.device)], steps=gap_steps,
                                   num_samples=num_samples, progress=progress)
        gap_table.index = pd.Index(point_ids[gap_rows], name="point")

    if labels is not None:
        table.insert(0, "label", labels.cpu().numpy())
    table.index = pd.Index(point_ids, name="point")
    summary = _summary(table, dimensions, num_samples, kl_note)
    if gap_table is not None:
        summary |= {"gap_points": len(gap_table), "gap_steps": gap_steps,
                    **{f"{column}_mean": float(gap_table[column].mean()) for column in gap_table.columns if "gap" in column}}

    with tempfile.TemporaryDirectory(dir=folder, prefix=".diagnose-") as tmp:
        out = Path(tmp)
        atomic_write(out / "diagnostics.csv", table.to_csv().encode())
        save_inference_data(idata, out / "inference_data.nc")
        plot_khat(table["pareto_k"].to_numpy(), out / "khat.png",
                  title=f"PSIS k-hat of q(z|x) per data point (K = {num_samples})")
        plot_gap_histogram(table, out / "gap_histogram.png")
        plot_latent_scatter(coords, axis_labels, out / "latent_scatter.png",
                            labels=labels.cpu().numpy() if labels is not None else None,
                            pareto_k=table["pareto_k"].to_numpy())
        if "kl" in dimensions:
            plot_kl_per_dimension(dimensions, out / "kl_per_dimension.png")
        if gap_table is not None:
            atomic_write(out / "gaps.csv", gap_table.to_csv().encode())
            plot_inference_gaps(gap_table, out / "gaps.png")
        if image_shape is not None:
            with pyro.validation_enabled(False):
                _image_figures(model, guide, x, table, dimensions, idata, image_shape, labels, out, binary)
        files = []
        for path in sorted(out.iterdir()):
            os.replace(path, folder / path.name)
            files.append(folder / path.name)
    return Diagnosis(table, summary, dimensions, files)


def _spread(count: int, chosen: int) -> np.ndarray:
    """``chosen`` row numbers evenly spaced over ``0 .. count - 1`` (all of them when ``chosen >= count``)."""
    if chosen >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, chosen).round().astype(np.int64))


def _summary(table: pd.DataFrame, dimensions: pd.DataFrame, num_samples: int, kl_note: str | None) -> dict[str, Any]:
    k_hat = table["pareto_k"]
    summary: dict[str, Any] = {
        "points": len(table),
        "num_samples": num_samples,
        "khat_above_0.7": float((k_hat > K_HAT_BAD).mean()),
        "khat_0.5_to_0.7": float(((k_hat > K_HAT_GOOD) & (k_hat <= K_HAT_BAD)).mean()),
        "log_likelihood": float(table["log_likelihood"].mean()),
        "elbo": float(table["elbo"].mean()),
        "gap_mean": float(table["gap"].mean()),
        "gap_median": float(table["gap"].median()),
        "ess_fraction": float(table["ess"].mean() / num_samples),
        "active_units": int((dimensions["activity"] > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_dims": len(dimensions),
    }
    if "kl" in dimensions:
        summary["kl"] = float(dimensions["kl"].sum())
    else:
        summary["kl_per_dimension"] = f"not computed: {kl_note}"
    return summary


def _image_figures(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    table: pd.DataFrame,
    dimensions: pd.DataFrame,
    idata: Any,
    image_shape: tuple[int, int],
    labels: Tensor | None,
    out: Path,
    binary: bool,
) -> None:
    k_hat = table["pareto_k"].to_numpy()
    point_ids = table.index.to_numpy()
    order = np.argsort(np.where(np.isfinite(k_hat), k_hat, -np.inf), kind="stable")
    count = min(8, len(order) // 2) or 1
    worst, best = order[::-1][:count].copy(), order[:count].copy()

    def captions(points: np.ndarray) -> list[str]:
        return [f"#{point_ids[p]} $\\hat{{k}}$ {k_hat[p]:.2f}" + (f" y={int(labels[p])}" if labels is not None else "")
                for p in points]

    worst_x, best_x = x[torch.as_tensor(worst)], x[torch.as_tensor(best)]
    plot_image_rows([
        ("worst $\\hat{k}$:\ninput", worst_x, captions(worst)),
        ("reconstruction", decode_posterior_draws(model, guide, worst_x), None),
        ("best $\\hat{k}$:\ninput", best_x, captions(best)),
        ("reconstruction", decode_posterior_draws(model, guide, best_x), None),
    ], image_shape, out / "worst_best_khat.png",
        title=f"the points q(z|x) handles worst (highest PSIS k-hat) and best; k-hat > {K_HAT_BAD}: unreliable")

    pairs = _interpolation_pairs(labels, x.shape[0])
    steps = 8
    rows = []
    for number, (a, b) in enumerate(pairs):
        for method in ("linear", "spherical"):
            path = interpolate(model, guide, x[a], x[b], steps, method=method)
            header = ["x_a", *[f"t={t:.2f}" for t in np.linspace(0, 1, steps)], "x_b"] if not rows else None
            rows.append((f"pair {number + 1}\n{method}", torch.cat([x[a : a + 1], path, x[b : b + 1]]), header))
    plot_image_rows(rows, image_shape, out / "interpolations.png",
                    title="interpolations between posterior means, decoded (inputs at the ends)")

    ranking = "kl" if "kl" in dimensions else "activity"
    top = dimensions.sort_values(ranking, ascending=False).head(8)
    rows = []
    for site, dim, score in zip(top["site"], top["dim"], top[ranking], strict=True):
        images = traverse(model, guide, x[0], site=site, dims=[int(dim)], values=TRAVERSAL_VALUES)[0]
        header = [f"{v:+.0f}" for v in TRAVERSAL_VALUES] if not rows else None
        rows.append((f"{site}[{dim}]\n{ranking} {score:.2f}", images, header))
    plot_image_rows(rows, image_shape, out / "traversals.png",
                    title=f"traversals from point {point_ids[0]}: one latent dimension set to each value (largest {ranking} first)")

    observed = torch.as_tensor(idata.observed_data["x"].values[:8])
    replicas = idata.posterior_predictive["x"].values[0, :3, :8]  # [draws, points, D]
    rows = [("observed", observed, [f"point {p}" for p in idata.observed_data["obs"].values[:8]])]
    rows += [(f"replica {s + 1}", torch.as_tensor(replicas[s]), None) for s in range(replicas.shape[0])]
    plot_image_rows(rows, image_shape, out / "ppc_images.png",
                    title="posterior predictive: x ~ p(x | z), z ~ q(z | x_observed)")
    plot_ppc_statistics(idata, out / "ppc_statistics.png", ["on_pixels"] if binary else ["mean_intensity", "on_pixels"])


def _interpolation_pairs(labels: Tensor | None, num_points: int) -> list[tuple[int, int]]:
    """Three pairs of points to interpolate between: of different classes when labels are known."""
    if labels is None:
        ends = _spread(num_points, 6)
        return [(int(ends[i]), int(ends[i + 1])) for i in range(0, len(ends) - 1, 2)]
    labels = labels.cpu().numpy()
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    pairs = [(firsts[i], firsts[i + 1]) for i in range(0, len(firsts) - 1, 2)][:3]
    return pairs or [(0, min(1, num_points - 1))]
