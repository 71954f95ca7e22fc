"""An amortized mixture of diagonal Gaussians, ``q(z | x) = sum_c pi_c(x) N(z; mu_c(x), diag sigma_c(x)^2)``.

A multimodal posterior that a single Gaussian cannot represent. Samples come from
:class:`~elbolab.distributions.DiagonalGaussianMixture`, whose ``rsample`` has exact pathwise
gradients for every parameter, the mixture weights included: the sample is differentiated through
the mixture's conditional CDFs by the implicit function theorem (Graves 2016, "Stochastic
backpropagation through mixture density distributions"), not through the discrete choice of a
component, so no score-function term and no relaxation is needed. The log density is the exact
``logsumexp_c (log pi_c + log N(z; mu_c, sigma_c))``.

There is no closed-form KL between a mixture and the Gaussian prior: ``elbo-analytic`` refuses
this guide and names its site; every Monte Carlo objective accepts it.
"""

from __future__ import annotations

__all__ = ["MixtureGuide"]

from collections.abc import Sequence

import pyro
import torch.nn.functional as F
from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.distributions import DiagonalGaussianMixture
from elbolab.errors import InputError
from elbolab.nn import mlp, trunk_width
from elbolab.param_store import register


class MixtureGuide(nn.Module):
    """Amortized mixture of ``components`` diagonal Gaussians for one latent site in ``pyro.plate("data")``.

    Arguments:
        x_dim: data width.
        z_dim: latent width.
        components: number of mixture components C.
        hidden: hidden widths of the encoder trunk shared by all components.
        site: name of the model's latent sample site.
        activation: encoder activation.
        trunk: a module ``[N, x_dim] -> [N, F]`` to use as the encoder's trunk instead of the MLP
            of ``hidden`` (e.g. :class:`~elbolab.nn.conv.ConvEncoder`, or a user's own network).
        min_scale: lower bound of every component's scale.

    Example:
        >>> guide = MixtureGuide(784, 20, components=5, hidden=(400,))
        >>> weights, locs, scales = guide.encode(torch.zeros(3, 784))  # [3, 5], [3, 5, 20], [3, 5, 20]
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        components: int = 5,
        hidden: Sequence[int] = (400,),
        site: str = "z",
        activation: str = "relu",
        min_scale: float = 1e-4,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not is_integer(components) or components < 1:
            raise InputError(f"MixtureGuide: components must be a positive integer, got {components}")
        self.trunk = trunk if trunk is not None else mlp(x_dim, tuple(hidden), None, activation)
        width = trunk_width(self.trunk, x_dim) if trunk is not None else (hidden[-1] if hidden else x_dim)
        self.head = nn.Linear(width, components * (1 + 2 * z_dim))
        self.components, self.z_dim, self.site, self.min_scale = int(components), z_dim, site, min_scale
        # Start with equal weights and components spread apart, so that they do not all learn the
        # same mode: a small random offset of each component's mean in the bias.
        nn.init.zeros_(self.head.bias)
        with_offsets = self.head.bias.data[self.components :].view(self.components, 2, z_dim)
        with_offsets[:, 0].normal_(0.0, 0.5)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixture weights ``[N, C]``, component means and scales ``[N, C, z_dim]``."""
        logits, loc, scale = self._parameters_of_q(self.local_parameters(x))
        return F.softmax(logits, -1), loc, scale

    def distribution(self, x: Tensor) -> DiagonalGaussianMixture:
        """``q(z | x)`` for a batch: batch shape ``[N]``, event shape ``[z_dim]``."""
        return self.distribution_from(self.local_parameters(x))

    def local_parameters(self, x: Tensor) -> Tensor:
        """The encoder's output for each point, ``[N, C (1 + 2 z_dim)]``: the logits, means and raw scales.

        With :meth:`sample_local`, what a per-point optimized guide of this family optimizes
        (:class:`~elbolab.guides.per_point.PerPointGuide`).
        """
        return self.head(self.trunk(x))

    def distribution_from(self, local: Tensor) -> DiagonalGaussianMixture:
        """``q(z)`` of the given :meth:`local_parameters`: batch shape ``[N]``, event shape ``[z_dim]``."""
        return DiagonalGaussianMixture(*self._parameters_of_q(local))

    def sample_local(self, local: Tensor) -> Tensor:
        """The guide's program given its :meth:`local_parameters` instead of x."""
        q = self.distribution_from(local)
        with pyro.plate("data", local.shape[0]):
            return pyro.sample(self.site, q)

    def _parameters_of_q(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, params = out[..., : self.components], out[..., self.components :]
        params = params.reshape(*out.shape[:-1], self.components, 2, self.z_dim)
        return logits, params[..., 0, :], F.softplus(params[..., 1, :]) + self.min_scale

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        return self.sample_local(self.local_parameters(x))
