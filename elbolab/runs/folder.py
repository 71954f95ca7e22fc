"""Runs on disk: weights as safetensors, config and metrics as JSON, history as CSV.

Nothing here unpickles: safetensors holds raw tensors only, the rest is text. A run folder:

    config.json           RunConfig: [data], [model], [guide], [fit] sections, data shape, format version
    weights.safetensors   model and guide state, keys prefixed "model." and "guide."
    history.csv           one row per epoch (see FitResult)
    checkpoint.safetensors  the training state for `elbolab fit --resume` (elbolab/inference/training_checkpoint.py)
    metrics.json          written by `elbolab evaluate`
"""

from __future__ import annotations

__all__ = [
    "FORMAT_VERSION",
    "Run",
    "RunConfig",
    "build_run_guide",
    "build_run_model",
    "load_run",
    "read_json",
    "save_run",
    "unfinished_run",
    "write_json",
]

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from elbolab.config import is_integer
from elbolab.data import DataConfig
from elbolab.errors import InputError, closest_names
from elbolab.guides import GuideConfig
from elbolab.guides.config import MODEL_GUIDES, build_model_guide
from elbolab.inference.fit import FitConfig
from elbolab.files import (
    FORMAT_VERSION,
    atomic_write,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from elbolab.inference.training_checkpoint import CHECKPOINT_FILE, load_module_state, read_checkpoint
from elbolab.models import ModelConfig, build_model

CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE, METRICS_FILE = (
    "config.json",
    "weights.safetensors",
    "history.csv",
    "metrics.json",
)


@dataclass
class RunConfig:
    """Everything that defines a run: what a TOML config file or the CLI flags fill.

    Attributes:
        data, model, fit, guide: the four sections (a config without ``[guide]`` has the model's default guide).
        x_dim, image_shape: the shape of the training data, recorded when the run is fitted so
            that the model can be rebuilt without reading the data.
        y_dim: the number of classes a ``cvae`` is conditioned on, recorded likewise.

    A guide family left unset becomes the model's default (see
    :data:`~elbolab.guides.config.MODEL_GUIDES`); one the model does not take is an error.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    x_dim: int | None = None
    image_shape: tuple[int, int] | None = None
    y_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("x_dim", "y_dim"):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and value >= 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        shape = self.image_shape
        if shape is not None and not (
            len(shape) == 2 and all(is_integer(v) and v >= 1 for v in shape) and shape[0] * shape[1] == self.x_dim
        ):
            raise InputError(f"image_shape must be two positive integers whose product is x_dim ({self.x_dim}), got {shape!r}")
        families = MODEL_GUIDES[self.model.name]
        if self.model.name == "autoencoder":
            self.guide.family = "none"  # it has no latents: any guide option is moot
        elif self.guide.family is None:
            self.guide.family = families[0]
        elif self.guide.family not in families:
            raise InputError(
                f"the {self.model.name} model takes the guides {', '.join(families)}, not {self.guide.family!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "data": self.data.to_dict(),
            "model": self.model.to_dict(),
            "guide": self.guide.to_dict(),
            "fit": self.fit.to_dict(),
            "x_dim": self.x_dim,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "y_dim": self.y_dim,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from nested dicts (a TOML file, config.json); unknown keys are errors."""
        raw = dict(raw)
        version = raw.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            newer = "newer than this elbolab reads; upgrade elbolab to read it" if is_integer(version) and version > FORMAT_VERSION else "not supported"
            raise InputError(f"{source}: format version {version!r} is {newer} (this elbolab reads {FORMAT_VERSION})")
        sections = {"data": DataConfig, "model": ModelConfig, "guide": GuideConfig, "fit": FitConfig}
        shapes = ("x_dim", "image_shape", "y_dim")
        unknown = set(raw) - set(sections) - set(shapes)
        if unknown:
            key = sorted(unknown)[0]
            raise InputError(f"{source}: unknown key {key!r}; {closest_names(key, [*sections, *shapes])}")
        built = {
            name: section_cls.from_dict(raw.get(name, {}), source=f"{source} [{name}]")
            for name, section_cls in sections.items()
        }
        image_shape = raw.get("image_shape")
        if image_shape is not None and not isinstance(image_shape, list):
            raise InputError(f"{source}: image_shape must be a list [height, width], got {image_shape!r}")
        return cls(
            **built, x_dim=raw.get("x_dim"), image_shape=tuple(image_shape) if image_shape else None, y_dim=raw.get("y_dim")
        )


@dataclass
class Run:
    """A run loaded from disk: rebuilt model and guide with their weights, config and history."""

    path: Path
    config: RunConfig
    model: nn.Module
    guide: nn.Module | None
    history: pd.DataFrame


def build_run_model(config: RunConfig, x_dim: int) -> nn.Module:
    """A run's model, freshly initialised, for data of width ``x_dim``."""
    if config.model.name == "cvae" and config.y_dim is None:
        raise InputError("a cvae run needs y_dim, the number of classes it is conditioned on")
    return build_model(config.model, x_dim, config.y_dim)


def build_run_guide(config: RunConfig, model: nn.Module) -> nn.Module | None:
    """A run's guide for its ``model``: none for the autoencoder, else the ``[guide]`` family."""
    return build_model_guide(config.guide, model)


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
        config = RunConfig.from_dict(read_json(config_path), source=str(config_path))
    except InputError as error:
        if str(config_path) in str(error):
            raise
        raise InputError(f"{config_path}: {error}") from None
    if config.x_dim is None:
        raise InputError(f"{path / CONFIG_FILE}: x_dim is missing; was this run fitted?")
    model = build_run_model(config, config.x_dim)
    guide = build_run_guide(config, model)
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
