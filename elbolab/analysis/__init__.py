"""Figures and diagnostics of trained models."""

from elbolab.analysis.plots import plot_history, plot_image_grid, plot_reconstructions

__all__ = ["plot_history", "plot_image_grid", "plot_reconstructions"]
