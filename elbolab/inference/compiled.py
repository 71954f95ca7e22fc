"""The training step traced once per batch shape into a static graph of tensor operations, and compiled.

Pyro's effect handlers run in Python on every step, yet they only decide *which* tensor
operations run: for a fixed model, guide, objective and batch shape that choice is the same at
every step. So the step is run once under :func:`torch.fx.experimental.proxy_tensor.make_fx`,
which records it below autograd, at the level of ATen operations: the model and guide, the
objective, the backward pass, the gradient norm, clipping, the non-finite check and the epoch's
running sums become one graph, with the sampling as ordinary random-number nodes
(``aten.normal_``) and the data, the batch's indices, the parameters, the buffers, the KL
weight beta and the running sums as its inputs (the batch is gathered, and dynamically
binarized, inside the graph). The graph is then compiled by Inductor, on the CPU directly
(``compile_fx``: the trace is already a static ATen graph, and Dynamo's guards would cost a
third of a small step), on CUDA through ``torch.compile`` with its launches captured in a CUDA
graph (``triton.cudagraphs``; the state is marked static, updated where it is). Fused Adam's
kernel, already a single pass over the parameters and faster than Inductor's code for the
same update, then applies the graph's gradients and its ``found_inf`` flag, called directly
on the optimizer's state (:func:`_fused_adam_step`). This is what NumPyro does with JAX's jit:
the handlers run at trace time only.

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
modules (``pyro.param`` sites of a plain function), an optimizer other than fused Adam, a
graph of more than :data:`MAX_GRAPH_NODES` operations, a graph Inductor fails to compile.
The same tracer, :class:`PairTracer`, compiles the chunks of the importance-sampled estimates
(``importance_estimate(..., compile=True)``).
:func:`~elbolab.inference.fit` then trains eagerly and says why. Python state that a model
changes from step to step by itself (a counter it anneals on) is frozen at its traced value: the
trace cannot see such state, so the model's author must not rely on it under ``compile``.
"""

from __future__ import annotations

__all__ = ["COMPILE_MODES", "MAX_GRAPH_NODES", "CompiledStep", "NotTraceable", "PairTracer"]

import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from elbolab.contract import Contract
from elbolab.inference.staging import StagedData
from elbolab.inference.step import RunningSums, data_plate_scale

# "inductor": the traced graph compiled by Inductor (on CUDA also captured in a CUDA graph);
# "trace": the traced graph run as it is, operation by operation (tests check the trace itself
# with it, in a fraction of Inductor's compile time).
COMPILE_MODES = ("inductor", "trace")


# Graphs larger than this are not compiled: Inductor's compile time grows faster than the graph
# (measured here: 350 ops, 2 s; 9,300 ops, the IAF guide's inverse under iwae-dreg, 350 s).
MAX_GRAPH_NODES = 4000


class NotTraceable(Exception):
    """The step cannot be traced into a static graph; the message says why."""


class _Pair(nn.Module):
    """The model and guide as one module, whose state is theirs: ``forward(program, ...)`` runs a program of the pair."""

    def __init__(self, model: Any, guide: Any) -> None:
        super().__init__()
        self.model, self.guide = model, guide

    def forward(self, program: Callable[..., Any], *inputs: Any) -> Any:
        return program(self.model, self.guide, *inputs)


def _slots(module: nn.Module) -> dict[str, list[str]]:
    """For each tensor's name (as ``named_parameters``/``named_buffers`` give it), the attributes that hold it.

    A tensor shared by two modules (tied weights) is swapped into each; a module shared by two
    owners (the ladder guide's top-down networks, the VQ-VAE's codebook) holds it once, under
    whichever path comes first. ``functional_call`` is given exactly these: swapping one
    attribute twice would leave the second swap's stand-in behind.
    """
    slots: dict[str, list[str]] = {}
    for named, deduplicated in ((module.named_parameters, module.named_parameters()), (module.named_buffers, module.named_buffers())):
        first = {id(tensor): name for name, tensor in deduplicated}
        seen: set[tuple[int, str]] = set()
        for name, tensor in named(remove_duplicate=False):
            owner, _, attribute = name.rpartition(".")
            key = (id(module.get_submodule(owner)), attribute)
            if id(tensor) in first and key not in seen:
                seen.add(key)
                slots.setdefault(first[id(tensor)], []).append(name)
    return slots


@dataclass
class _Graph:
    """A program of the pair for one input shape: the graph to run, and which buffers are its inputs."""

    run: Callable[..., Any]
    buffer_names: list[str]


class PairTracer:
    """Programs of a model and guide traced once per input shape with the pair's state as graph inputs, and compiled.

    A program is ``program(model, guide, params, *inputs) -> list of tensors``; inside the trace
    ``params`` (and the modules' parameters) are the graph's parameter inputs, so a program may
    differentiate with respect to them. :meth:`run` traces it at the first call of each
    ``key`` (on copies of the state, under a forked generator: tracing changes nothing),
    refuses what a static graph cannot hold (:class:`NotTraceable`), compiles it, and runs it.

    Arguments:
        model, guide: the pair; ``params`` must all be parameters of their ``nn.Module``\\ s
            (either may be a plain function without parameters).
        params: the parameters that are graph inputs, in this order (default: all of the pair's).
        mode: one of :data:`COMPILE_MODES`.
    """

    def __init__(self, model: Any, guide: Any, params: list[Tensor] | None = None, mode: str = "inductor") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
        self.pair = _Pair(model, guide)
        named = dict(self.pair.named_parameters())
        by_id = {id(p): name for name, p in named.items()}
        params = list(named.values()) if params is None else params
        outside = [p for p in params if id(p) not in by_id]
        if outside:
            raise NotTraceable(
                f"{len(outside)} parameter(s) live outside the model's and guide's modules (pyro.param sites of a "
                "plain function?): only module parameters can be graph inputs"
            )
        self.params, self.mode = params, mode
        self.param_names = [by_id[id(p)] for p in params]
        self.buffer_names = [name for name, _ in self.pair.named_buffers()]
        self.slots = _slots(self.pair)
        # Detached views share the parameters' storage, which the optimizer updates in place.
        self.param_views = [p.detach() for p in params]
        self.graphs: dict[Any, _Graph] = {}
        self._uncalled: set[Any] = set()
        self.compile_seconds = 0.0

    def holds_state_of(self, model: Any, guide: Any) -> bool:
        """Whether the graphs still read this pair's parameters (``.to(device)`` replaces them; buffers are read at each call)."""
        pair = _Pair(model, guide)
        params = dict(pair.named_parameters())
        same_params = all(params.get(name) is p for name, p in zip(self.param_names, self.params, strict=True))
        return same_params and [name for name, _ in pair.named_buffers()] == self.buffer_names

    def run(self, key: Any, program: Callable[..., list[Tensor]], *inputs: Any) -> list[Tensor]:
        """``program(model, guide, params, *inputs)``, from the graph of ``key`` (traced and compiled at its first call).

        For a program that updates none of its inputs in place (:meth:`prepare` traces on them).
        """
        if key not in self.graphs:
            self.prepare(key, program, inputs)
        return self.call(key, *inputs)

    def prepare(self, key: Any, program: Callable[..., list[Tensor]], inputs: tuple[Any, ...],
                fixed_inputs: tuple[Tensor, ...] = ()) -> None:
        """Trace ``program`` as the graph of ``key``, on ``inputs``: examples, copies of any that it updates in place.

        ``fixed_inputs``: tensors that every call will pass again, the same objects (the running
        sums, the data); on CUDA they and the pair's state stay where they are in the CUDA
        graph instead of being copied in at each replay.
        """
        start = time.perf_counter()
        self.graphs[key] = self._compile(program, inputs, fixed_inputs)
        self.compile_seconds += time.perf_counter() - start
        self._uncalled.add(key)

    def call(self, key: Any, *inputs: Any) -> list[Tensor]:
        """Run the graph of ``key`` (prepared) on the pair's state and ``inputs``."""
        graph = self.graphs[key]
        buffers = [self.pair.get_buffer(name) for name in graph.buffer_names]
        if key not in self._uncalled:
            return graph.run(self.param_views, buffers, *inputs)
        start = time.perf_counter()  # on CUDA, torch.compile compiles at the first call
        try:
            outputs = graph.run(self.param_views, buffers, *inputs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            del self.graphs[key]
            raise NotTraceable(f"Inductor could not compile the traced graph: {_reason(error)}") from None
        self.compile_seconds += time.perf_counter() - start
        self._uncalled.discard(key)
        return outputs

    def _compile(self, program: Callable[..., list[Tensor]], inputs: tuple[Tensor, ...],
                 fixed_inputs: tuple[Tensor, ...] = ()) -> _Graph:
        buffer_names: list[str] = []  # the buffers that are inputs of the graph being traced

        def traced(params: list[Tensor], buffers: list[Tensor], *inputs: Tensor) -> list[Tensor]:
            given = dict(zip(self.param_names, params, strict=True)) | dict(zip(buffer_names, buffers, strict=True))
            state = {slot: given[name] for name in given for slot in self.slots[name]}
            return torch.func.functional_call(self.pair, state, (program, params, *inputs), tie_weights=False)

        graph = self._record(traced, buffer_names, inputs, fixed=True)
        if _writes_constants(graph):  # an integer buffer the step updates (a BatchNorm's count): an input after all
            graph = self._record(traced, buffer_names, inputs, fixed=False)
        _refuse_host_reads(graph)
        _drop_constant_reads(graph)
        if self.mode == "trace":
            return _Graph(graph, list(buffer_names))
        if len(graph.graph.nodes) > MAX_GRAPH_NODES:
            raise NotTraceable(
                f"the traced graph has {len(graph.graph.nodes):,} operations, which Inductor would take minutes to "
                f"compile (more than {MAX_GRAPH_NODES:,}: a Python loop unrolled, such as an autoregressive flow's "
                "inverse, one dimension at a time, under iwae-dreg or a sticking-the-landing objective)"
            )
        _scale_explicitly(graph)
        from torch._dynamo import mark_static_address  # seconds to import: only when compiling
        from torch._inductor.compile_fx import compile_fx

        # ATen's random kernels, drawing from torch's generators: the eager step's noise.
        if any(t.is_cuda for t in pytree.tree_leaves(list(inputs)) if isinstance(t, Tensor)):
            # CUDA graphs through torch.compile, which tells them which inputs keep their address:
            # the pair's state and the fixed inputs, updated in place where they are.
            for tensor in (*self.param_views, *(self.pair.get_buffer(name) for name in buffer_names), *fixed_inputs):
                mark_static_address(tensor)
            options = {"fallback_random": True, "triton.cudagraphs": True}
            return _Graph(torch.compile(graph, dynamic=False, options=options), list(buffer_names))
        # On the CPU, Inductor on the graph itself, without Dynamo: the trace is already a static
        # ATen graph, and Dynamo's guards would cost a third of a small model's compiled step.
        graph.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs
        graph.recompile()
        example = [*self.param_views, *(self.pair.get_buffer(name) for name in buffer_names), *inputs]
        example = [t.clone() if isinstance(t, Tensor) else t for t in pytree.tree_leaves(example)]
        try:
            compiled = compile_fx(graph, example, config_patches={"fallback_random": True})
        except Exception as error:  # Inductor's failures come in many types; none is a reason to stop training
            raise NotTraceable(f"Inductor could not compile the traced graph: {_reason(error)}") from None

        def run(*tree: Any) -> list[Tensor]:
            return compiled(*pytree.tree_leaves(list(tree)))

        return _Graph(run, list(buffer_names))

    def _record(self, traced: Callable[..., Any], buffer_names: list[str], inputs: tuple[Tensor, ...],
                fixed: bool) -> torch.fx.GraphModule:
        """Trace on copies of the state, under a forked generator: the trace itself changes nothing.

        ``fixed``: integer and boolean buffers (a flow's permutation, which the inverse pass
        iterates over in Python) are constants of the graph, not inputs; ``buffer_names`` is set
        to the buffers that are.
        """
        buffers = dict(self.pair.named_buffers())
        saved = {name: value.clone() for name, value in buffers.items() if fixed and not value.is_floating_point()}
        buffer_names[:] = [name for name in self.buffer_names if name not in saved]
        example_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in self.params]
        example_buffers = [buffers[name].clone() for name in buffer_names]
        # Seconds to import: only when tracing.
        from torch.fx.experimental.proxy_tensor import make_fx

        devices = [t.device for t in pytree.tree_leaves(list(inputs)) if isinstance(t, Tensor) and t.is_cuda][:1]
        try:
            with torch.random.fork_rng(devices=devices):
                # Host reads are let through here and judged on the graph (_refuse_host_reads): a
                # read of a constant (a flow's permutation) is fine, a read of an input is not.
                trace = make_fx(traced, _error_on_data_dependent_ops=False, record_stack_traces=True)
                return trace(example_params, example_buffers, *inputs)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            # What torch raises for a program it cannot trace: a reason to run eagerly, named. Other
            # errors (a NameError, a TypeError) are a bug, the program's or elbolab's, and propagate.
            raise NotTraceable(_reason(error)) from None
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    buffers[name].copy_(value)


def _fused_adam_step(optimizer: torch.optim.Adam, params: list[Tensor], grads: list[Tensor], found_inf: Tensor) -> None:
    """``optimizer.step()`` of fused Adam for these parameters and gradients, without its Python bookkeeping.

    The calls torch.optim.Adam(fused=True) makes for one device and dtype: the step counts
    raised, the fused kernel (which leaves everything as it was when ``found_inf`` is set), the
    counts lowered again where it was, on the optimizer's own state (created as its first
    step creates it), so that its ``state_dict``, checkpoints and restorations are the eager
    step's. Adam.step's grouping, hooks and profiler records cost 0.2 ms a step on 2 CPU cores,
    a quarter of a small model's compiled step.
    """
    group = optimizer.param_groups[0]
    state = []
    for p in params:
        if not optimizer.state.get(p):
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        state.append(optimizer.state[p])
    steps = [s["step"] for s in state]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [], steps,
                       lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                       amsgrad=False, maximize=False, found_inf=found_inf)
    torch._foreach_sub_(steps, [found_inf] * len(steps))


class CompiledStep:
    """One compiled training step per batch shape: gradients and running sums in one graph, then fused Adam's kernel.

    Arguments:
        model, guide, objective: the pair and the objective being trained; every parameter in
            ``params`` must be a parameter of the model's or the guide's ``nn.Module`` (either
            may be a plain function without parameters of its own).
        params: the parameters the optimizer updates (in its order).
        optimizer: fused Adam (:func:`~elbolab.inference.step.make_adam`), whose kernel the step
            calls itself with the graph's gradients and ``found_inf`` (:func:`_fused_adam_step`).
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
        plain = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                 "decoupled_weight_decay": False}
        one_kind = len({(p.device, p.dtype) for p in params}) == 1
        if getattr(objective, "baseline", None) is not None:
            raise NotTraceable("the score-function gradient's baseline b(x) is a network of the objective, outside the "
                               "traced pair, whose parameters the graph would hold as constants")
        if getattr(objective, "computes_own_gradients", False):
            raise NotTraceable(f"Pyro's {objective.name} back-propagates inside its loss_and_grads, which a traced graph cannot hold")
        if type(optimizer) is not torch.optim.Adam or not optimizer.defaults.get("fused") or len(optimizer.param_groups) != 1 \
                or any(optimizer.defaults.get(name, value) != value for name, value in plain.items()) or not one_kind:
            raise NotTraceable("the compiled step calls fused Adam's kernel itself, for one group of parameters of one "
                               "device and dtype, and this optimizer or these parameters are another")
        self.tracer = PairTracer(model, guide, params, mode)
        self.objective, self.optimizer, self.contract = objective, optimizer, contract
        self.params, self.num_points, self.clip_grad_norm = params, num_points, clip_grad_norm
        # The KL weight as a graph input, in the parameters' dtype: the eager step's float * kl.
        self.beta = torch.ones((), dtype=params[0].dtype, device=params[0].device)
        self.has_grad: dict[tuple, list[bool]] = {}
        self.active = True  # False once a batch shape could not be traced: training goes on eagerly
        self.compiled_shapes: list[tuple[tuple[int, ...], ...]] = []

    @property
    def compile_seconds(self) -> float:
        return self.tracer.compile_seconds

    def __call__(self, data: StagedData, batch_index: Tensor, points: int, sums: RunningSums) -> None:
        """One step on the rows ``batch_index`` of ``data``: the gradients and the sums from the graph, then fused Adam's update.

        Data on the device are gathered (and dynamically binarized) inside the graph; streamed
        data arrive as the batch. ``p.grad`` is not written.
        """
        inside = not data.streaming
        source = (data.x, *data.args) if inside else data.rows(batch_index)
        key = (points, inside, *(tuple(t.shape[1:]) for t in source), *(t.dtype for t in source))
        if key not in self.tracer.graphs:
            self.compiled_shapes.append(((points, *data.x.shape[1:]), *((points, *a.shape[1:]) for a in data.args)))
            example = (sums.tally.clone(), self.beta, batch_index, *source)  # the tally is updated in place
            fixed = (sums.tally, self.beta, *(source if inside else ()))
            self.tracer.prepare(key, self._program(key, points, inside and data.dynamic, inside), example, fixed)
        if getattr(self.objective, "supports_beta", False):
            self.beta.fill_(self.objective.beta)
        found_inf, *grads = self.tracer.call(key, sums.tally, self.beta, batch_index, *source)
        graded = [p for p, g in zip(self.params, self.has_grad[key], strict=True) if g]
        _fused_adam_step(self.optimizer, graded, grads, found_inf)

    def _program(self, key: tuple, points: int, binarize: bool, gather: bool) -> Callable[..., list[Tensor]]:
        """The step of one batch shape, as a program of the pair; it records which parameters get a gradient."""

        def step(model: Any, guide: Any, params: list[Tensor], tally: Tensor, beta: Tensor, batch_index: Tensor,
                 *source: Tensor) -> list[Tensor]:
            # StagedData.rows, in the graph: the same gather and the same draw of a binarized batch.
            batch = tuple(t[batch_index] for t in source) if gather else source
            if binarize:
                batch = (torch.bernoulli(batch[0]), *batch[1:])
            beta_before = getattr(self.objective, "beta", None)
            if beta_before is not None and getattr(self.objective, "supports_beta", False):
                self.objective.beta = beta
            try:
                with torch.enable_grad(), data_plate_scale(self.contract, self.num_points, points, batch_index):
                    loss = self.objective.differentiable_loss(model, guide, *batch)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                if beta_before is not None:
                    self.objective.beta = beta_before
            self.has_grad[key] = [g is not None for g in grads]
            used = [g for g in grads if g is not None]  # Adam leaves a parameter without a gradient alone
            loss = loss.detach()
            # torch.nn.utils.get_total_norm's norm of norms, as reductions Inductor fuses (its _foreach_norm is a call out).
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in used])) if used else loss.new_zeros(())
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

        return step


def _writes_constants(graph: torch.fx.GraphModule) -> bool:
    """Whether an operation of the graph writes to one of its constants (``get_attr`` nodes)."""
    for node in graph.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        values = list(node.args) + [node.kwargs.get(a.name) for a in schema.arguments[len(node.args):]]
        for argument, value in zip(schema.arguments, values, strict=False):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.fx.Node) and value.op == "get_attr":
                return True
    return False


# Operations whose scale arguments Inductor's pattern matcher drops when it fuses them with a
# matrix product (torch 2.13: add(x, a @ b, alpha=c) runs as addmm(x, a, b), without c; see
# pytorch/pytorch#167313): the traced graph spells the scaling out as a product before compiling.
_SCALED_ADDS = {
    torch.ops.aten.add.Tensor: torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor: torch.ops.aten.add_.Tensor,
    torch.ops.aten.sub.Tensor: torch.ops.aten.sub.Tensor, torch.ops.aten.sub_.Tensor: torch.ops.aten.sub_.Tensor,
}
_SCALED_PRODUCTS = {
    torch.ops.aten.addmm.default: torch.ops.aten.mm.default, torch.ops.aten.addmv.default: torch.ops.aten.mv.default,
    torch.ops.aten.baddbmm.default: torch.ops.aten.bmm.default,
}


def _scale_explicitly(graph: torch.fx.GraphModule) -> None:
    """Rewrite ``add(x, y, alpha=c)`` as ``add(x, c * y)`` and ``addmm(x, a, b, beta, alpha)`` as ``beta x + alpha (a @ b)``."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SCALED_ADDS and node.kwargs.get("alpha", 1) != 1:
            with graph.graph.inserting_before(node):
                scaled = graph.graph.call_function(aten.mul.Tensor, (node.args[1], node.kwargs["alpha"]))
            node.args = (node.args[0], scaled)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
        elif node.target in _SCALED_PRODUCTS and (node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1):
            bias, left, right = node.args[:3]
            with graph.graph.inserting_before(node):
                product = graph.graph.call_function(_SCALED_PRODUCTS[node.target], (left, right))
                product = graph.graph.call_function(aten.mul.Tensor, (product, node.kwargs.get("alpha", 1)))
                bias = graph.graph.call_function(aten.mul.Tensor, (bias, node.kwargs.get("beta", 1)))
                total = graph.graph.call_function(aten.add.Tensor, (bias, product))
            node.replace_all_uses_with(total)
            graph.graph.erase_node(node)
    graph.recompile()


def _reason(error: Exception) -> str:
    """Why a trace failed, in a line, with the line of the program where the traceback has one."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    frames = [(frame.filename, frame.lineno, frame.line) for frame in traceback.extract_tb(error.__traceback__)]
    where = _program_line(frames)
    return f"{message}{f', at {where}' if where else ''}"


def _refuse_host_reads(graph: torch.fx.GraphModule) -> None:
    """Refuse a graph that reads on the host a value computed from its inputs, or whose shapes depend on values.

    Such a read (``.item()``, ``bool()``, a Python branch on a tensor) froze the traced step's
    value into the graph, and an output shape that depends on the values (``nonzero``, a boolean
    mask) froze the shape: replayed on other data either would be wrong. Reads of constants
    (a flow's fixed permutation) are the same at every step, and allowed.
    """
    for node in graph.graph.nodes:
        tags = getattr(node.target, "tags", ())
        if node.op != "call_function":
            continue
        if torch.Tag.data_dependent_output in tags and _depends_on_inputs(node):
            what = "it reads a tensor's value on the host (.item(), bool(), float(), or a Python branch on a tensor)"
        elif torch.Tag.dynamic_output_shape in tags and not _integer_indexing(node) and _depends_on_inputs(node):
            what = f"its {node.target} gives an output shape that depends on the data's values"
        else:
            continue
        where = _program_line(_stack_frames(node.meta.get("stack_trace") or ""))
        raise NotTraceable(f"{what}{f', at {where}' if where else ''}")


def _drop_constant_reads(graph: torch.fx.GraphModule) -> None:
    """Remove the host reads of constants that :func:`_refuse_host_reads` let through.

    Python used their values while tracing (a flow's inverse iterating over its permutation);
    the graph needs nothing from them, and Inductor cannot compile a read of a value.
    """
    for node in reversed(list(graph.graph.nodes)):
        tags = getattr(node.target, "tags", ())
        if node.op == "call_function" and torch.Tag.data_dependent_output in tags and not node.users:
            graph.graph.erase_node(node)
    graph.recompile()


def _integer_indexing(node: torch.fx.Node) -> bool:
    """``x[i]`` with integer indices: tagged as of dynamic shape for the boolean-mask case, static here."""
    if node.target not in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
        return False
    indices = [index for index in node.args[1] if isinstance(index, torch.fx.Node)]
    return all(index.meta["val"].dtype not in (torch.bool, torch.uint8) for index in indices)


def _depends_on_inputs(node: torch.fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _stack_frames(stack_trace: str) -> list[tuple[str, int, str]]:
    """``(file, line, code)`` of each frame of a formatted stack trace, outermost first."""
    frames = []
    for match in re.finditer(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack_trace):
        frames.append((match.group(1), int(match.group(2)), match.group(3).strip()))
    return frames


def _program_line(frames: list[tuple[str, int, str | None]]) -> str | None:
    """The innermost frame outside torch and Pyro: the line of the user's program (or of elbolab's) that asked."""
    libraries = [Path(torch.__file__).parent, Path(pyro.__file__).parent]
    for filename, lineno, line in reversed(frames):
        path = Path(filename)
        if "<" not in filename and not any(path.is_relative_to(root) for root in libraries):
            return f"{path.name}:{lineno} ({line})" if line else f"{path.name}:{lineno}"
    return None
