"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one safetensors file (written atomically by :mod:`elbolab.files`):

    model.*, guide.*     module state (parameters and buffers, e.g. a VQ codebook's EMA sums)
    param.N              trainable tensors outside any module (``pyro.param`` sites), by optimizer index
    optimizer.N.KEY      the optimizer's per-parameter state (Adam's step and moments)
    rng.torch, rng.cuda.N   the generators' states
    loop.order, loop.tally  the unfinished epoch's data order and running sums, when stopped mid-epoch
    loop.rank.R.torch, loop.rank.R.cuda   each rank's generators, in data-parallel training

and a JSON header entry ``"training"`` with the rest: epochs and batches done, steps taken,
restorations, the optimizer's hyperparameters (its learning rate after any halving), Python's
and NumPy's generator states, the history so far, the options of ``fit`` that must not change
on resume, and whatever the caller attaches (the CLI attaches the run's config).

Restoring all of this into freshly built modules and optimizer and continuing gives, on CPU,
bit-for-bit the weights of a run that was never stopped: same data order, same batches, same
noise, same Adam moments.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_FILE",
    "Progress",
    "RunCheckpoint",
    "load_module_state",
    "read_checkpoint",
    "restore_checkpoint",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
]

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.files import load_tensors, remove_stale_temporaries, save_tensors
from elbolab.inference.distributed import ProcessGroup, rank_generators, restore_rank_generators

CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class Progress:
    """Where a training run stands, besides its tensors.

    Attributes:
        epoch: epochs finished.
        batch: batches of epoch ``epoch + 1`` finished (0 at an epoch boundary).
        step: batches processed since the start, skipped ones included (KL warm-up counts them).
        restorations: times the last good state was restored after a run of non-finite steps.
        epoch_seconds: training time already spent in the unfinished epoch.
        history: one dict per finished epoch (the rows of ``FitResult.history``).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    restorations: int = 0
    epoch_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The states of torch's (CPU and CUDA), Python's and NumPy's generators: tensors and JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    """Set every generator to the state :func:`rng_state` recorded."""
    torch.set_rng_state(tensors["rng.torch"].cpu())
    cuda = [tensors[name].cpu() for name in sorted(tensors, key=_index_after_prefix) if name.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, python_state, gauss = plain["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def load_module_state(module: nn.Module, tensors: dict[str, Tensor], prefix: str, path: Path) -> None:
    """Load the ``prefix``-ed tensors into ``module`` strictly; a mismatch names the file."""
    state = {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else ""
        raise InputError(
            f"{path}: weights do not fit the configured {prefix.rstrip('.')} ({first} {detail})".rstrip()
        ) from None


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A checkpoint's tensors and its ``"training"`` header (progress, options, attached metadata).

    Raises:
        InputError: the file is missing, truncated, corrupted, from a newer format, or not a
            training checkpoint.
    """
    path = Path(path)
    tensors, header = load_tensors(path, device)
    try:
        training = json.loads(header["training"])
        Progress(**training["progress"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise InputError(f"{path}: not an elbolab training checkpoint (no training state in its header)") from None
    return tensors, training


def save_checkpoint(
    path: Path,
    *,
    model: Any,
    guide: Any,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    progress: Progress,
    loop: dict[str, Tensor],
    options: dict[str, Any],
    metadata: dict[str, Any],
) -> None:
    """Write everything :func:`restore_checkpoint` needs into one safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    owned: set[int] = set()
    for prefix, module in (("model.", model), ("guide.", guide)):
        if isinstance(module, nn.Module):
            tensors |= {prefix + name: value for name, value in module.state_dict().items()}
            owned |= {id(p) for p in module.parameters()}
    tensors |= {f"param.{i}": p for i, p in enumerate(params) if id(p) not in owned}
    state = optimizer.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {key!r} is not a tensor")
            tensors[f"optimizer.{index}.{key}"] = value
    generators, generator_plain = rng_state()
    tensors |= generators | {f"loop.{name}": value for name, value in loop.items()}
    training = {
        "progress": asdict(progress),
        "num_params": len(params),
        "param_groups": state["param_groups"],
        "rng": generator_plain,
        "options": options,
        "metadata": metadata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, {"training": json.dumps(training, allow_nan=True)})


def restore_checkpoint(
    path: Path,
    *,
    model: Any,
    guide: Any,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    options: dict[str, Any],
) -> tuple[Progress, dict[str, Tensor]]:
    """Load a checkpoint written by :func:`save_checkpoint` into freshly built modules and optimizer.

    Returns the progress and the ``loop.*`` tensors (without their prefix). Options that differ
    from those the checkpoint was written with are refused, naming the file and the option.
    """
    device = params[0].device
    tensors, training = read_checkpoint(path, device)
    for key, value in training["options"].items():
        if options.get(key) != value:
            raise InputError(
                f"{path}: this checkpoint was written with {key}={value!r}, not {key}={options.get(key)!r}; "
                "resume with the options it was trained with"
            )
    for prefix, module in (("model.", model), ("guide.", guide)):
        if isinstance(module, nn.Module):
            load_module_state(module, tensors, prefix, path)
    if training["num_params"] != len(params):
        raise InputError(
            f"{path}: written for {training['num_params']} trainable tensors, this model and guide have {len(params)}"
        )
    with torch.no_grad():
        for i, p in enumerate(params):
            if f"param.{i}" in tensors:
                p.copy_(tensors[f"param.{i}"])
    per_param: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    for index, entries in per_param.items():
        for key, value in entries.items():
            if value.ndim and (index >= len(params) or value.shape != params[index].shape):
                raise InputError(f"{path}: optimizer state {index}.{key} has shape {tuple(value.shape)}, "
                                 "which fits no parameter of this model and guide")
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": training["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"{path}: optimizer state does not fit this model and guide ({error})") from None
    restore_rng_state(tensors, training["rng"])
    loop = {name.removeprefix("loop."): value for name, value in tensors.items() if name.startswith("loop.")}
    return Progress(**training["progress"]), loop


@dataclass
class RunCheckpoint:
    """The checkpoint file of one training run, bound to the state it saves and restores.

    Under data parallelism every rank takes part in :meth:`save` (the ranks' generator states
    are gathered), and rank 0 alone writes the file.

    Attributes:
        path: the file (``None``: the run writes no checkpoint).
        model, guide, optimizer, params: what :func:`save_checkpoint` saves.
        options: the options of ``fit`` that must not change on resume.
        metadata: JSON-serializable data stored with them.
        group: the data-parallel process group, or ``None``.
    """

    path: Path | None
    model: Any
    guide: Any
    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    options: dict[str, Any]
    metadata: dict[str, Any]
    group: ProcessGroup | None = None

    def start(self, resume: bool, epochs: int, seed: int) -> tuple[Progress, dict[str, Tensor]]:
        """Where training starts: the checkpoint's progress and ``loop.*`` tensors when resuming one, else nothing done.

        Temporary files of a write that a killed process left are removed first.
        """
        if self.path is None:
            return Progress(), {}
        if self.group is None or self.group.rank == 0:
            remove_stale_temporaries(self.path)
        if not (resume and self.path.exists()):
            return Progress(), {}
        progress, loop = restore_checkpoint(self.path, model=self.model, guide=self.guide, optimizer=self.optimizer,
                                            params=self.params, options=self.options)
        if progress.epoch > epochs:
            raise InputError(f"{self.path}: the run has already trained {progress.epoch} epochs, more than epochs={epochs}")
        if self.group is not None:
            restore_rank_generators(self.group, loop, seed, progress.step)
        return progress, loop

    def save(self, progress: Progress, order: Tensor | None, tally: Tensor) -> None:
        """Write the state; mid-epoch (``order`` set) also the epoch's data order and running sums."""
        loop = {"order": order, "tally": tally} if order is not None else {}
        if self.group is not None:
            loop |= rank_generators(self.group)  # a collective: every rank takes part, rank 0 writes
        if self.group is None or self.group.rank == 0:
            save_checkpoint(self.path, model=self.model, guide=self.guide, optimizer=self.optimizer, params=self.params,
                            progress=progress, loop=loop, options=self.options, metadata=self.metadata)


def _index_after_prefix(name: str) -> int:
    tail = name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1
