"""Stochastic variational inference: minibatch gradient descent on an objective.

One loop for every model, guide and objective: shuffle, draw a batch (resampling a
dynamically binarized batch), take a gradient step with a plain torch optimizer on the module
parameters. The hot path has no host synchronization: losses and counts of skipped non-finite
steps are accumulated on the device and read once per epoch (the skip counters also every
``CHECK_EVERY`` steps), a non-finite step is skipped inside fused Adam's kernel, validation runs
between epochs, and Pyro's argument checks run on the first step only (the data were checked
once at the boundary).

:func:`fit` reads as the algorithm; each concern it calls on has a module of its own:
:mod:`.staging` (where the data live, how a batch is gathered), :mod:`.checks` (the pair against
the data, once), :mod:`.step` (the optimizer step, running sums, divergence handling),
:mod:`.stopping` (Ctrl-C and SIGTERM between steps), :mod:`.training_checkpoint` (exact
resumption) and :mod:`.distributed` (the same loop data-parallel under ``torchrun``: each rank
takes its share of every batch and the gradients of the whole batch are summed across ranks).
"""

from __future__ import annotations

__all__ = ["FitConfig", "FitResult", "TrainingInterrupted", "fit", "resolve_device"]

import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from elbolab.config import dataclass_from_dict, is_integer, is_real
from elbolab.contract import floating_dtype
from elbolab.data import Dataset
from elbolab.errors import InputError
from elbolab.inference.checks import check_rows, training_contract
from elbolab.inference.compiled import CompiledStep, NotTraceable
from elbolab.inference.distributed import (
    DataParallelLoss,
    agree_to_stop,
    epoch_order,
    join_process_group,
    rank_seed,
)
from elbolab.inference.evaluate import importance_estimate
from elbolab.inference.objectives import as_objective, get_objective, no_guide, parse_objective_spec
from elbolab.inference.schedules import kl_warmup
from elbolab.inference.staging import StagedData, as_matrix, per_point_args, validation_data
from elbolab.inference.step import (
    CHECK_EVERY,
    DivergenceGuard,
    RunningSums,
    collect_params,
    data_plate_scale,
    make_adam,
    step_function,
)
from elbolab.inference.stopping import TrainingInterrupted, deferred_stop
from elbolab.inference.training_checkpoint import Progress, RunCheckpoint
from elbolab.programs import as_module


@dataclass
class FitConfig:
    """The options of :func:`fit`, and the ``[fit]`` section of a run's config; ``fit``'s keywords use the same names.

    Attributes:
        objective: a registry name (see :data:`~elbolab.inference.OBJECTIVES`) or a spec with
            options, ``"iwae:k=5"``, ``"renyi:alpha=0.5:k=5"`` (see
            :func:`~elbolab.inference.objectives.parse_objective_spec`).
        particles: samples per data point: the objective's ``num_particles``, unless the spec
            says ``k`` (``reconstruction`` takes none). A ``fit`` given neither a config nor
            ``particles=`` leaves the objective's own default (IWAE's 5), as a spec does in
            :func:`~elbolab.analysis.compare.compare_runs`.
        beta: weight of the KL term (beta-VAE); the objective must support it.
        warmup: epochs over which beta rises linearly from 0 (KL warm-up); 0 for none.
        epochs: passes over the data (a resumed run may be given more, to train on).
        batch_size: data points per step; under ``torchrun``, the global batch, split across ranks.
        lr: Adam's learning rate.
        seed: seeds Pyro's, torch's and numpy's generators: with the same initial weights the
            same seed gives the same result on CPU.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The data
            go there once, or, larger than half a GPU's free memory, stream from pinned host
            memory (:mod:`~elbolab.inference.staging`). Under ``torchrun`` with several
            processes each rank trains on GPU ``LOCAL_RANK`` (NCCL), or on the CPU (gloo); rank 0
            alone writes the checkpoint, and the history's ``valid_elbo`` is rank 0's (NaN on the
            others).
        clip_grad_norm: rescale the gradient to at most this Euclidean norm before each step
            (``None``: no clipping).
        max_bad_steps: a step whose loss or gradient is not finite is skipped (the parameters
            and Adam's moments stay as they were) and counted in the history; after this many in
            a row the parameters and optimizer go back to the state at the end of the last epoch
            and the learning rate is halved (:mod:`~elbolab.inference.step`).
        max_restorations: after this many restorations, training stops with an
            :class:`~elbolab.errors.InputError` (the last checkpoint is left as it was).
        checkpoint_every: epochs between training checkpoints.
        compile: trace the training step once per batch shape into a static graph and compile it
            (:mod:`~elbolab.inference.compiled`: Inductor, and CUDA graphs on a GPU); a step that
            cannot be traced trains eagerly, and ``fit`` says why on stderr. Same noise, same
            results up to rounding; the compile time is kept out of the epochs' ``seconds``.
        max_minutes: a budget of training time (the epochs' ``seconds``, so compiling and
            validation excluded): training ends after the last epoch that, judged by the
            previous one's time, ends within it, even if fewer than ``epochs`` ran (``None``: no
            budget). A run stopped by its budget resumes like any other, to train on.
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
    compile: bool = False
    max_minutes: float | None = None

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
        if self.max_minutes is not None and not (is_real(self.max_minutes) and self.max_minutes > 0):
            raise InputError(f"max_minutes must be a positive number of minutes, got {self.max_minutes!r}")
        if not isinstance(self.compile, bool):
            raise InputError(f"compile must be true or false, got {self.compile!r}")
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
        compile_seconds: time spent tracing and compiling the step (``compile=True``), which the
            history's ``seconds`` leave out.
        compiled: whether the steps ran compiled (``False`` after a fallback to the eager step).
        not_compiled: with ``compile=True``, why the step could not be traced (``None`` when it
            was, or when compiling was not asked for).
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    history: pd.DataFrame
    objective: Any
    skipped_steps: int = 0
    compile_seconds: float = 0.0
    compiled: bool = False
    not_compiled: str | None = None


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
    config: FitConfig | None = None,
    *,
    valid: Dataset | Tensor | None = None,
    args: Sequence[Tensor] = (),
    valid_args: Sequence[Tensor] = (),
    progress: bool | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    checkpoint_metadata: dict[str, Any] | None = None,
    monitor: Any = None,
    **options: Any,
) -> FitResult:
    """Train ``model`` and ``guide`` by stochastic gradient descent on an objective.

    Arguments:
        model: a model following the contract, called as ``model(x_batch, *args_batch)``.
        guide: a guide with the model's signature (``None`` for a model without latents,
            under the ``reconstruction`` objective).
        data: training data, a :class:`~elbolab.data.Dataset` or a tensor ``[N, D]``.
        config: the training options (:class:`FitConfig`: objective, epochs, batch size, ...);
            ``None``: FitConfig's defaults.
        valid: data for the per-epoch validation ELBO (one sample per point), or ``None``.
        args: further per-data-point tensors ``[N, ...]``, batched with the data and passed after
            it, ``model(x_batch, *args_batch)``: e.g. one-hot labels for a conditional VAE.
        valid_args: the same for ``valid``.
        progress: progress bar over epochs (``None``: only on a terminal).
        checkpoint: a file to write the whole training state to (see
            :mod:`~elbolab.inference.training_checkpoint`), every ``checkpoint_every`` epochs, at the
            end, and when the process is asked to stop (Ctrl-C or SIGTERM: the step under way
            finishes, the state is written, and :class:`TrainingInterrupted` is raised).
        resume: continue from ``checkpoint`` when it exists. Build the model and guide as for the
            first run; the result is, on CPU, bitwise that of a run never stopped. The
            checkpoint's options (objective, batch size, learning rate, seed, ...) must be these;
            ``epochs`` may be larger, to train on.
        checkpoint_metadata: JSON-serializable data stored in the checkpoint (the CLI stores the
            run's config), read back with :func:`~elbolab.inference.training_checkpoint.read_checkpoint`.
        monitor: an object told of every step and epoch (rank 0 only), e.g. a
            :class:`~elbolab.runs.tensorboard.TensorBoardMonitor`: ``monitor.step(step, sums, beta, lr)``
            after each step, with ``sums`` the epoch's running ``loss, points, skipped`` on the
            device (copy them; reading them syncs the host), and ``monitor.epoch(row, model,
            guide)`` after each epoch with its history row. ``None``: nothing is told, and the
            loop is as without it.
        **options: FitConfig's fields by name, overriding ``config`` (``epochs=20``,
            ``objective="iwae:k=5"``, ``"pyro:TraceEnum_ELBO"``; ``objective`` may also be an objective instance,
            a ``pyro.infer.ELBO`` among them), and any
            other keyword is an option of the objective, passed to
            :func:`~elbolab.inference.get_objective` (``alpha=0.5``).

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
    config, objective, objective_name, objective_options = _settle_options(config, options)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    device = resolve_device(config.device)
    group = join_process_group(device)  # None unless launched by torchrun with several processes
    device = group.device if group is not None else device
    leader = group is None or group.rank == 0
    guide = no_guide if guide is None else guide
    model, guide = as_module(model), as_module(guide)  # modules behind a wrapper such as config_enumerate(model)

    # The data, checked and staged; the pair, checked against them.
    dtype = floating_dtype(model, guide)
    x, dynamic = as_matrix(data, "training data", dtype)
    args = per_point_args(args, x.shape[0], "args")
    valid_x, valid_args = validation_data(valid, valid_args, x, len(args), dtype, config.seed, device)
    pyro.set_rng_seed(config.seed)
    _to_device_for_training(model, guide, device)  # before staging: the data get what memory the networks leave
    train = StagedData(x, args, dynamic, device)
    first = train.rows(slice(0, config.batch_size))
    contract = training_contract(model, guide, train, config.batch_size, first)
    if not dynamic and not train.streaming:
        check_rows(model, guide, train.x, train.args, contract)
    if valid_x is not None:
        check_rows(model, guide, valid_x, valid_args, contract)

    # The step: parameters found by one validated run of the loss, Adam, and the data-parallel loss.
    first_points = first[0].shape[0]
    with data_plate_scale(contract, train.num_points, first_points, torch.arange(first_points, device=device)):
        params = collect_params(model, guide, objective, first)
    optimizer = make_adam(params, config.lr)
    if getattr(objective, "supports_beta", False):
        objective.beta = config.beta
    parallel = None
    if group is not None:
        parallel = DataParallelLoss(group, contract, objective, model, guide, params, first)
        pyro.set_rng_seed(rank_seed(config.seed, group.rank))
    take_step = step_function(optimizer, params, config.clip_grad_norm)
    say = leader and progress is not False
    compiled, not_compiled = _compiled_step(config, group, model, guide, objective, params, optimizer, contract, train, say)
    warmup_steps = config.warmup * math.ceil(train.num_points / config.batch_size)

    # Where training starts: a checkpoint's state when resuming one.
    saved = RunCheckpoint(checkpoint, model, guide, optimizer, params, group=group, metadata=checkpoint_metadata or {},
                          options=_checkpoint_options(config, objective_name, objective_options, train))
    done, loop = saved.start(resume, config.epochs, config.seed)
    sums = RunningSums(loop["tally"]) if "tally" in loop else RunningSums.zeros(device)
    order = train.indices(loop["order"]) if "order" in loop else None  # the unfinished epoch's data order
    guard = DivergenceGuard(model, guide, optimizer, params, config.max_bad_steps, config.max_restorations, checkpoint)

    bar = tqdm(range(done.epoch + 1, config.epochs + 1), desc="fit", unit="epoch", initial=done.epoch,
               total=config.epochs, disable=(None if progress is None else not progress) if leader else True)
    # Argument checks of Pyro and torch.distributions cost a host sync per site (e.g. that
    # Bernoulli data are 0/1); they ran on the first step in collect_params.
    with pyro.validation_enabled(False), deferred_stop(enabled=checkpoint is not None) as stop:
        for epoch in bar:
            start = time.perf_counter()
            compile_before = compiled.compile_seconds if compiled is not None else 0.0
            if order is None:
                order = train.indices(epoch_order(train.num_points, device, group))
                sums.epoch.zero_()  # a run of skipped steps may go on into the new epoch
            batches = order.split(config.batch_size)
            for index in range(done.batch, len(batches)):
                if agree_to_stop(group, stop.signal is not None, done.step, index == done.batch, CHECK_EVERY):
                    compiling = compiled.compile_seconds - compile_before if compiled is not None else 0.0
                    done.batch, done.epoch_seconds = index, done.epoch_seconds + time.perf_counter() - start - compiling
                    saved.save(done, order, sums.tally)
                    raise TrainingInterrupted(checkpoint, epoch, index, len(batches), stop.signal or signal.SIGTERM)
                batch_index = batches[index]
                if warmup_steps:
                    objective.beta = kl_warmup(done.step, warmup_steps, config.beta)
                points = batch_index.shape[0]
                if parallel is not None:
                    if points < group.world_size:  # a last batch too small to give every rank a point
                        continue
                    batch_index = group.shard(batch_index)
                if compiled is not None and compiled.active:
                    try:
                        compiled(train, batch_index, points, sums)
                    except NotTraceable as why:
                        compiled.active, not_compiled = False, str(why)
                        _say_eager(why, say)
                if compiled is None or not compiled.active:
                    batch = train.rows(batch_index)
                    optimizer.zero_grad(set_to_none=True)
                    with data_plate_scale(contract, train.num_points, points, batch_index):
                        if parallel is None:
                            loss = objective.differentiable_loss(model, guide, *batch)
                            loss.backward()
                            loss = loss.detach()
                        else:
                            loss = parallel.loss_and_gradients(*batch)
                    # Under a data-plate scale N/B the loss estimates the whole data set's; the sums
                    # keep the batch's share, so that the epoch's mean is nats per data point.
                    take_step(loss if not contract.needs_scaling else loss * (points / train.num_points), points, sums)
                done.step += 1
                if monitor is not None and leader:
                    monitor.step(done.step, sums.epoch, getattr(objective, "beta", math.nan), optimizer.param_groups[0]["lr"])
                if done.step % CHECK_EVERY == 0:
                    guard.check(sums, done)
            guard.check(sums, done)

            loss_sum, points, skipped = sums.epoch.tolist()
            train_loss = loss_sum / points if points else math.nan
            compiling = compiled.compile_seconds - compile_before if compiled is not None else 0.0
            seconds = done.epoch_seconds + time.perf_counter() - start - compiling
            if compiling and say:
                _say_compiled(compiled, compiling)
            valid_elbo = _validation_elbo(model, guide, valid_x, valid_args) if leader else math.nan  # rank 0's
            report = _training_report(model, guide)
            done.history.append({
                "epoch": epoch, "train_loss": train_loss, "beta": getattr(objective, "beta", math.nan),
                "valid_elbo": valid_elbo, "seconds": seconds, "skipped_steps": int(skipped),
                "restorations": done.restorations, "lr": optimizer.param_groups[0]["lr"],
            } | report)
            order = None
            done.epoch, done.batch, done.epoch_seconds = epoch, 0, 0.0
            guard.keep_good_state()
            out_of_time = _budget_spent(config.max_minutes, done.history, group)
            if checkpoint is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs or out_of_time):
                saved.save(done, order, sums.tally)
            bar.set_postfix(loss=f"{train_loss:.3f}", valid_elbo=f"{valid_elbo:.3f}", **{k: f"{v:.4g}" for k, v in report.items()})
            if monitor is not None and leader:
                monitor.epoch(done.history[-1], model, guide)
            if out_of_time:
                if say and epoch < config.epochs:
                    print(f"fit: the budget of {config.max_minutes:g} minutes is spent after {epoch} of "
                          f"{config.epochs} epochs", file=sys.stderr)
                break
    _set_train(model, guide, False)
    result = _result(model, guide, objective, done, say_skipped=say)
    result.compile_seconds = compiled.compile_seconds if compiled is not None else 0.0
    result.compiled = compiled is not None and compiled.active
    result.not_compiled = not_compiled
    return result


def _budget_spent(max_minutes: float | None, history: list[dict[str, Any]], group: Any) -> bool:
    """Whether another epoch as long as the last would end past ``max_minutes`` of training.

    Under ``torchrun`` rank 0's clock decides for every rank, so that all stop after the same epoch.
    """
    if max_minutes is None:
        return False
    spent = sum(row["seconds"] for row in history)
    over = spent + history[-1]["seconds"] > 60 * max_minutes
    return group.any(over) if group is not None else over


# FitConfig's fields: fit's keywords of the same names override the config's.
_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(FitConfig))
# Keywords fit took before they were named as FitConfig's fields.
_RENAMED = {"num_particles": "particles", "warmup_epochs": "warmup"}


def _settle_options(config: FitConfig | None, options: dict[str, Any]) -> tuple[FitConfig, Any, str, dict[str, Any]]:
    """The effective config, the objective, and its name and options as the checkpoint records them.

    Keywords that name FitConfig's fields override ``config`` (one FitConfig is built, and
    validates them); the others are the objective's. ``particles`` gives the objective's
    ``num_particles`` when a config or the keyword states it, as the CLI's config always does;
    without either, the objective's own default holds, as it did for a ``fit`` without
    ``num_particles``. The recorded options are then the same as before for the same run.
    """
    for old, new in _RENAMED.items():
        if old in options:
            raise InputError(f"fit takes {new}=, not {old}= (fit's keywords are FitConfig's field names)")
    fields = {name: value for name, value in options.items() if name in _CONFIG_FIELDS}
    objective_options = {name: value for name, value in options.items() if name not in _CONFIG_FIELDS}
    instance = fields.pop("objective") if not isinstance(fields.get("objective", ""), str) else None
    particles_given = config is not None or "particles" in fields
    config = dataclasses.replace(config, **fields) if config is not None else FitConfig(**fields)
    if instance is not None:
        if objective_options or "particles" in fields:
            raise InputError("particles and objective options are for an objective given by name, not an instance")
        objective, name = as_objective(instance), type(instance).__name__
    else:
        name, spec_options = parse_objective_spec(config.objective)
        if both := sorted(spec_options.keys() & objective_options.keys()):
            raise InputError(f"objective option {both[0]} is given both in the spec {config.objective!r} and as a keyword")
        objective_options = spec_options | objective_options
        if name != "reconstruction" and particles_given:
            objective_options.setdefault("num_particles", config.particles)
        objective = get_objective(name, **objective_options)
    if (config.beta != 1.0 or config.warmup) and not getattr(objective, "supports_beta", False):
        raise InputError(
            f"beta and KL warm-up weight a KL term, which the {type(objective).__name__} objective does not have"
        )
    return config, objective, name, objective_options


def _checkpoint_options(config: FitConfig, objective: str, objective_options: dict[str, Any], data: StagedData) -> dict[str, Any]:
    """The options a checkpoint is written with, which a resumed run must repeat.

    Keys and values as fit wrote them before FitConfig gave the options their names
    (``warmup_epochs``): older checkpoints resume.
    """
    return {
        "objective": objective, "objective_options": json.loads(json.dumps(objective_options, default=repr)),
        "batch_size": config.batch_size, "lr": config.lr, "beta": config.beta, "warmup_epochs": config.warmup,
        "seed": config.seed, "clip_grad_norm": config.clip_grad_norm, "max_bad_steps": config.max_bad_steps,
        "max_restorations": config.max_restorations, "data_shape": list(data.x.shape),
        "dynamic_binarization": data.dynamic,
    }


def _compiled_step(config: FitConfig, group: Any, model: Any, guide: Any, objective: Any, params: list[Tensor],
                   optimizer: torch.optim.Optimizer, contract: Any, train: StagedData,
                   say: bool) -> tuple[CompiledStep | None, str | None]:
    """The compiled step when ``config.compile`` asks for it and the pair allows it (``None``: eager), and why not."""
    if group is not None and getattr(objective, "computes_own_gradients", False):
        raise InputError(
            f"Pyro's {objective.name} back-propagates inside its loss_and_grads, outside DistributedDataParallel's "
            "gradient hooks: train it in one process"
        )
    if not config.compile:
        return None, None
    if group is not None:
        raise InputError(
            "compile is not available under torchrun with several processes: DistributedDataParallel's "
            "gradient hooks run outside a traced graph; train data-parallel without compile"
        )
    try:
        return CompiledStep(model, guide, objective, params, optimizer, contract, train.num_points, config.clip_grad_norm), None
    except NotTraceable as why:
        _say_eager(why, say)
        return None, str(why)


def _say_eager(why: NotTraceable, say: bool) -> None:
    if say:
        print(f"fit: training eagerly, not compiled: the step cannot be traced into a static graph: {why}", file=sys.stderr)
    return None


def _say_compiled(compiled: CompiledStep, seconds: float) -> None:
    shapes = ", ".join(" and ".join(str(s) for s in shape) for shape in compiled.compiled_shapes)
    print(f"fit: compiled the training step in {seconds:.1f} s (kept out of the epoch times), for batches {shapes}",
          file=sys.stderr)


def _validation_elbo(model: Any, guide: Any, valid_x: Tensor | None, valid_args: tuple[Tensor, ...]) -> float:
    """The mean ELBO of the validation data, one sample per point (NaN without them)."""
    if valid_x is None:
        return math.nan
    _set_train(model, guide, False)
    elbo = importance_estimate(model, guide, valid_x, *valid_args, num_samples=1).elbo.mean().item()
    _set_train(model, guide, True)
    return elbo


def _training_report(model: Any, guide: Any) -> dict[str, float]:
    report = {}
    for module in (model, guide):
        report |= module.training_report() if hasattr(module, "training_report") else {}
    return report


def _result(model: Any, guide: Any, objective: Any, done: Progress, say_skipped: bool) -> FitResult:
    history = pd.DataFrame(done.history)
    skipped_steps = int(history["skipped_steps"].sum()) if "skipped_steps" in history else 0
    if skipped_steps and say_skipped:
        print(
            f"fit: skipped {skipped_steps} of {done.step} steps whose loss or gradient was not finite "
            f"({done.restorations} restorations with a halved learning rate); see the history's skipped_steps",
            file=sys.stderr,
        )
    return FitResult(model, guide if guide is not no_guide else None, history, objective, skipped_steps)


def _to_device_for_training(model: Any, guide: Any, device: torch.device) -> None:
    for module in (model, guide):
        if isinstance(module, nn.Module):
            module.to(device).train()


def _set_train(model: Any, guide: Any, mode: bool) -> None:
    for module in (model, guide):
        if isinstance(module, nn.Module):
            module.train(mode)
