"""The training step traced once per batch shape into a static graph of tensor operations, and compiled.

Pyro's effect handlers run in Python on every step, yet they only decide *which* tensor
operations run: for a fixed model, guide, objective and batch shape that choice is the same at
every step. So the step is run once under :func:`torch.fx.experimental.proxy_tensor.make_fx`,
which records it below autograd, at the level of ATen operations: the model and guide, the
objective, the backward pass, the gradient norm, clipping, the non-finite check and the epoch's
running sums become one graph, with the sampling as ordinary random-number nodes
(``aten.normal_``) and the batch, the parameters, the buffers, the KL weight beta and the batch's
indices as its inputs. The graph is then compiled with Inductor (``torch.compile``); on CUDA
its launches are captured in a CUDA graph (``mode="reduce-overhead"``). Fused Adam, already a
single kernel, updates the parameters from the graph's gradients and its ``found_inf`` flag.
This is what NumPyro does with JAX's jit: the handlers run at trace time only.

Semantics are those of the eager step:

- fresh noise every step from torch's generators: Inductor is told to call ATen's random
  kernels (``fallback_random``), so a compiled step draws the very numbers the eager one does,
  and the same seed gives the same run, compiled or not, up to floating-point rounding;
- tracing runs the step once on copies of the buffers, under a forked generator: it moves no
  codebook average and consumes no noise, so that ``resume`` stays bitwise;
- buffers a model updates in place (the VQ-VAE's EMA codebook) are graph inputs, and their
  updates reach the module;
- a parameter without a gradient (an unused head) is left without one, as in the eager step,
  so that Adam leaves it and its moments alone.

What cannot be traced is refused by :class:`NotTraceable`, whose message names the reason
and, where there is one, the line of the user's program: a read of a tensor's value on the
host (``.item()``, ``bool()``, a Python branch on a tensor), an operation whose output shape
depends on the values (``nonzero``, boolean masks), parameters outside the model's and guide's
modules (``pyro.param`` sites of a plain function), an optimizer other than fused Adam.
:func:`~elbolab.inference.fit` then trains eagerly and says why. Python state that a model
changes from step to step by itself (a counter it anneals on) is frozen at its traced value: the
trace cannot see such state, so the model's author must not rely on it under ``compile``.
"""

from __future__ import annotations

__all__ = ["COMPILE_MODES", "CompiledStep", "NotTraceable"]

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from elbolab.contract import Contract
from elbolab.inference.step import RunningSums, data_plate_scale

# "inductor": the traced graph compiled by Inductor (on CUDA also captured in a CUDA graph);
# "trace": the traced graph run as it is, operation by operation (tests check the trace itself
# with it, in a fraction of Inductor's compile time).
COMPILE_MODES = ("inductor", "trace")


class NotTraceable(Exception):
    """The step cannot be traced into a static graph; the message says why."""


class _Objective(nn.Module):
    """``objective.differentiable_loss(model, guide, *batch)`` as one module's forward, whose state is the pair's."""

    def __init__(self, objective: Any, model: nn.Module, guide: nn.Module) -> None:
        super().__init__()
        self.objective, self.model, self.guide = objective, model, guide

    def forward(self, *batch: Tensor) -> Tensor:
        return self.objective.differentiable_loss(self.model, self.guide, *batch)


class CompiledStep:
    """One compiled training step per batch shape: gradients into ``p.grad``, a ``found_inf`` flag, the running sums.

    Arguments:
        model, guide, objective: the pair and the objective being trained; model and guide must
            be ``nn.Module``\\ s holding every parameter in ``params``.
        params: the parameters the optimizer updates (in its order).
        optimizer: fused Adam (:func:`~elbolab.inference.step.make_adam`), which takes the
            graph's ``found_inf``.
        contract: the pair's contract (its data-plate scale under subsampling).
        num_points: training points (the data-plate scale ``N / B``).
        clip_grad_norm: as in :class:`~elbolab.inference.FitConfig`.
        mode: one of :data:`COMPILE_MODES`.

    Raises:
        NotTraceable: on construction when the pair or the optimizer rules the trace out; on a
            call, when the step of a new batch shape cannot be traced.
    """

    def __init__(self, model: Any, guide: Any, objective: Any, params: list[Tensor], optimizer: torch.optim.Optimizer,
                 contract: Contract, num_points: int, clip_grad_norm: float | None, mode: str = "inductor") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
        for role, program in (("model", model), ("guide", guide)):
            if not isinstance(program, nn.Module):
                raise NotTraceable(f"the {role} is a plain function, not an nn.Module: its parameters cannot be graph inputs")
        if not optimizer.defaults.get("fused"):
            raise NotTraceable("the compiled step hands its non-finite flag to fused Adam, and this optimizer is not fused")
        self.module = _Objective(objective, model, guide)
        named = dict(self.module.named_parameters())
        by_id = {id(p): name for name, p in named.items()}
        outside = [p for p in params if id(p) not in by_id]
        if outside:
            raise NotTraceable(
                f"{len(outside)} parameter(s) live outside the model's and guide's modules (pyro.param sites of a "
                "plain function?): only module parameters can be graph inputs"
            )
        self.objective, self.optimizer, self.contract = objective, optimizer, contract
        self.params, self.num_points, self.clip_grad_norm, self.mode = params, num_points, clip_grad_norm, mode
        self.param_names = [by_id[id(p)] for p in params]
        self.buffer_names = [name for name, _ in self.module.named_buffers()]
        # Detached views share the parameters' storage, which the optimizer updates in place.
        self.param_views = [p.detach() for p in params]
        # The KL weight as a graph input, in the parameters' dtype: the eager step's float * kl.
        self.beta = torch.ones((), dtype=params[0].dtype, device=params[0].device)
        self.graphs: dict[tuple, tuple[Callable[..., Any], list[bool]]] = {}
        self.compile_seconds = 0.0
        self.active = True  # False once a batch shape could not be traced: training goes on eagerly
        self.compiled_shapes: list[tuple[tuple[int, ...], ...]] = []

    def __call__(self, batch: tuple[Tensor, ...], batch_index: Tensor, points: int, sums: RunningSums) -> None:
        """One step's gradients, flag and sums; the optimizer step follows (fused Adam, skipping a non-finite step)."""
        key = (points, *(tuple(t.shape) for t in batch), *(t.dtype for t in batch))
        first = key not in self.graphs
        start = time.perf_counter()
        if first:
            self.graphs[key] = self._trace(batch, batch_index, points, sums)
        graph, has_grad = self.graphs[key]
        if getattr(self.objective, "supports_beta", False):
            self.beta.fill_(self.objective.beta)
        buffers = [self.module.get_buffer(name) for name in self.buffer_names]
        found_inf, *grads = graph(self.param_views, buffers, sums.tally, self.beta, batch_index, *batch)
        grads = iter(grads)
        for p, graded in zip(self.params, has_grad, strict=True):
            p.grad = next(grads) if graded else None
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        if first:
            self.compile_seconds += time.perf_counter() - start
            self.compiled_shapes.append(tuple(tuple(t.shape) for t in batch))

    def _trace(self, batch: tuple[Tensor, ...], batch_index: Tensor, points: int,
               sums: RunningSums) -> tuple[Callable[..., Any], list[bool]]:
        """The step of this batch shape as a graph, and which parameters get a gradient."""
        has_grad: list[bool] = []

        def step(params: list[Tensor], buffers: list[Tensor], tally: Tensor, beta: Tensor, batch_index: Tensor,
                 *batch: Tensor) -> list[Tensor]:
            state = dict(zip(self.param_names, params, strict=True)) | dict(zip(self.buffer_names, buffers, strict=True))
            beta_before = getattr(self.objective, "beta", None)
            if beta_before is not None and getattr(self.objective, "supports_beta", False):
                self.objective.beta = beta
            try:
                with torch.enable_grad(), data_plate_scale(self.contract, self.num_points, points, batch_index):
                    loss = torch.func.functional_call(self.module, state, batch)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                if beta_before is not None:
                    self.objective.beta = beta_before
            has_grad[:] = [g is not None for g in grads]
            used = [g for g in grads if g is not None]
            loss = loss.detach()
            norm = torch.nn.utils.get_total_norm(used, foreach=True) if used else loss.new_zeros(())
            finite = torch.isfinite(loss) & torch.isfinite(norm)
            if self.clip_grad_norm is not None:  # torch.nn.utils.clip_grads_with_norm_'s rule
                coefficient = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
                used = [g * coefficient.to(g.dtype) for g in used]
            share = loss * (points / self.num_points) if self.contract.needs_scaling else loss
            bad = (~finite).double()
            tally[:3].add_(torch.stack([torch.where(finite, share.double(), 0.0), finite * float(points), bad]))
            tally[3].add_(1).mul_(bad)
            torch.maximum(tally[4], tally[3], out=tally[4])
            return [(~finite).float(), *used]

        example_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in self.params]
        example_buffers = [self.module.get_buffer(name).clone() for name in self.buffer_names]
        devices = [batch[0].device] if batch[0].is_cuda else []
        with torch.random.fork_rng(devices=devices):
            try:
                graph = make_fx(step)(example_params, example_buffers, sums.tally.clone(), self.beta.clone(),
                                      batch_index, *batch)
            except NotTraceable:
                raise
            except Exception as error:  # any failure of the trace is a reason to train eagerly, named
                raise NotTraceable(_reason(error)) from None
        _refuse_dynamic_shapes(graph)
        if self.mode == "inductor":
            # ATen's random kernels, drawing from torch's generators: the eager step's noise.
            options = {"fallback_random": True, "triton.cudagraphs": batch[0].is_cuda}
            return torch.compile(graph, dynamic=False, options=options), has_grad
        return graph, has_grad


def _reason(error: Exception) -> str:
    """Why a trace failed, in a line, with the user's line of code where the traceback has one."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "_local_scalar_dense" in message or "data-dependent" in message:
        message = "it reads a tensor's value on the host (.item(), bool(), float(), or a Python branch on a tensor)"
    where = _user_frame(error)
    return f"{message}{f', at {where}' if where else ''}"


def _user_frame(error: Exception) -> str | None:
    """The innermost frame of the traceback outside torch, Pyro and elbolab's inference: the user's line."""
    skipped = [Path(torch.__file__).parent, Path(__import__("pyro").__file__).parent, Path(__file__).parent]
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename)
        if not any(path.is_relative_to(root) for root in skipped) and "<" not in frame.filename:
            return f"{path.name}:{frame.lineno} ({frame.line})" if frame.line else f"{path.name}:{frame.lineno}"
    return None


def _refuse_dynamic_shapes(graph: torch.fx.GraphModule) -> None:
    """Refuse a graph with an operation whose output shape depends on the data's values (it would be frozen)."""
    for node in graph.graph.nodes:
        tags = getattr(node.target, "tags", ())
        if node.op == "call_function" and (torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags):
            raise NotTraceable(f"its {node.target} has an output shape (or value) that depends on the data, which a static graph would freeze")
