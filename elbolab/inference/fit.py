"""Stochastic variational inference: minibatch gradient descent on an objective.

One loop for every model, guide and objective: shuffle, draw a batch (resampling a
dynamically binarized batch), take a gradient step with a plain torch optimizer on the module
parameters. The hot path has no host synchronization: losses and counts of skipped non-finite
steps are accumulated on the device and read once per epoch (the skip counters also every
``_CHECK_EVERY`` steps), a non-finite step is skipped inside fused Adam's kernel, validation runs
between epochs, and Pyro's argument checks run on the first step only (the data were checked
once at the boundary). Checkpoints and exact resumption are in :mod:`.training_checkpoint`.

Launched by ``torchrun`` with several processes, the same loop trains one model data-parallel
(DistributedDataParallel; see :mod:`.distributed`): each rank takes its share of every batch and
the gradients of the whole batch are summed across ranks before the step.
"""

from __future__ import annotations

__all__ = ["FitConfig", "FitResult", "TrainingInterrupted", "fit", "make_adam", "resolve_device"]

import copy
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from elbolab.config import dataclass_from_dict, is_integer, is_real
from elbolab.contract import (
    Contract,
    DataPlateScale,
    check_observed_rows,
    check_pair,
    floating_dtype,
    pair_contract,
)
from elbolab.data import Dataset
from elbolab.data.checks import as_points, check_rows_in_support
from elbolab.errors import InputError
from elbolab.inference.distributed import ProcessGroup, join_process_group, rank_seed
from elbolab.inference.evaluate import CHUNK_ELEMENTS, importance_estimate
from elbolab.inference.objectives import get_objective, no_guide
from elbolab.inference.schedules import kl_warmup
from elbolab.files import remove_stale_temporaries
from elbolab.inference.training_checkpoint import Progress, restore_checkpoint, save_checkpoint

# Steps between reads of the skipped-step counters (a host sync on CUDA): divergence is handled
# at most this many steps late, during which non-finite steps are skipped anyway.
_CHECK_EVERY = 50


@dataclass
class FitConfig:
    """The ``[fit]`` section of a run's config: the options of :func:`fit`.

    Attributes:
        objective: a registry name (see :data:`~elbolab.inference.OBJECTIVES`).
        particles: samples per data point (``num_particles`` of the objective).
        beta: weight of the KL term.
        warmup: epochs over which beta rises linearly from 0 (KL warm-up); 0 for none.
        epochs, batch_size, lr, seed: as named.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        clip_grad_norm, max_bad_steps, max_restorations: divergence handling, as in :func:`fit`.
        checkpoint_every: epochs between training checkpoints.
    """

    objective: str = "elbo"
    particles: int = 1
    beta: float = 1.0
    warmup: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    clip_grad_norm: float | None = None
    max_bad_steps: int = 10
    max_restorations: int = 3
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for name in ("particles", "epochs", "batch_size", "max_bad_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")
        if not is_integer(self.seed) or not 0 <= self.seed < 2**32:
            raise InputError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed}")
        if not is_integer(self.warmup) or self.warmup < 0:
            raise InputError(f"warmup must be a non-negative number of epochs, got {self.warmup}")
        if not is_real(self.beta) or self.beta < 0:
            raise InputError(f"beta must be finite and >= 0, got {self.beta}")
        if not is_real(self.lr) or self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.clip_grad_norm is not None and not (is_real(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise InputError(f"clip_grad_norm must be positive, got {self.clip_grad_norm}")
        restorations = self.max_restorations
        if not is_integer(restorations) or restorations < 0:
            raise InputError(f"max_restorations must be a non-negative integer, got {restorations}")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> FitConfig:
        return dataclass_from_dict(cls, values, source)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model, guide: the trained modules (the same objects that were passed in).
        history: one row per epoch: ``epoch``, ``train_loss`` (objective's loss, nats per data
            point), ``beta``, ``valid_elbo`` (nats per data point; NaN without ``valid``),
            ``seconds`` (training time of the epoch).
        objective: the objective instance used.
        skipped_steps: steps skipped for a non-finite loss or gradient, over the whole run
            (``fit`` also says so on stderr when it ends).
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    history: pd.DataFrame
    objective: Any
    skipped_steps: int = 0


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must name a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any] | None,
    data: Dataset | Tensor,
    *,
    objective: str | Any = "elbo",
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    beta: float = 1.0,
    warmup_epochs: int = 0,
    valid: Dataset | Tensor | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool | None = None,
    args: Sequence[Tensor] = (),
    valid_args: Sequence[Tensor] = (),
    clip_grad_norm: float | None = None,
    max_bad_steps: int = 10,
    max_restorations: int = 3,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    checkpoint_metadata: dict[str, Any] | None = None,
    **objective_kwargs: Any,
) -> FitResult:
    """Train ``model`` and ``guide`` by stochastic gradient descent on an objective.

    Arguments:
        model: a model following the contract, called as ``model(x_batch)``.
        guide: a guide with the model's signature (``None`` for a model without latents,
            under the ``reconstruction`` objective).
        data: training data, a :class:`~elbolab.data.Dataset` or a tensor ``[N, D]``.
        objective: a registry name or an objective instance.
        epochs: passes over the data.
        batch_size: data points per step.
        lr: Adam's learning rate.
        beta: weight of the KL term (beta-VAE); the objective must support it.
        warmup_epochs: epochs over which beta rises linearly from 0 (KL warm-up).
        valid: data for the per-epoch validation ELBO (one sample per point), or ``None``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``. The data go there once (or,
            larger than half a GPU's free memory, stream from pinned host memory). Under
            ``torchrun`` with several processes each rank trains on GPU ``LOCAL_RANK`` (NCCL), or
            on the CPU (gloo), and ``batch_size`` is the global batch; rank 0 alone writes the
            checkpoint, and the history's ``valid_elbo`` is rank 0's (NaN on the others).
        seed: seeds Pyro's, torch's and numpy's RNGs: with the same initial weights the same
            seed gives the same result on CPU.
        progress: progress bar over epochs (``None``: only on a terminal).
        args: further per-data-point tensors ``[N, ...]``, batched with the data and passed after
            it, ``model(x_batch, *args_batch)``: e.g. one-hot labels for a conditional VAE.
        valid_args: the same for ``valid``.
        clip_grad_norm: rescale the gradient to at most this Euclidean norm before each step
            (``None``: no clipping).
        max_bad_steps: a step whose loss or gradient is not finite is skipped (the parameters and
            Adam's moments stay as they were) and counted in the history; after this many in a
            row the parameters and optimizer go back to the state at the end of the last epoch
            and the learning rate is halved.
        max_restorations: after this many restorations, training stops with an
            :class:`~elbolab.errors.InputError` (the last checkpoint is left as it was).
        checkpoint: a file to write the whole training state to (see
            :mod:`~elbolab.inference.training_checkpoint`), every ``checkpoint_every`` epochs, at the
            end, and when the process is asked to stop (Ctrl-C or SIGTERM: the step under way
            finishes, the state is written, and :class:`TrainingInterrupted` is raised).
        checkpoint_every: epochs between checkpoints.
        resume: continue from ``checkpoint`` when it exists. Build the model and guide as for the
            first run; the result is, on CPU, bitwise that of a run never stopped. The
            checkpoint's options (objective, batch size, learning rate, seed, ...) must be these;
            ``epochs`` may be larger, to train on.
        checkpoint_metadata: JSON-serializable data stored in the checkpoint (the CLI stores the
            run's config), read back with :func:`~elbolab.inference.training_checkpoint.read_checkpoint`.
        **objective_kwargs: passed to the objective, e.g. ``num_particles=5``.

    Returns:
        A :class:`FitResult` whose ``history`` has one row per epoch; a model or guide with a
        ``training_report()`` method (the VQ-VAE's codebook usage) adds its values to each row.

    Raises:
        InputError: bad data or options, or training that kept diverging.
        TrainingInterrupted: Ctrl-C or SIGTERM while training with a checkpoint file.

    Example:
        >>> pyro.set_rng_seed(0)
        >>> model, guide = VAE(64, 8, hidden=(128,)), GaussianGuide(64, 8, hidden=(128,))
        >>> result = fit(model, guide, load_dataset("digits", binarize="dynamic"), epochs=20)
        >>> result.history.tail(1)
    """
    FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, beta=beta, warmup=warmup_epochs, seed=seed,
              clip_grad_norm=clip_grad_norm, max_bad_steps=max_bad_steps, max_restorations=max_restorations,
              checkpoint_every=checkpoint_every)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    device = resolve_device(device)
    group = join_process_group(device)  # None unless launched by torchrun with several processes
    if group is not None:
        device = group.device
    if guide is None:
        guide = no_guide
    dtype = floating_dtype(model, guide)
    x, dynamic = _as_matrix(data, "training data", dtype)
    valid_x = None
    if valid is not None:
        valid_x, valid_dynamic = _as_matrix(valid, "validation data", dtype)
        if valid_dynamic:
            valid_x = valid.fixed_binarization(seed).x.to(dtype)  # a fixed draw: comparable across epochs
        if valid_x.shape[1:] != x.shape[1:]:
            raise InputError(
                f"validation data have {tuple(valid_x.shape[1:])} features, training data {tuple(x.shape[1:])}"
            )
        valid_x = valid_x.to(device)
    args = _per_point_args(args, x.shape[0], "args")
    valid_args = _per_point_args(valid_args, valid_x.shape[0] if valid_x is not None else 0, "valid_args")
    if valid_x is not None and len(valid_args) != len(args):
        raise InputError(f"fit was given {len(args)} args for the training data but {len(valid_args)} valid_args")
    objective_name = objective if isinstance(objective, str) else type(objective).__name__
    if isinstance(objective, str):
        objective = get_objective(objective, **objective_kwargs)
    elif objective_kwargs:
        raise InputError("objective options are for an objective given by name, not an instance")
    warmup_steps = warmup_epochs * math.ceil(x.shape[0] / batch_size)
    if (beta != 1.0 or warmup_steps) and not getattr(objective, "supports_beta", False):
        raise InputError(
            f"beta and KL warm-up weight a KL term, which the {type(objective).__name__} objective does not have"
        )

    pyro.set_rng_seed(seed)
    for module in (model, guide):
        if isinstance(module, nn.Module):
            module.to(device).train()
    (x, *args), streaming = _stage((x, *args), device)
    valid_args = tuple(a.to(device) for a in valid_args)

    def fetch_rows(tensor: Tensor, index: Tensor | slice) -> Tensor:
        """Rows of a training tensor, on the device (copied from pinned host memory when streaming)."""
        if not streaming:
            return tensor[index]
        return tensor[index].pin_memory().to(device, non_blocking=True)

    first_batch = fetch_rows(x, slice(0, batch_size))
    first_batch = torch.bernoulli(first_batch) if dynamic else first_batch
    first_args = tuple(fetch_rows(a, slice(0, batch_size)) for a in args)
    contract = _training_contract(model, guide, (first_batch, *first_args), x, batch_size, fetch_rows, args, dynamic)
    if not dynamic and not streaming:
        _check_rows(model, guide, x, args, contract)
    if valid_x is not None:
        _check_rows(model, guide, valid_x, valid_args, contract)
    with _data_plate_scale(contract, x.shape[0], first_batch.shape[0], torch.arange(first_batch.shape[0], device=device)):
        params = _collect_params(model, guide, objective, (first_batch, *first_args))
    if not params:
        raise InputError("the model and guide have no parameters to train")
    optimizer = make_adam(params, lr)
    if getattr(objective, "supports_beta", False):
        objective.beta = beta
    parallel = None
    if group is not None:
        parallel = _DataParallelLoss(group, contract, objective, model, guide, params, (first_batch, *first_args))
        pyro.set_rng_seed(rank_seed(seed, group.rank))
    leader = group is None or group.rank == 0

    options = {
        "objective": objective_name, "objective_options": _as_json(objective_kwargs), "batch_size": batch_size,
        "lr": lr, "beta": beta, "warmup_epochs": warmup_epochs, "seed": seed, "clip_grad_norm": clip_grad_norm,
        "max_bad_steps": max_bad_steps, "max_restorations": max_restorations, "data_shape": list(x.shape),
        "dynamic_binarization": dynamic,
    }
    progress_state, loop = Progress(), {}
    if checkpoint is not None and leader:
        remove_stale_temporaries(checkpoint)
    if checkpoint is not None and resume and checkpoint.exists():
        progress_state, loop = restore_checkpoint(
            checkpoint, model=model, guide=guide, optimizer=optimizer, params=params, options=options
        )
        if progress_state.epoch > epochs:
            raise InputError(f"{checkpoint}: the run has already trained {progress_state.epoch} epochs, more than epochs={epochs}")
        if group is not None:
            _restore_rank_generators(group, loop, seed, progress_state.step)
    # Running sums of the epoch, kept on the device so that the step never waits for the host:
    # loss of the finite steps, their data points, skipped steps, current and longest run of skips.
    tally = loop.get("tally", torch.zeros(5, dtype=torch.float64, device=device))
    order = loop.get("order")
    if order is not None and streaming:
        order = order.cpu()
    last_good = _snapshot(model, guide, optimizer, params)

    def write_checkpoint() -> None:
        state = {"order": order, "tally": tally} if order is not None else {}
        if group is not None:
            state |= _rank_generators(group)  # a collective: every rank takes part, rank 0 writes
        if leader:
            save_checkpoint(
                checkpoint, model=model, guide=guide, optimizer=optimizer, params=params, progress=progress_state,
                loop=state, options=options, metadata=checkpoint_metadata or {},
            )

    def stop_requested(first_of_epoch: bool) -> bool:
        if group is None:
            return stop.signal is not None
        # Every rank must stop at the same step; agreeing costs a host sync, so it is done where
        # the divergence check syncs anyway (torchrun gives workers 30 s after forwarding a signal).
        if not first_of_epoch and progress_state.step % _CHECK_EVERY:
            return False
        return group.any(stop.signal is not None)

    def check_divergence() -> None:
        """Restore the last good state and halve the learning rate after a run of skipped steps."""
        nonlocal last_good
        if tally[4].item() < max_bad_steps:
            return
        progress_state.restorations += 1
        lr_now = optimizer.param_groups[0]["lr"]
        if progress_state.restorations > max_restorations:
            where = f"; the last good checkpoint is {checkpoint}" if checkpoint is not None else ""
            raise InputError(
                f"training diverged: {max_bad_steps} non-finite losses or gradients in a row, again after "
                f"{max_restorations} restorations of the last good state with the learning rate halved "
                f"(now {lr_now:.3g}){where}; lower the learning rate or clip gradients (clip_grad_norm)"
            )
        _restore(last_good, model, guide, optimizer, params)
        for group in optimizer.param_groups:
            group["lr"] = lr_now / 2
        tally[3:].zero_()

    take_step = _step_function(optimizer, params, clip_grad_norm)
    rows = progress_state.history
    bar = tqdm(range(progress_state.epoch + 1, epochs + 1), desc="fit", unit="epoch", initial=progress_state.epoch,
               total=epochs, disable=(None if progress is None else not progress) if leader else True)
    # Argument checks of Pyro and torch.distributions cost a host sync per site (e.g. that
    # Bernoulli data are 0/1); they ran on the first step in _collect_params.
    with pyro.validation_enabled(False), _deferred_stop(enabled=checkpoint is not None) as stop:
        for epoch in bar:
            start = time.perf_counter()
            if order is None:
                order = _epoch_order(x.shape[0], device, group)
                if streaming:  # host rows are gathered with host indices: one copy per epoch
                    order = order.cpu()
                tally[:3].zero_()  # a run of skipped steps may go on into the new epoch
            batches = order.split(batch_size)
            for index in range(progress_state.batch, len(batches)):
                if stop_requested(index == progress_state.batch):
                    progress_state.batch = index
                    progress_state.epoch_seconds += time.perf_counter() - start
                    write_checkpoint()
                    raise TrainingInterrupted(checkpoint, epoch, index, len(batches), stop.signal or signal.SIGTERM)
                batch_index = batches[index]
                if warmup_steps:
                    objective.beta = kl_warmup(progress_state.step, warmup_steps, beta)
                points = batch_index.shape[0]
                if parallel is not None:
                    if points < group.world_size:  # a last batch too small to give every rank a point
                        continue
                    batch_index = group.shard(batch_index)
                batch = fetch_rows(x, batch_index)
                if dynamic:
                    batch = torch.bernoulli(batch)
                batch_args = tuple(fetch_rows(a, batch_index) for a in args)
                optimizer.zero_grad(set_to_none=True)
                with _data_plate_scale(contract, x.shape[0], points, batch_index):
                    if parallel is None:
                        loss = objective.differentiable_loss(model, guide, batch, *batch_args)
                        loss.backward()
                        loss = loss.detach()
                    else:
                        loss = parallel.loss_and_gradients(batch, *batch_args)
                # Under a data-plate scale N/B the loss estimates the whole data set's; the tally
                # keeps the batch's share, so that the epoch's mean is nats per data point.
                take_step(loss if not contract.needs_scaling else loss * (points / x.shape[0]), points, tally)
                progress_state.step += 1
                if progress_state.step % _CHECK_EVERY == 0:
                    check_divergence()
            check_divergence()
            loss_sum, points, skipped = tally[:3].tolist()
            train_loss = loss_sum / points if points else math.nan
            seconds = progress_state.epoch_seconds + time.perf_counter() - start
            valid_elbo = math.nan
            if valid_x is not None and leader:  # the history other ranks return lacks it
                _set_train(model, guide, False)
                valid_elbo = importance_estimate(model, guide, valid_x, *valid_args, num_samples=1).elbo.mean().item()
                _set_train(model, guide, True)
            report = {}
            for module in (model, guide):
                report |= module.training_report() if hasattr(module, "training_report") else {}
            rows.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "beta": getattr(objective, "beta", math.nan),
                    "valid_elbo": valid_elbo,
                    "seconds": seconds,
                    "skipped_steps": int(skipped),
                    "restorations": progress_state.restorations,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                | report
            )
            order = None
            progress_state.epoch, progress_state.batch, progress_state.epoch_seconds = epoch, 0, 0.0
            last_good = _snapshot(model, guide, optimizer, params)
            if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
                write_checkpoint()
            bar.set_postfix(loss=f"{train_loss:.3f}", valid_elbo=f"{valid_elbo:.3f}", **{k: f"{v:.4g}" for k, v in report.items()})
    _set_train(model, guide, False)
    history = pd.DataFrame(rows)
    skipped_steps = int(history["skipped_steps"].sum()) if "skipped_steps" in history else 0
    if skipped_steps and leader and progress is not False:
        print(
            f"fit: skipped {skipped_steps} of {progress_state.step} steps whose loss or gradient was not finite "
            f"({progress_state.restorations} restorations with a halved learning rate); see the history's skipped_steps",
            file=sys.stderr,
        )
    return FitResult(model, guide if guide is not no_guide else None, history, objective, skipped_steps)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after writing its state to ``checkpoint``."""

    def __init__(self, checkpoint: Path | None, epoch: int, batch: int, batches: int, signum: int) -> None:
        super().__init__(f"interrupted in epoch {epoch} after batch {batch} of {batches}")
        self.checkpoint, self.epoch, self.batch, self.batches, self.signum = checkpoint, epoch, batch, batches, signum


# Training data up to this fraction of the GPU's free memory are moved there once; larger data
# stay in pinned host memory and stream over, batch by batch, leaving the GPU to the networks.
DEVICE_DATA_FRACTION = 0.5


def _stage(tensors: tuple[Tensor, ...], device: torch.device) -> tuple[tuple[Tensor, ...], bool]:
    """The training tensors where the loop reads them, and whether their batches stream from the host.

    On a GPU, data that fit in :data:`DEVICE_DATA_FRACTION` of its free memory are copied there
    once and batches are gathered on the device (no copy per step); larger data are pinned on
    the host and each batch is copied asynchronously (``non_blocking``), overlapping the step.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(t.nbytes for t in tensors) > DEVICE_DATA_FRACTION * free:
            return tuple(t.cpu().pin_memory() for t in tensors), True
    return tuple(t.to(device) for t in tensors), False


class _DataParallelLoss:
    """The objective of a global batch, computed across ranks with DistributedDataParallel.

    Each rank computes its slice's loss (a sum over its data points) and back-propagates it
    times the number of ranks, so that DDP's average of the gradients is the gradient of the
    global batch's sum. Parameters outside any module (``pyro.param`` sites of a plain Pyro
    function) are not DDP's: their gradients are averaged by one all-reduce of their own.
    """

    def __init__(self, group: ProcessGroup, contract: Contract, objective: Any, model: Any, guide: Any,
                 params: list[Tensor], first_batch: tuple[Tensor, ...]) -> None:
        if contract.global_latents:
            raise InputError(
                f"data-parallel training splits the data plate across processes; the model's latent site "
                f"{contract.global_latents[0]!r} sits outside it (a global latent), whose KL term every rank would count: "
                "train it in one process"
            )
        self.group = group
        self.wrapper = wrapper = _ObjectiveModule(objective, model, guide)
        owned = {id(p) for p in wrapper.parameters()}
        self.loose = [p for p in params if id(p) not in owned]
        for p in self.loose:  # DDP broadcasts module state from rank 0 when built; these need it too
            with torch.no_grad():
                group.broadcast(p.data)
        self.ddp = None
        if owned:
            # DDP's reducer waits for a gradient of every parameter unless told some go unused
            # (e.g. the decoder of a conditional model's other branch); finding out costs a graph
            # traversal per step, so it is asked for only when the first batch shows the need.
            self.ddp = nn.parallel.DistributedDataParallel(
                wrapper, find_unused_parameters=_has_unused_parameters(wrapper, first_batch)
            )

    def loss_and_gradients(self, *batch: Tensor) -> Tensor:
        """Fill every parameter's ``.grad`` with the global batch's gradient; return its loss, the same on every rank."""
        world = self.group.world_size
        loss = self.ddp(*batch) if self.ddp is not None else self.wrapper(*batch)
        (loss * world).backward()
        if self.loose:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.loose]
            flat = self.group.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
            for p, averaged in zip(self.loose, flat.split([p.numel() for p in self.loose]), strict=True):
                p.grad = averaged.view_as(p)
        return self.group.all_reduce_sum(loss.detach().clone())


class _ObjectiveModule(nn.Module):
    """``objective(model, guide, batch)`` as a module's forward, so that DDP can wrap it."""

    def __init__(self, objective: Any, model: Any, guide: Any) -> None:
        super().__init__()
        self.objective, self.model, self.guide = objective, model, guide

    def forward(self, *batch: Tensor) -> Tensor:
        return self.objective.differentiable_loss(self.model, self.guide, *batch)


def _has_unused_parameters(module: nn.Module, batch: tuple[Tensor, ...]) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    state = copy.deepcopy(module.state_dict())  # a trial run must not move e.g. a VQ codebook's averages
    with torch.random.fork_rng(devices=[p.device for p in params if p.is_cuda][:1]):
        grads = torch.autograd.grad(module(*batch), params, allow_unused=True)
    module.load_state_dict(state)
    return any(g is None for g in grads)


def _training_contract(model: Any, guide: Any, first: tuple[Tensor, ...], x: Tensor, batch_size: int,
                       fetch_rows: Callable[..., Tensor], args: tuple[Tensor, ...], dynamic: bool) -> Contract:
    """The pair's contract, checked on the first batch and on a short last one; a subsampling plate must state N."""
    num_points = x.shape[0]
    contract = pair_contract(model, guide, first)
    if contract.subsamples_input:
        raise InputError(
            f"the model subsamples the data it is given (its plate {contract.data_plate!r} over the {first[0].shape[0]} "
            "points of a batch draws a subsample of them); fit passes minibatches itself: declare the plate on the "
            f"batch, pyro.plate({contract.data_plate!r}, len(x)), or with the full size, "
            f"pyro.plate({contract.data_plate!r}, N, subsample_size=len(x))"
        )
    if contract.full_size is not None and contract.full_size != num_points:
        raise InputError(
            f"the model's data plate {contract.data_plate!r} states {contract.full_size} data points "
            f"(pyro.plate({contract.data_plate!r}, {contract.full_size}, subsample_size=...)), but the training "
            f"data have {num_points}: its scale full_size / batch would make every loss wrong"
        )
    last = num_points % batch_size
    if last and num_points > batch_size:
        rows = slice(num_points - last, num_points)
        last_x = fetch_rows(x, rows)
        if dynamic:
            with torch.random.fork_rng(devices=[last_x.device] if last_x.is_cuda else []):
                last_x = torch.bernoulli(last_x)
        check_pair(model, guide, (last_x, *(fetch_rows(a, rows) for a in args)))  # not cached: a new size
    return contract


def _check_rows(model: Any, guide: Any, x: Tensor, args: tuple[Tensor, ...], contract: Contract) -> None:
    """Every row of the data inside its observed sites' supports, before training.

    Where the model observes ``x`` itself, one elementwise check of ``x`` against the site's
    support; otherwise one pass of the model without gradients.
    """
    if contract.input_support is not None:
        name, support = contract.input_support
        try:
            check_rows_in_support(x, support, "the data", name)
        except (RuntimeError, NotImplementedError):
            pass  # a support that cannot check a value (a dependent one): left to the density
        return
    chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])) // 4)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        check_observed_rows(model, guide, (x[rows], *(a[rows] for a in args)), contract, offset=start)


def _data_plate_scale(contract: Contract, num_points: int, batch_points: int, batch_index: Tensor) -> Any:
    """The scale ``N / B`` on the data plate where the objective needs it (see :class:`DataPlateScale`).

    ``batch_points`` is the global batch's size (under data parallelism ``batch_index`` is this
    rank's share of it: the subsample of its data plate).
    """
    if not contract.needs_scaling:
        return nullcontext()
    return DataPlateScale(contract.plates, num_points / batch_points, batch_index)


def _epoch_order(num_points: int, device: torch.device, group: ProcessGroup | None) -> Tensor:
    """The epoch's random order of the data points: rank 0's on every rank."""
    if group is None:
        return torch.randperm(num_points, device=device)
    order = torch.randperm(num_points, device=device) if group.rank == 0 else torch.empty(num_points, dtype=torch.long, device=device)
    return group.broadcast(order)


def _rank_generators(group: ProcessGroup) -> dict[str, Tensor]:
    """Every rank's torch generator states (CPU, and its GPU's), gathered for rank 0's checkpoint."""
    states = {f"rank.{r}.torch": state for r, state in enumerate(group.gather(torch.get_rng_state()))}
    if group.device.type == "cuda":
        cuda = group.gather(torch.cuda.get_rng_state(group.device))
        states |= {f"rank.{r}.cuda": state for r, state in enumerate(cuda)}
    return states


def _restore_rank_generators(group: ProcessGroup, loop: dict[str, Tensor], seed: int, step: int) -> None:
    """Put this rank's generators back as the checkpoint recorded them.

    A checkpoint written with fewer processes has no state for this rank: it then starts a
    stream of its own from its seed and the step.
    """
    saved = loop.get(f"rank.{group.rank}.torch")
    if saved is None:
        pyro.set_rng_seed((rank_seed(seed, group.rank) + step) % 2**32)
        return
    torch.set_rng_state(saved.cpu())
    if group.device.type == "cuda" and f"rank.{group.rank}.cuda" in loop:
        torch.cuda.set_rng_state(loop[f"rank.{group.rank}.cuda"].cpu(), group.device)


def _step_function(optimizer: torch.optim.Optimizer, params: list[Tensor], clip_grad_norm: float | None):
    """The optimizer step that skips non-finite losses and gradients, without a host sync.

    Fused Adam takes a ``found_inf`` flag (the one torch's GradScaler sets) and leaves parameters,
    moments and step count untouched when it is set, so the decision stays on the device.
    Another optimizer needs the flag on the host.
    """
    fused = bool(optimizer.defaults.get("fused"))

    def take_step(loss: Tensor, batch_points: int, tally: Tensor) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=loss.device)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, norm, foreach=True)
        if fused:
            optimizer.found_inf = (~finite).float()
            optimizer.step()
        elif finite.item():
            optimizer.step()
        bad = (~finite).double()
        tally[:3] += torch.stack([torch.where(finite, loss.double(), 0.0), finite * float(batch_points), bad])
        tally[3].add_(1).mul_(bad)  # length of the current run of skipped steps
        torch.maximum(tally[4], tally[3], out=tally[4])

    return take_step


def _snapshot(model: Any, guide: Any, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, Any]:
    """A copy of everything a restoration puts back: module state, parameters, optimizer state."""
    return copy.deepcopy({
        "modules": [m.state_dict() if isinstance(m, nn.Module) else None for m in (model, guide)],
        "params": [p.detach() for p in params],
        "optimizer": optimizer.state_dict(),
    })


def _restore(snapshot: dict[str, Any], model: Any, guide: Any, optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    # Copies again: Adam's load_state_dict keeps the given tensors, which the steps then update in place.
    snapshot = copy.deepcopy(snapshot)
    for module, state in zip((model, guide), snapshot["modules"], strict=True):
        if state is not None:
            module.load_state_dict(state)
    with torch.no_grad():
        for p, saved in zip(params, snapshot["params"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(snapshot["optimizer"])


class _StopRequest:
    signal: int | None = None


@contextmanager
def _deferred_stop(enabled: bool) -> Iterator[_StopRequest]:
    """Turn Ctrl-C and SIGTERM into a request that the loop honours between steps.

    A signal in the middle of a step would leave it half done (gradients computed, parameters
    not updated); deferring it to the next batch boundary lets the loop write a consistent
    checkpoint first. A second signal interrupts at once.
    """
    request = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _as_json(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=repr))


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where every parameter allows it.

    The fused step updates all parameters in one kernel instead of about ten per parameter
    tensor: on 2 CPU cores it takes 0.4 ms instead of 1.1 ms for a 784-400-20 VAE, a sixth of
    a training step (benchmarks/RESULTS.md). Same update rule, same results up to rounding.
    """
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fusable or None)


def _as_matrix(data: Dataset | Tensor, what: str, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """The data as a tensor of the model's dtype, checked (a numpy array is converted), and whether it is dynamically binarized."""
    if isinstance(data, Dataset):
        return data.x.to(dtype), data.dynamic_binarization
    if not isinstance(data, Tensor) and not isinstance(data, np.ndarray):
        raise InputError(f"{what} must be a Dataset, a tensor or a numpy array, got {type(data).__name__}")
    return as_points(data, what, dtype=dtype), False


def _per_point_args(args: Sequence[Tensor], num_points: int, what: str) -> tuple[Tensor, ...]:
    args = tuple(args)
    for index, arg in enumerate(args):
        if not isinstance(arg, Tensor) or arg.ndim == 0 or arg.shape[0] != num_points:
            shape = tuple(arg.shape) if isinstance(arg, Tensor) else type(arg).__name__
            raise InputError(f"{what}[{index}] must be a tensor with one row per data point ({num_points}), got {shape}")
        if arg.is_floating_point() and not torch.isfinite(arg).all():
            raise InputError(f"{what}[{index}] contains NaN or infinite values")
    return args


def _collect_params(model: Any, guide: Any, objective: Any, batch: tuple[Tensor, ...]) -> list[Tensor]:
    """Module parameters plus any ``pyro.param`` sites, found by one validated run of the loss.

    Tracing params (as Pyro's SVI does) supports plain Pyro functions that declare parameters
    with ``pyro.param`` or ``pyro.module``; that first run also checks the model against the data.
    """
    with poutine.trace(param_only=True) as param_capture:
        try:
            objective.differentiable_loss(model, guide, *batch)
        except ValueError as error:
            if isinstance(error, InputError):
                raise
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"the model rejects the data: {first_line}") from None
    found: dict[int, Tensor] = {}
    for module in (model, guide):
        if isinstance(module, nn.Module):
            found.update((id(p), p) for p in module.parameters() if p.requires_grad)
    for site in param_capture.trace.nodes.values():
        value = site["value"].unconstrained()
        found.setdefault(id(value), value)
    return list(found.values())


def _set_train(model: Any, guide: Any, mode: bool) -> None:
    for module in (model, guide):
        if isinstance(module, nn.Module):
            module.train(mode)
