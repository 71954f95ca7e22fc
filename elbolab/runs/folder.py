"""Run folders: a fitted run on disk, weights as safetensors, config and metrics as JSON, history as CSV.

Nothing here unpickles: safetensors holds raw tensors only, the rest is text. A run folder:

    config.json           RunConfig: [data], [model], [guide], [fit] sections, data shape, format version
    weights.safetensors   model and guide state, keys prefixed "model." and "guide."
    history.csv           one row per epoch (see FitResult)
    checkpoint.safetensors  the training state for `elbolab fit --resume` (elbolab/inference/training_checkpoint.py)
    metrics.json          written by `elbolab evaluate`
"""

from __future__ import annotations

__all__ = [
    "CONFIG_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "WEIGHTS_FILE",
    "Run",
    "checkpointed_config",
    "load_run",
    "save_run",
    "unfinished_run",
]

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from elbolab.errors import InputError
from elbolab.files import atomic_write, load_tensors, read_json, save_tensors, write_json
from elbolab.inference.training_checkpoint import (
    CHECKPOINT_FILE,
    load_module_state,
    read_checkpoint,
)
from elbolab.runs.config import RunConfig

CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE, METRICS_FILE = (
    "config.json",
    "weights.safetensors",
    "history.csv",
    "metrics.json",
)


@dataclass
class Run:
    """A run loaded from disk: rebuilt model and guide with their weights, config and history."""

    path: Path
    config: RunConfig
    model: nn.Module
    guide: nn.Module | None
    history: pd.DataFrame


def save_run(
    path: str | Path,
    config: RunConfig,
    model: nn.Module,
    guide: nn.Module | None,
    history: pd.DataFrame,
) -> Path:
    """Write a run folder's history, config and weights, each atomically and the weights last.

    A folder is a finished run once ``weights.safetensors`` is in it; a process killed before
    that leaves at most the other files and the training checkpoint, from which ``--resume``
    finishes the run.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if guide is not None:
        tensors |= {f"guide.{k}": v for k, v in guide.state_dict().items()}
    atomic_write(path / HISTORY_FILE, history.to_csv(index=False).encode())
    write_json(path / CONFIG_FILE, config.to_dict())
    save_tensors(path / WEIGHTS_FILE, tensors)
    return path


def unfinished_run(path: Path) -> str | None:
    """If ``path`` holds a run whose training has not finished, a sentence saying how far it got."""
    checkpoint = path / CHECKPOINT_FILE
    if (path / WEIGHTS_FILE).exists() or not checkpoint.exists():
        return None
    try:
        _, training = read_checkpoint(checkpoint)
    except InputError as error:
        return f"holds an unfinished run whose checkpoint cannot be read ({error})"
    epochs, done = training["metadata"].get("fit", {}).get("epochs", "?"), training["progress"]["epoch"]
    if done == epochs:
        return f"holds a run whose {done} epochs of training finished but whose weights were not written"
    return f"holds an unfinished run, stopped after epoch {done} of {epochs}"


def checkpointed_config(path: Path) -> tuple[RunConfig, int]:
    """The config of the run in folder ``path`` as its training checkpoint recorded it, and the epochs it has done."""
    if not path.is_dir():
        raise InputError(f"{path}: no such run folder")
    checkpoint = path / CHECKPOINT_FILE
    if not checkpoint.exists():
        raise InputError(f"{path}: no {CHECKPOINT_FILE} to resume from (it is written after the first epoch)")
    _, training = read_checkpoint(checkpoint)
    config = RunConfig.from_dict(training["metadata"], source=f"{checkpoint} (its run config)", written=True)
    return config, training["progress"]["epoch"]


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a run's model and guide from its folder and load their weights onto ``device``.

    Example:
        >>> run = load_run("runs/digits-elbo")
        >>> log_likelihood(run.model, run.guide, test_x)
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such run folder")
    unfinished = unfinished_run(path)
    if unfinished:
        raise InputError(f"{path} {unfinished}; finish it with: elbolab fit --resume {path}")
    config_path = path / CONFIG_FILE
    try:
        config = RunConfig.from_dict(read_json(config_path), source=str(config_path), written=True)
    except InputError as error:
        if str(config_path) in str(error):
            raise
        raise InputError(f"{config_path}: {error}") from None
    if config.x_dim is None:
        raise InputError(f"{path / CONFIG_FILE}: x_dim is missing; was this run fitted?")
    model = config.new_model()
    guide = config.new_guide(model)
    weights_path = path / WEIGHTS_FILE
    tensors, _ = load_tensors(weights_path)
    for prefix, module in (("model.", model), ("guide.", guide)):
        if module is not None:
            load_module_state(module, tensors, prefix, weights_path)
            module.to(device).eval()
    history_path = path / HISTORY_FILE
    history = _read_history(history_path) if history_path.exists() else pd.DataFrame()
    return Run(path, config, model, guide, history)


def _read_history(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable history table ({str(error).splitlines()[0]})") from None
