"""Run folders: a fitted model and guide on disk, with the config that rebuilds them.

Layer: above :mod:`elbolab.families` (a run's config is checked against its family, and its
model and guide are rebuilt by it), below the CLI.
"""

from elbolab.runs.config import RunConfig
from elbolab.runs.folder import Run, load_run, save_run, unfinished_run

__all__ = ["Run", "RunConfig", "load_run", "save_run", "unfinished_run"]
