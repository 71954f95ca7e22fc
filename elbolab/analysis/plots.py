"""Figures of a run: learning curves, image grids, reconstructions next to their inputs.

Written with matplotlib's non-interactive Agg backend, straight to PNG files.
"""

from __future__ import annotations

__all__ = ["plot_comparison_curves", "plot_comparison_summary", "plot_history", "plot_image_grid", "plot_reconstructions"]

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from torch import Tensor


def _finish(fig: plt.Figure, ax: plt.Axes, path: str | Path) -> Path:
    """Grid, legend, layout; write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
