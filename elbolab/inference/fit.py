"""Stochastic variational inference: minibatch gradient descent on an objective.

One loop for every model, guide and objective: shuffle, draw a batch (resampling a
dynamically binarized batch), take a gradient step with a plain torch optimizer on the module
parameters. The hot path has no host synchronization: losses are accumulated on the device and
read once per epoch, validation runs between epochs, and Pyro's argument checks run on the
first step only (the data were checked once at the boundary).
"""

from __future__ import annotations

__all__ = ["FitConfig", "FitResult", "fit", "make_adam", "resolve_device"]

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from elbolab.config import dataclass_from_dict
from elbolab.data import Dataset
from elbolab.errors import InputError
from elbolab.inference.evaluate import importance_estimate
from elbolab.inference.objectives import get_objective, no_guide
from elbolab.inference.schedules import kl_warmup


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

    def __post_init__(self) -> None:
        for name in ("particles", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")
        if isinstance(self.warmup, bool) or int(self.warmup) != self.warmup or self.warmup < 0:
            raise InputError(f"warmup must be a non-negative number of epochs, got {self.warmup}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise InputError(f"beta must be finite and >= 0, got {self.beta}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
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
    """

    model: Callable[..., Any]
    guide: Callable[..., Any]
    history: pd.DataFrame
    objective: Any


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
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        seed: seeds Pyro's, torch's and numpy's RNGs: with the same initial weights the same
            seed gives the same result on CPU.
        progress: progress bar over epochs (``None``: only on a terminal).
        args: further per-data-point tensors ``[N, ...]``, batched with the data and passed after
            it, ``model(x_batch, *args_batch)``: e.g. one-hot labels for a conditional VAE.
        valid_args: the same for ``valid``.
        **objective_kwargs: passed to the objective, e.g. ``num_particles=5``.

    Returns:
        A :class:`FitResult` whose ``history`` has one row per epoch; a model or guide with a
        ``training_report()`` method (the VQ-VAE's codebook usage) adds its values to each row.

    Example:
        >>> pyro.set_rng_seed(0)
        >>> model, guide = VAE(64, 8, hidden=(128,)), GaussianGuide(64, 8, hidden=(128,))
        >>> result = fit(model, guide, load_dataset("digits", binarize="dynamic"), epochs=20)
        >>> result.history.tail(1)
    """
    FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, beta=beta, warmup=warmup_epochs, seed=seed)
    device = resolve_device(device)
    x, dynamic = _as_matrix(data, "training data")
    valid_x = None
    if valid is not None:
        valid_x, valid_dynamic = _as_matrix(valid, "validation data")
        if valid_dynamic:
            valid_x = valid.fixed_binarization(seed).x  # a fixed draw: comparable across epochs
        if valid_x.shape[1:] != x.shape[1:]:
            raise InputError(
                f"validation data have {tuple(valid_x.shape[1:])} features, training data {tuple(x.shape[1:])}"
            )
        valid_x = valid_x.to(device)
    args = _per_point_args(args, x.shape[0], "args")
    valid_args = _per_point_args(valid_args, valid_x.shape[0] if valid_x is not None else 0, "valid_args")
    if valid_x is not None and len(valid_args) != len(args):
        raise InputError(f"fit was given {len(args)} args for the training data but {len(valid_args)} valid_args")
    if isinstance(objective, str):
        objective = get_objective(objective, **objective_kwargs)
    elif objective_kwargs:
        raise InputError("objective options are for an objective given by name, not an instance")
    warmup_steps = warmup_epochs * math.ceil(x.shape[0] / batch_size)
    if (beta != 1.0 or warmup_steps) and not getattr(objective, "supports_beta", False):
        raise InputError(
            f"beta and KL warm-up weight a KL term, which the {type(objective).__name__} objective does not have"
        )
    if guide is None:
        guide = no_guide

    pyro.set_rng_seed(seed)
    for module in (model, guide):
        if isinstance(module, nn.Module):
            module.to(device).train()
    x = x.to(device)
    args = tuple(a.to(device) for a in args)
    valid_args = tuple(a.to(device) for a in valid_args)
    first_batch = torch.bernoulli(x[:batch_size]) if dynamic else x[:batch_size]
    params = _collect_params(model, guide, objective, (first_batch, *(a[:batch_size] for a in args)))
    if not params:
        raise InputError("the model and guide have no parameters to train")
    optimizer = make_adam(params, lr)

    if getattr(objective, "supports_beta", False):
        objective.beta = beta
    rows = []
    step = 0
    bar = tqdm(range(1, epochs + 1), desc="fit", unit="epoch", disable=None if progress is None else not progress)
    # Argument checks of Pyro and torch.distributions cost a host sync per site (e.g. that
    # Bernoulli data are 0/1); they ran on the first step in _collect_params.
    with pyro.validation_enabled(False):
        for epoch in bar:
            start = time.perf_counter()
            total = torch.zeros((), device=device)
            order = torch.randperm(x.shape[0], device=device)
            for batch_index in order.split(batch_size):
                batch = x[batch_index]
                if dynamic:
                    batch = torch.bernoulli(batch)
                if warmup_steps:
                    objective.beta = kl_warmup(step, warmup_steps, beta)
                loss = objective.differentiable_loss(model, guide, batch, *(a[batch_index] for a in args))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                step += 1
            train_loss = total.item() / x.shape[0]
            seconds = time.perf_counter() - start
            if not math.isfinite(train_loss):
                raise InputError(
                    f"training diverged in epoch {epoch} (loss {train_loss}); lower the learning rate"
                )
            valid_elbo = math.nan
            if valid_x is not None:
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
                }
                | report
            )
            bar.set_postfix(loss=f"{train_loss:.3f}", valid_elbo=f"{valid_elbo:.3f}", **{k: f"{v:.4g}" for k, v in report.items()})
    _set_train(model, guide, False)
    return FitResult(model, guide if guide is not no_guide else None, pd.DataFrame(rows), objective)


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where every parameter allows it.

    The fused step updates all parameters in one kernel instead of about ten per parameter
    tensor: on 2 CPU cores it takes 0.4 ms instead of 1.1 ms for a 784-400-20 VAE, a sixth of
    a training step (benchmarks/RESULTS.md). Same update rule, same results up to rounding.
    """
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fusable or None)


def _as_matrix(data: Dataset | Tensor, what: str) -> tuple[Tensor, bool]:
    if isinstance(data, Dataset):
        return data.x, data.dynamic_binarization
    if not isinstance(data, Tensor):
        raise InputError(f"{what} must be a Dataset or a tensor, got {type(data).__name__}")
    if data.ndim < 2 or data.shape[0] == 0:
        raise InputError(f"{what} must have shape [N, ...] with N > 0, got {tuple(data.shape)}")
    # One reduction first: a finite sum proves every value finite (the elementwise check
    # costs as much as a few training steps on a large data set).
    if not torch.isfinite(data.sum()) and not torch.isfinite(data).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return data.float(), False


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
