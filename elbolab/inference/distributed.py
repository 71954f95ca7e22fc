"""Data-parallel training across processes with torch.distributed, as launched by ``torchrun``.

``torchrun --nproc-per-node=N -m elbolab fit ...`` starts N processes and tells each its place
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...).
:func:`~elbolab.inference.fit` reads it, joins the process group (NCCL on GPUs, gloo on CPU) and
trains one model with :class:`torch.nn.parallel.DistributedDataParallel`: every rank draws the
same permutation of the data each epoch (rank 0's, broadcast), takes its contiguous slice of each
global batch, and the gradients are averaged across ranks. Each rank's loss is its slice's sum
scaled by the number of ranks, so the averaged gradient is that of the whole global batch's sum:
N processes with batch B take the steps one process with batch B takes, up to the order of
floating-point sums and the sampling noise (each rank draws its own, from :func:`rank_seed`).

Rank 0 alone writes run folders and checkpoints; a checkpoint holds every rank's generator
states, so ``--resume`` continues each rank's noise where it stopped.

The pieces ``fit`` uses: :class:`DataParallelLoss` (the global batch's loss and gradients),
:func:`epoch_order` (one data order for all ranks), :func:`agree_to_stop` (all ranks stop at the
same step) and :func:`rank_generators` / :func:`restore_rank_generators` (each rank's noise in
the checkpoint).
"""

from __future__ import annotations

__all__ = [
    "DataParallelLoss",
    "ProcessGroup",
    "agree_to_stop",
    "environment_rank",
    "environment_world_size",
    "epoch_order",
    "join_process_group",
    "launch",
    "leave_process_group",
    "rank_generators",
    "rank_seed",
    "restore_rank_generators",
]

import copy
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn

from elbolab.contract import Contract
from elbolab.errors import InputError


def environment_world_size() -> int:
    """Processes in this run, as ``torchrun`` sets ``WORLD_SIZE`` (1 when not launched by it)."""
    return _environment_int("WORLD_SIZE", 1)


def environment_rank() -> int:
    """This process's rank, as ``torchrun`` sets ``RANK`` (0 when not launched by it)."""
    return _environment_int("RANK", 0)


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s sampling noise: ``seed`` itself on rank 0, a hash of both elsewhere.

    Rank 0 keeps the run's seed, so its data order is that of a single-process run; the other
    ranks need streams of their own (the same noise on every shard would correlate the
    gradient's terms), and a hash keeps them apart from every other seed's rank 0.
    """
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"elbolab:{seed}:{rank}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel run.

    Attributes:
        rank, world_size: as torch.distributed numbers them.
        device: the device this rank trains on (``cuda:LOCAL_RANK`` on GPUs).
    """

    rank: int
    world_size: int
    device: torch.device

    def shard(self, batch_index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch's indices (sizes differ by at most one)."""
        return batch_index.tensor_split(self.world_size)[self.rank]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, without waiting on the host (NCCL queues it on the stream)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place."""
        dist.broadcast(tensor, src=0)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (a host sync: for decisions every rank must share)."""
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on each), in rank order, on every rank."""
        local = tensor.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [t.to(tensor.device) for t in gathered]


def join_process_group(device: torch.device) -> ProcessGroup | None:
    """Join the process group ``torchrun`` describes in the environment; ``None`` for one process.

    Arguments:
        device: the resolved ``--device``. On CUDA each rank takes GPU ``LOCAL_RANK`` (the index
            of ``cuda:N`` is ignored: torchrun places one process per GPU), and the backend is
            NCCL; on CPU it is gloo.

    Raises:
        InputError: more processes on this node than GPUs, or torch without distributed support.
    """
    world_size = environment_world_size()
    if world_size <= 1:
        return None
    if not dist.is_available():
        raise InputError("this build of torch has no torch.distributed: train in one process")
    local_rank = _environment_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} GPUs, "
                "use --nproc-per-node at most that many"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a second fit in the same processes (compare) reuses the group
        _import_what_would_hold_the_group()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def _import_what_would_hold_the_group() -> None:
    """Import, before the process group exists, the torch module that would otherwise keep it alive.

    ``torch.distributed.nn.functional`` declares its functions with ``group=group.WORLD``, a
    default evaluated once, at import. DistributedDataParallel's constructor imports it (through
    ``torch._dynamo``); imported then, after ``init_process_group``, each of those functions holds
    the default group for good, :func:`leave_process_group` cannot free it, and gloo's worker
    threads outlive it into interpreter shutdown. A worker that then drops the last reference to
    a tensor of a finished collective needs the GIL, which a finalizing interpreter answers by
    ending the thread: ``terminate called without an active exception`` and SIGABRT, now and
    then, on a rank that exits right after its last collective. Imported first, the defaults are
    ``None`` and destroying the group joins its threads.
    """
    import torch.distributed.nn.functional  # noqa: F401


def leave_process_group() -> None:
    """Destroy the process group, if one was joined: call it before a torchrun worker exits.

    Destroying the group frees gloo's (or NCCL's) backend, whose destructor finishes its queued
    work and joins its threads while the interpreter is still whole; left to interpreter
    shutdown, a thread still releasing a finished collective's tensors aborts the process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m elbolab ARGV`` in ``nproc`` processes on this machine, as ``torchrun --standalone`` would.

    Returns the exit status: 0 when every rank succeeded, else that of the lowest rank that
    exited with an error (each has printed its own), or 128 + N when the ranks were killed by
    signal N. On CPU each rank gets ``cores / nproc`` threads unless ``OMP_NUM_THREADS`` is set.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The agent logs each worker it starts, signals and reaps; the workers print their own errors.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id="elbolab", rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "elbolab", *argv)
    except ChildFailedError as failed:
        statuses = [failure.exitcode for _, failure in sorted(failed.failures.items())]
        return next((status for status in statuses if status > 0), 128 - min(statuses))
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


class DataParallelLoss:
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


def epoch_order(num_points: int, device: torch.device, group: ProcessGroup | None) -> Tensor:
    """The epoch's random order of the data points: rank 0's on every rank."""
    if group is None:
        return torch.randperm(num_points, device=device)
    order = torch.randperm(num_points, device=device) if group.rank == 0 else torch.empty(num_points, dtype=torch.long, device=device)
    return group.broadcast(order)


def agree_to_stop(group: ProcessGroup | None, requested: bool, step: int, first_of_epoch: bool, every: int) -> bool:
    """Whether training stops before this step: a stop ``requested`` here, or on any rank.

    Every rank must stop at the same step, and agreeing costs a host sync, so the ranks agree
    only every ``every`` steps (where the divergence check syncs anyway) and at an epoch's first
    step; torchrun gives workers 30 s after forwarding a signal.
    """
    if group is None:
        return requested
    if not first_of_epoch and step % every:
        return False
    return group.any(requested)


def rank_generators(group: ProcessGroup) -> dict[str, Tensor]:
    """Every rank's torch generator states (CPU, and its GPU's), gathered for rank 0's checkpoint (a collective)."""
    states = {f"rank.{r}.torch": state for r, state in enumerate(group.gather(torch.get_rng_state()))}
    if group.device.type == "cuda":
        cuda = group.gather(torch.cuda.get_rng_state(group.device))
        states |= {f"rank.{r}.cuda": state for r, state in enumerate(cuda)}
    return states


def restore_rank_generators(group: ProcessGroup, loop: dict[str, Tensor], seed: int, step: int) -> None:
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
