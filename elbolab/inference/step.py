"""The optimizer step, and what happens when steps go non-finite.

A step whose loss or gradient is not finite is skipped on the device (fused Adam's ``found_inf``),
and counted in the epoch's running sums, which stay on the device too: the step never waits for
the host. Every :data:`CHECK_EVERY` steps, and at the end of each epoch, :class:`DivergenceGuard`
reads the longest run of skipped steps; a run of ``max_bad_steps`` puts the last good state
back and halves the learning rate.
"""

from __future__ import annotations

__all__ = ["CHECK_EVERY", "DivergenceGuard", "RunningSums", "collect_params", "data_plate_scale", "make_adam",
           "step_function"]

import copy
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn

from elbolab.contract import Contract, DataPlateScale
from elbolab.errors import InputError
from elbolab.inference.training_checkpoint import Progress

# Steps between reads of the skipped-step counters (a host sync on CUDA): divergence is handled
# at most this many steps late, during which non-finite steps are skipped anyway.
CHECK_EVERY = 50


class RunningSums:
    """The epoch's running sums, on the device, read by name.

    One float64 tensor of five slots, ``tally``, which a checkpoint stores as ``loop.tally`` (keep
    the layout, so that old checkpoints resume); the attributes are views of its slots:

    Attributes:
        loss: loss of the finite steps (under a data-plate scale, the batch's share of it).
        points: their data points.
        skipped: steps skipped for a non-finite loss or gradient.
        bad_run: length of the current run of skipped steps.
        longest_bad_run: the longest run since the last restoration.
        epoch: ``loss, points, skipped``, zeroed at each epoch's start.
        runs: ``bad_run, longest_bad_run``, which go on into the next epoch.
    """

    def __init__(self, tally: Tensor) -> None:
        self.tally = tally
        self.loss, self.points, self.skipped, self.bad_run, self.longest_bad_run = (tally[i] for i in range(5))
        self.epoch, self.runs = tally[:3], tally[3:]

    @classmethod
    def zeros(cls, device: torch.device | str) -> RunningSums:
        return cls(torch.zeros(5, dtype=torch.float64, device=device))


def step_function(optimizer: torch.optim.Optimizer, params: list[Tensor],
                  clip_grad_norm: float | None) -> Callable[[Tensor, int, RunningSums], None]:
    """The optimizer step that skips non-finite losses and gradients, without a host sync.

    Fused Adam takes a ``found_inf`` flag (the one torch's GradScaler sets) and leaves parameters,
    moments and step count untouched when it is set, so the decision stays on the device.
    Another optimizer needs the flag on the host.
    """
    fused = bool(optimizer.defaults.get("fused"))

    def take_step(loss: Tensor, batch_points: int, sums: RunningSums) -> None:
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
        sums.epoch.add_(torch.stack([torch.where(finite, loss.double(), 0.0), finite * float(batch_points), bad]))
        sums.bad_run.add_(1).mul_(bad)
        torch.maximum(sums.longest_bad_run, sums.bad_run, out=sums.longest_bad_run)

    return take_step


class DivergenceGuard:
    """Restore the last good state and halve the learning rate after a run of skipped steps.

    The good state is the one at the end of the last epoch (:meth:`keep_good_state`); after
    ``max_restorations`` restorations, training stops with an :class:`~elbolab.errors.InputError`
    and the last checkpoint is left as it was.
    """

    def __init__(self, model: Any, guide: Any, optimizer: torch.optim.Optimizer, params: list[Tensor],
                 max_bad_steps: int, max_restorations: int, checkpoint: Path | None) -> None:
        self.model, self.guide, self.optimizer, self.params = model, guide, optimizer, params
        self.max_bad_steps, self.max_restorations, self.checkpoint = max_bad_steps, max_restorations, checkpoint
        self.keep_good_state()

    def keep_good_state(self) -> None:
        self.good = _snapshot(self.model, self.guide, self.optimizer, self.params)

    def check(self, sums: RunningSums, progress: Progress) -> None:
        """Restore if the longest run of skipped steps reached ``max_bad_steps`` (a host sync)."""
        if sums.longest_bad_run.item() < self.max_bad_steps:
            return
        progress.restorations += 1
        lr_now = self.optimizer.param_groups[0]["lr"]
        if progress.restorations > self.max_restorations:
            where = f"; the last good checkpoint is {self.checkpoint}" if self.checkpoint is not None else ""
            raise InputError(
                f"training diverged: {self.max_bad_steps} non-finite losses or gradients in a row, again after "
                f"{self.max_restorations} restorations of the last good state with the learning rate halved "
                f"(now {lr_now:.3g}){where}; lower the learning rate or clip gradients (clip_grad_norm)"
            )
        _restore(self.good, self.model, self.guide, self.optimizer, self.params)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_now / 2
        sums.runs.zero_()


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


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where every parameter allows it.

    The fused step updates all parameters in one kernel instead of about ten per parameter
    tensor: on 2 CPU cores it takes 0.4 ms instead of 1.1 ms for a 784-400-20 VAE, a sixth of
    a training step (benchmarks/RESULTS.md). Same update rule, same results up to rounding.
    """
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fusable or None)


def collect_params(model: Any, guide: Any, objective: Any, batch: tuple[Tensor, ...]) -> list[Tensor]:
    """Every tensor to train, found by one validated run of the loss.

    Found: the parameters of the modules (the model and guide, or the modules behind a wrapper:
    :func:`~elbolab.programs.as_module`); the ``pyro.param`` sites the run records, as Pyro's
    SVI finds them (plain Pyro functions declare parameters so); and every leaf tensor with
    ``requires_grad`` that the loss depends on, walking its autograd graph, so that a network a
    function reaches in a way no wrapper shows (a global variable) is trained too. The first run
    also checks the model against the data.

    The param sites are recorded by a handler of their own, not Pyro's ``trace(param_only=True)``:
    under that, elbolab's modules would enter Pyro's global param store (:mod:`elbolab.param_store`),
    which would then keep every model ever trained alive.
    """
    with _ParamSites() as capture:
        try:
            loss = objective.differentiable_loss(model, guide, *batch)
        except ValueError as error:
            if isinstance(error, InputError):
                raise
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"the model rejects the data: {first_line}") from None
    found: dict[int, Tensor] = {}
    for module in (model, guide):
        if isinstance(module, nn.Module):
            found.update((id(p), p) for p in module.parameters() if p.requires_grad)
    for value in capture.values:
        found.setdefault(id(value), value)
    for leaf in _leaves(loss):
        found.setdefault(id(leaf), leaf)
    if not found:
        raise InputError("the model and guide have no parameters to train")
    if getattr(objective, "computes_own_gradients", False):
        _check_registered(objective, found, capture.values)
    return list(found.values())


def _leaves(loss: Any) -> list[Tensor]:
    """The leaf tensors that require grad which ``loss`` depends on, from its autograd graph."""
    if not isinstance(loss, Tensor) or loss.grad_fn is None:
        return []
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf's gradient lands here
        if isinstance(variable, Tensor) and variable.requires_grad:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


class _ParamSites(Messenger):
    """Records the unconstrained tensor of every ``pyro.param`` site run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[Tensor] = []

    def _pyro_post_param(self, msg: dict) -> None:
        self.values.append(msg["value"].unconstrained())


def _check_registered(objective: Any, found: dict[int, Tensor], registered_values: list[Tensor]) -> None:
    """An objective that back-propagates itself trains only what Pyro's param sites show: refuse what it would miss."""
    registered = {id(value) for value in registered_values}
    if any(id(p) not in registered for p in found.values()):
        raise InputError(
            f"Pyro's {objective.name} computes gradients only for parameters in Pyro's param store, and some parameters "
            "of this model or guide are not registered there (elbolab's own modules register themselves; call "
            "pyro.module(name, self) in your module's forward), so they would never change: register them, or use "
            "an elbolab objective"
        )


def data_plate_scale(contract: Contract, num_points: int, batch_points: int, batch_index: Tensor) -> Any:
    """The scale ``N / B`` on the data plate where the objective needs it (see :class:`DataPlateScale`).

    ``batch_points`` is the global batch's size (under data parallelism ``batch_index`` is this
    rank's share of it: the subsample of its data plate).
    """
    if not contract.needs_scaling:
        return nullcontext()
    return DataPlateScale(contract.plates, num_points / batch_points, batch_index)
