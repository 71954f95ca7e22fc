"""An amortized diagonal-Gaussian guide, ``q(z | x) = N(mu(x), diag sigma(x)^2)``.

The VAE's encoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"): its samples are
reparameterized, ``z = mu(x) + sigma(x) * eps``, and its KL to a Gaussian prior has a closed form.
"""

from __future__ import annotations

__all__ = ["GaussianGuide"]

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from torch import Tensor, nn

from elbolab.nn import GaussianEncoder
from elbolab.param_store import register


class GaussianGuide(nn.Module):
    """Amortized diagonal-Gaussian posterior for one latent site inside ``pyro.plate("data")``.

    A plain ``nn.Module`` rather than a ``PyroModule``: its parameters are module parameters and
    never enter Pyro's global param store, and no Pyro effect runs per parameter access (a
    ``PyroModule`` emits a ``param`` message for each, which costs about a tenth of a training
    step of a 784-400-20 VAE on CPU).

    Arguments:
        x_dim: data width.
        z_dim: latent width.
        hidden: hidden widths of the encoder.
        site: name of the model's latent sample site.
        activation: encoder activation.
        trunk: a module ``[N, x_dim] -> [N, F]`` to use as the encoder's trunk instead of the MLP
            of ``hidden`` (e.g. :class:`~elbolab.nn.conv.ConvEncoder`, or a user's own network).

    Example:
        >>> guide = GaussianGuide(784, 20, hidden=(400,))
        >>> loc, scale = guide.encode(torch.zeros(3, 784))
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        site: str = "z",
        activation: str = "relu",
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = GaussianEncoder(x_dim, z_dim, tuple(hidden), activation, trunk=trunk)
        self.site = site

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's ``(loc, scale)``, each ``[N, z_dim]``."""
        return self.encoder(x)

    def distribution(self, x: Tensor) -> dist.Independent:
        """``q(z | x)`` for a batch: batch shape ``[N]``, event shape ``[z_dim]``."""
        return self.distribution_from(self.local_parameters(x))

    def local_parameters(self, x: Tensor) -> Tensor:
        """The encoder's output for each point, ``[N, 2 z_dim]``: ``loc`` and the scale before its softplus.

        With :meth:`sample_local`, what a per-point optimized guide of this family optimizes
        (:class:`~elbolab.guides.per_point.PerPointGuide`).
        """
        return self.encoder.head(self.encoder.trunk(x))

    def distribution_from(self, local: Tensor) -> dist.Independent:
        """``q(z)`` of the given :meth:`local_parameters`: batch shape ``[N]``, event shape ``[z_dim]``."""
        return dist.Normal(*self.encoder.loc_scale(local)).to_event(1)

    def sample_local(self, local: Tensor) -> Tensor:
        """The guide's program given its :meth:`local_parameters` instead of x."""
        q = self.distribution_from(local)
        with pyro.plate("data", local.shape[0]):
            return pyro.sample(self.site, q)

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        return self.sample_local(self.local_parameters(x))
