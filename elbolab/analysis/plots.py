"""Figures of a run: learning curves, image grids, reconstructions, and the diagnostics of ``diagnose``.

Written with matplotlib's non-interactive Agg backend, to PNG files, each atomically through
:func:`save_figure`: a figure on disk is whole or absent.
"""

from __future__ import annotations

__all__ = [
    "plot_comparison_curves",
    "plot_comparison_summary",
    "plot_gap_histogram",
    "plot_history",
    "plot_image_grid",
    "plot_image_rows",
    "plot_kl_per_dimension",
    "plot_latent_scatter",
    "plot_reconstructions",
    "save_figure",
]

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import Tensor

from elbolab.analysis.latent import ACTIVE_UNIT_THRESHOLD
from elbolab.files import atomic_path


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format of its extension, and free the figure.

    Every figure of elbolab is saved here, so that an interrupted write leaves the old file or none.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # the temporary's name ends in .tmp: the format comes from path
            fig.savefig(tmp, format=path.suffix[1:] or plt.rcParams["savefig.format"])
    finally:
        plt.close(fig)
    return path


def _finish(fig: plt.Figure, ax: plt.Axes, path: str | Path) -> Path:
    """Grid, legend, layout; write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_history(history: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Training loss and validation -ELBO per epoch (nats per data point; lower is better)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(history["epoch"], history["train_loss"], label="training loss (−ELBO$_\\beta$)")
    if "valid_elbo" in history and history["valid_elbo"].notna().any():
        ax.plot(history["epoch"], -history["valid_elbo"], label="validation −ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.set_title(title or "learning curves")
    return _finish(fig, ax, path)


def _show_grid(axes, images: Tensor, image_shape: tuple[int, int]) -> None:
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image.detach().cpu().reshape(image_shape).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_axis_off()


def plot_image_grid(
    images: Tensor, image_shape: tuple[int, int], path: str | Path, title: str = "", columns: int = 8
) -> Path:
    """A grid of images (rows of ``images`` reshaped to ``image_shape``, values clipped to [0, 1])."""
    rows = math.ceil(images.shape[0] / columns)
    height, width = image_shape
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9 * width / height + 0.2, rows * 0.9 + 0.5),
                             dpi=120, squeeze=False)
    _show_grid(axes, images, image_shape)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reconstructions(
    inputs: Tensor, reconstructions: Tensor, image_shape: tuple[int, int], path: str | Path, columns: int = 8
) -> Path:
    """Inputs (top row of each pair) above their reconstructions (bottom row)."""
    n = inputs.shape[0]
    pairs = math.ceil(n / columns)
    height, width = image_shape
    fig, axes = plt.subplots(2 * pairs, columns, figsize=(columns * 0.9 * width / height + 0.2, 2 * pairs * 0.9 + 0.5),
                             dpi=120, squeeze=False)
    for p in range(pairs):
        chunk = slice(p * columns, (p + 1) * columns)
        _show_grid(axes[2 * p : 2 * p + 1], inputs[chunk], image_shape)
        _show_grid(axes[2 * p + 1 : 2 * p + 2], reconstructions[chunk], image_shape)
        axes[2 * p, 0].set_title("input", fontsize=8, loc="left")
        axes[2 * p + 1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_comparison_curves(histories: pd.DataFrame, path: str | Path) -> Path:
    """Every run's per-epoch curve on one axis, one colour per objective.

    The validation ELBO when it was recorded (comparable across objectives), else each
    objective's own training loss.
    """
    use_valid = "valid_elbo" in histories and histories["valid_elbo"].notna().any()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (objective, runs) in enumerate(histories.groupby("objective", sort=False)):
        for number, (_, run) in enumerate(runs.groupby("seed")):
            values = run["valid_elbo"] if use_valid else -run["train_loss"]
            ax.plot(run["epoch"], values, color=colours[index % len(colours)], alpha=0.8,
                    label=objective if number == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats per data point)" if use_valid else "−training loss (nats per data point)")
    ax.set_title("learning curves, one line per run")
    return _finish(fig, ax, path)


def plot_comparison_summary(summary: pd.DataFrame, path: str | Path, num_samples: int) -> Path:
    """Test log-likelihood and ELBO per objective, mean ± standard error over seeds."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(summary) + 2), 4.5), dpi=120)
    positions = range(len(summary))
    ax.errorbar([p - 0.1 for p in positions], summary["test_log_likelihood"], yerr=summary["test_log_likelihood_se"],
                fmt="o", capsize=4, label=f"log p(x), K = {num_samples}")
    ax.errorbar([p + 0.1 for p in positions], summary["test_elbo"], yerr=summary["test_elbo_se"],
                fmt="s", capsize=4, label="ELBO")
    ax.set_xticks(list(positions), summary["objective"], rotation=20, ha="right")
    ax.set_ylabel("nats per test point (higher is better)")
    ax.set_title("test log-likelihood by objective (mean ± s.e. over seeds)")
    return _finish(fig, ax, path)


def plot_image_rows(
    rows: list[tuple[str, Tensor, list[str] | None]],
    image_shape: tuple[int, int],
    path: str | Path,
    title: str = "",
) -> Path:
    """Labelled rows of images: each row ``(label, images [n, D], captions or None)``, one image per column."""
    columns = max(images.shape[0] for _, images, _ in rows)
    height, width = image_shape
    cell = 0.85
    fig, axes = plt.subplots(len(rows), columns, dpi=120, squeeze=False, layout="constrained",
                             figsize=(1.2 + columns * cell * width / height, len(rows) * (cell + 0.12) + (0.5 if title else 0.2)))
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    for r, (label, images, captions) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < images.shape[0]:
                ax.imshow(images[c].detach().cpu().reshape(image_shape).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
                if captions:
                    ax.set_title(captions[c], fontsize=7, pad=2)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_gap_histogram(table: pd.DataFrame, path: str | Path) -> Path:
    """Histogram over data points of ``log p(x) - ELBO``: how far q is from each point's posterior."""
    gap = table["gap"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.hist(gap, bins=min(60, max(10, len(gap) // 20)), color="C0", alpha=0.8)
    ax.axvline(gap.mean(), color="C3", label=f"mean {gap.mean():.2f} nats")
    ax.axvline(np.median(gap), color="C1", linestyle="--", label=f"median {np.median(gap):.2f} nats")
    ax.set_xlabel("log p(x) − ELBO per data point (nats; a lower bound on KL(q || p(z|x)))")
    ax.set_ylabel("data points")
    ax.set_title("the variational gap, point by point")
    return _finish(fig, ax, path)


def plot_latent_scatter(
    coords: np.ndarray,
    axis_labels: tuple[str, str],
    path: str | Path,
    *,
    labels: np.ndarray | None = None,
    pareto_k: np.ndarray | None = None,
) -> Path:
    """Posterior means in 2-D, one panel coloured by class label and/or one by PSIS k-hat."""
    panels = [(name, values) for name, values in (("label", labels), ("k-hat", pareto_k)) if values is not None]
    if not panels:
        panels = [("", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), dpi=120, squeeze=False)
    size = 4 if len(coords) > 2000 else 10
    for ax, (name, values) in zip(axes[0], panels, strict=True):
        if name == "label":
            for label in np.unique(values):
                chosen = values == label
                ax.scatter(coords[chosen, 0], coords[chosen, 1], s=size, alpha=0.6, label=str(label))
            ax.legend(title="label", fontsize=7, markerscale=2, loc="best", ncols=2)
            ax.set_title("posterior means by class label", fontsize=10)
        elif name == "k-hat":
            shown = np.where(np.isfinite(values), values, np.nan)
            order = np.argsort(np.nan_to_num(shown, nan=-np.inf))  # worst points on top
            points = ax.scatter(coords[order, 0], coords[order, 1], c=shown[order], s=size, cmap="viridis",
                                vmin=0.0, vmax=max(1.0, float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0))
            fig.colorbar(points, ax=ax, label="PSIS k-hat (> 0.7: q unreliable)")
            ax.set_title("posterior means by PSIS k-hat", fontsize=10)
        else:
            ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.6)
            ax.set_title("posterior means", fontsize=10)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_kl_per_dimension(
    table: pd.DataFrame, path: str | Path, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> Path:
    """KL(q(z_d|x) || p(z_d)) per latent dimension, largest first; bars of inactive units in grey.

    ``table`` has columns ``site``, ``dim``, ``kl`` and ``activity`` (see
    :func:`~elbolab.analysis.unit_activity`); a unit is active when its activity exceeds ``threshold``.
    """
    ordered = table.sort_values("kl", ascending=False).reset_index(drop=True)
    active = ordered["activity"] > threshold
    several_sites = ordered["site"].nunique() > 1
    names = [f"{s}[{d}]" if several_sites else str(d) for s, d in zip(ordered["site"], ordered["dim"], strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(ordered) + 2), 4), dpi=120)
    ax.bar(range(len(ordered)), ordered["kl"], color=np.where(active, "C0", "0.7"))
    ax.set_xticks(range(len(ordered)), names, rotation=90 if len(ordered) > 20 else 0, fontsize=7)
    ax.set_xlabel("latent dimension" + ("" if several_sites else f" of {ordered['site'].iloc[0]!r}") + ", largest KL first")
    ax.set_ylabel("KL(q(z_d | x) || p(z_d)), nats (mean over points)")
    ax.set_title(f"KL per latent dimension: {int(active.sum())} of {len(ordered)} units active "
                 f"(Cov_x E[z_d|x] > {threshold})", fontsize=10)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="C0", label="active"),
                       plt.Rectangle((0, 0), 1, 1, color="0.7", label="inactive (collapsed)")], fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
