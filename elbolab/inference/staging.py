"""Training data where the loop reads them: on the device once, or streamed from pinned host memory.

:func:`~elbolab.inference.fit` gathers every batch by index from tensors that already live where
the step runs, so a step copies nothing. Data too large for the GPU stay in pinned host memory
instead, and each batch is copied over asynchronously, overlapping the step. The data are
checked here once, at the boundary (finite, one row per point, the model's dtype), so that the
loop can trust them.
"""

from __future__ import annotations

__all__ = ["DEVICE_DATA_FRACTION", "StagedData", "as_matrix", "per_point_args", "stage", "validation_data"]

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from elbolab.data import Dataset
from elbolab.data.checks import as_points
from elbolab.errors import InputError

# Training data up to this fraction of the GPU's free memory are moved there once; larger data
# stay in pinned host memory and stream over, batch by batch, leaving the GPU to the networks.
DEVICE_DATA_FRACTION = 0.5


class StagedData:
    """The training tensors ``(x, *args)``, staged by :func:`stage`, and the batches drawn from them.

    Attributes:
        x, args: the data and the further per-point tensors: on the device, or pinned on the host
            when ``streaming``.
        dynamic: ``x`` holds probabilities, binarized afresh for every batch (dynamic binarization).
        streaming: batches are copied from the host, one per step.
        device: where batches go.
        num_points: rows of ``x``.
    """

    def __init__(self, x: Tensor, args: tuple[Tensor, ...], dynamic: bool, device: torch.device) -> None:
        (self.x, *rest), self.streaming = stage((x, *args), device)
        self.args = tuple(rest)
        self.dynamic, self.device, self.num_points = dynamic, device, x.shape[0]

    def rows(self, index: Tensor | slice) -> tuple[Tensor, ...]:
        """The batch ``(x, *args)`` of these rows, on the device; ``x`` drawn from its probabilities when dynamic."""
        x = self._fetch(self.x, index)
        return (torch.bernoulli(x) if self.dynamic else x, *(self._fetch(a, index) for a in self.args))

    def indices(self, order: Tensor) -> Tensor:
        """``order`` where rows are gathered with it: on the host when streaming (one copy per epoch, not per batch)."""
        return order.cpu() if self.streaming else order

    def _fetch(self, tensor: Tensor, index: Tensor | slice) -> Tensor:
        if not self.streaming:
            return tensor[index]
        return tensor[index].pin_memory().to(self.device, non_blocking=True)


def stage(tensors: tuple[Tensor, ...], device: torch.device) -> tuple[tuple[Tensor, ...], bool]:
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


def as_matrix(data: Dataset | Tensor, what: str, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """The data as a tensor of the model's dtype, checked (a numpy array is converted), and whether it is dynamically binarized."""
    if isinstance(data, Dataset):
        return data.x.to(dtype), data.dynamic_binarization
    if not isinstance(data, Tensor) and not isinstance(data, np.ndarray):
        raise InputError(f"{what} must be a Dataset, a tensor or a numpy array, got {type(data).__name__}")
    return as_points(data, what, dtype=dtype), False


def per_point_args(args: Sequence[Tensor], num_points: int, what: str) -> tuple[Tensor, ...]:
    """``args`` checked: tensors with one finite row per data point."""
    args = tuple(args)
    for index, arg in enumerate(args):
        if not isinstance(arg, Tensor) or arg.ndim == 0 or arg.shape[0] != num_points:
            shape = tuple(arg.shape) if isinstance(arg, Tensor) else type(arg).__name__
            raise InputError(f"{what}[{index}] must be a tensor with one row per data point ({num_points}), got {shape}")
        if arg.is_floating_point() and not torch.isfinite(arg).all():
            raise InputError(f"{what}[{index}] contains NaN or infinite values")
    return args


def validation_data(valid: Dataset | Tensor | None, valid_args: Sequence[Tensor], x: Tensor, num_args: int,
                    dtype: torch.dtype, seed: int, device: torch.device) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """The validation data and their args, checked against the training data ``x`` and moved to ``device``.

    Dynamically binarized validation data are binarized once, under ``seed``: the per-epoch
    validation ELBO then compares like with like across epochs.
    """
    if valid is None:
        return None, tuple(per_point_args(valid_args, 0, "valid_args"))
    valid_x, dynamic = as_matrix(valid, "validation data", dtype)
    if dynamic:
        valid_x = valid.fixed_binarization(seed).x.to(dtype)
    if valid_x.shape[1:] != x.shape[1:]:
        raise InputError(f"validation data have {tuple(valid_x.shape[1:])} features, training data {tuple(x.shape[1:])}")
    valid_args = per_point_args(valid_args, valid_x.shape[0], "valid_args")
    if len(valid_args) != num_args:
        raise InputError(f"fit was given {num_args} args for the training data but {len(valid_args)} valid_args")
    return valid_x.to(device), tuple(a.to(device) for a in valid_args)
