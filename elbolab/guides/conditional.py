"""A guide for a conditional model: any guide of ``x``, fed ``[x, y]``.

    q(z | x, y) = q_inner(z | [x, y])

The encoder of the conditional VAE reads the data and the condition side by side (Sohn et al.
2015); wrapping a guide instead of writing conditional copies of each family gives the
conditional VAE every posterior family elbolab has: diagonal Gaussian, mixture, flow.
"""

from __future__ import annotations

__all__ = ["ConditionalGuide"]

import torch
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.models.cvae import as_condition
from elbolab.param_store import register


class ConditionalGuide(nn.Module):
    """``guide(x, y)`` for a model ``model(x, y)``: runs ``inner`` on the concatenation ``[x, y]``.

    Arguments:
        inner: a guide of one argument, built for inputs of width ``x_dim + y_dim``.
        y_dim: width of the conditioning matrix (the number of classes for one-hot labels).

    Example:
        >>> guide = ConditionalGuide(GaussianGuide(64 + 10, 8, hidden=(128,)), 10)
        >>> guide(x, F.one_hot(labels, 10).float())
    """

    def __init__(self, inner: nn.Module, y_dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.y_dim = y_dim

    def forward(self, x: Tensor, y: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        return self.inner(self._inputs(x, y))

    def local_parameters(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The inner guide's :meth:`local_parameters` of ``[x, y]`` (for a per-point optimized guide)."""
        if not hasattr(self.inner, "local_parameters"):
            raise InputError(f"the conditional guide's inner {type(self.inner).__name__} has no local_parameters(x)")
        return self.inner.local_parameters(self._inputs(x, y))

    def sample_local(self, local: Tensor) -> Tensor:
        """The inner guide's program given its local parameters."""
        return self.inner.sample_local(local)

    def _inputs(self, x: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise InputError("a conditional guide needs the conditioning y that the model is given")
        if not y.is_floating_point():
            y = as_condition(y, self.y_dim)  # labels are one-hot encoded (and range-checked) as the model does
        return torch.cat([x, y.to(x.dtype)], dim=-1)
