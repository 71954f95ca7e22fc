"""Figures, comparisons and diagnostics of trained models."""

from elbolab.analysis.compare import (
    Comparison,
    active_units,
    compare,
    compare_runs,
    summarize,
    to_markdown,
)
from elbolab.analysis.diagnostics import K_HAT_BAD, K_HAT_GOOD, importance_diagnostics
from elbolab.analysis.plots import (
    plot_comparison_curves,
    plot_comparison_summary,
    plot_history,
    plot_image_grid,
    plot_reconstructions,
)

__all__ = [
    "K_HAT_BAD",
    "K_HAT_GOOD",
    "Comparison",
    "active_units",
    "compare",
    "compare_runs",
    "importance_diagnostics",
    "plot_comparison_curves",
    "plot_comparison_summary",
    "plot_history",
    "plot_image_grid",
    "plot_reconstructions",
    "summarize",
    "to_markdown",
]
