"""Observation distributions whose log density over a whole data row is one fused kernel.

``dist.Bernoulli(logits=out).to_event(1)`` computes ``-BCE(logits, x)`` elementwise and sums it:
the negation, its backward and the ``Independent`` wrapper each touch a ``[K, N, D]`` tensor.
With K = 50 importance samples of 784 binary pixels that is a tenth of an IWAE training step on
CPU (benchmarks/RESULTS.md, "The cost of K particles"). :class:`BernoulliRow` sums first and
negates the ``[K, N]`` result: same density, same gradients, fewer passes over memory.
"""

from __future__ import annotations

__all__ = ["BernoulliRow"]

from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Size, Tensor
from torch.distributions import constraints

NO_SHAPE = Size()


class BernoulliRow(dist.TorchDistribution):
    """Independent Bernoulli pixels of one data row, from logits: event shape ``[D]``.

        log p(x | logits) = sum_d [ x_d logits_d - softplus(logits_d) ]

    Equal to ``dist.Bernoulli(logits=logits).to_event(1)`` (tested), for ``x`` in ``{0, 1}`` and
    also for ``x`` in ``[0, 1]`` (the cross-entropy that grayscale data is often trained with).

    Arguments:
        logits: ``[..., D]`` log-odds of each pixel being 1.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @property
    def variance(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        return p * (1 - p)

    def expand(self, batch_shape: Size, _instance: BernoulliRow | None = None) -> BernoulliRow:
        new = BernoulliRow(self.logits.expand(*batch_shape, *self.event_shape), validate_args=False)
        new._validate_args = self._validate_args  # checks of the value still apply after a plate expands it
        return new

    def sample(self, sample_shape: Size = NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits).expand(shape))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.shape != logits.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1).neg()

    def entropy(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        return F.binary_cross_entropy_with_logits(self.logits, p, reduction="none").sum(-1)
