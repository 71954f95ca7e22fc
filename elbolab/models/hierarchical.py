"""The hierarchical VAE: several stochastic layers of Gaussian latents above the data.

    p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1),
    p(z_L) = N(0, I),    p(z_l | z_{l+1}) = N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)

with learned conditional means and scales (Burda et al. 2016, section 5, two stochastic layers;
Sonderby et al. 2016, "Ladder variational autoencoders"). ``z_1`` is the layer next to the data.
The IWAE paper's two-layer architecture is

    HierarchicalVAE(784, z_dims=(100, 50), hidden=(200, 200), hidden_upper=(100, 100), activation="tanh")

Its guides are in :mod:`elbolab.guides.hierarchical`: the ladder guide, which shares this model's
top-down networks, and the bottom-up guide ``q(z_1 | x) q(z_2 | z_1) ...``.
"""

from __future__ import annotations

__all__ = ["HierarchicalVAE"]

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood, ModelConfig, start_at_data_mean
from elbolab.nn import Architecture, GaussianEncoder
from elbolab.nn.architecture import output_layer
from elbolab.param_store import register


class HierarchicalVAE(nn.Module):
    """``L`` stochastic layers of diagonal-Gaussian latents, sites ``"z1"`` (next to x) to ``"zL"``.

    Follows the model contract: every ``"z{l}"`` and the observation ``"x"`` sit inside
    ``pyro.plate("data", N)``; ``model(None, batch_size=n)`` generates. ``top_down[l]`` maps
    ``z_{l+2}`` to the mean and scale of ``p(z_{l+1} | z_{l+2})`` (0-based ``l``), the networks the
    ladder guide shares.

    Arguments:
        x_dim: data width.
        z_dims: widths of the stochastic layers, ``z_1`` (next to the data) first; two or more.
        hidden: hidden widths between ``x`` and ``z_1`` (encoder side; the decoder runs them reversed).
        hidden_upper: hidden widths between consecutive stochastic layers (default: ``hidden``).
        likelihood, activation, obs_scale: as for :class:`~elbolab.models.VAE`.
        architecture: the networks between ``x`` and ``z_1`` (a transposed-convolution decoder
            with ``ModelConfig(arch="conv").architecture(image_shape)``); default an MLP of ``hidden``.
            The layers between stochastic layers are MLPs of ``hidden_upper``.

    Example:
        >>> model = HierarchicalVAE(784, z_dims=(100, 50), hidden=(200, 200), hidden_upper=(100, 100))
        >>> model.sites
        ('z1', 'z2')
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int] = (50, 20),
        hidden: Sequence[int] = (400,),
        hidden_upper: Sequence[int] | None = None,
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        architecture: Architecture | None = None,
    ) -> None:
        super().__init__()
        if len(z_dims) < 2:
            raise InputError(f"an hvae needs two or more stochastic layers in z_dims, got {tuple(z_dims)}")
        architecture = architecture or Architecture("mlp", tuple(hidden), activation)
        hidden, activation = architecture.hidden, architecture.activation
        self.config = ModelConfig(
            "hvae", hidden=tuple(hidden), likelihood=likelihood, activation=activation, obs_scale=obs_scale,
            z_dims=tuple(z_dims), hidden_upper=tuple(hidden_upper or hidden), arch=architecture.kind,
            channels=architecture.channels, kernel=architecture.kernel, residual_blocks=architecture.residual_blocks,
            gated=architecture.gated,
        )
        self.image_shape = architecture.image_shape
        self.x_dim, self.z_dims = x_dim, self.config.z_dims
        self.sites = tuple(f"z{level + 1}" for level in range(len(self.z_dims)))
        upper = tuple(reversed(self.config.hidden_upper))
        self.top_down = nn.ModuleList(
            GaussianEncoder(self.z_dims[level + 1], self.z_dims[level], upper, activation)
            for level in range(len(self.z_dims) - 1)
        )
        self.decoder = architecture.decoder(self.z_dims[0], x_dim)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        self.register_buffer("prior_loc", torch.zeros(self.z_dims[-1]), persistent=False)
        self.register_buffer("prior_scale", torch.ones(self.z_dims[-1]), persistent=False)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> HierarchicalVAE:
        """Start the decoder at the data's per-pixel mean (see :meth:`VAE.init_output_bias`)."""
        start_at_data_mean(output_layer(self.decoder), x, self.config.likelihood)
        return self

    def conditional_prior(self, level: int, upper: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of ``p(z_level | z_{level+1} = upper)``, 1-based ``level`` below the top."""
        return self.top_down[level - 1](upper)

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        n = x.shape[0] if x is not None else (batch_size or 1)
        top = len(self.z_dims)
        with pyro.plate("data", n):
            z = pyro.sample(f"z{top}", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
            for level in range(top - 1, 0, -1):
                loc, scale = self.conditional_prior(level, z)
                z = pyro.sample(f"z{level}", dist.Normal(loc, scale).to_event(1))
            return pyro.sample("x", self.observation(self.decoder(z)), obs=x)

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        """``n`` ancestral draws ``z_L, ..., z_1`` decoded: means of ``p(x | z_1)``, or samples with ``mean=False``."""
        return decode_prior_draws(self, n, mean=mean)

    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Encode ``x`` with ``guide`` (one draw of every layer) and decode ``z_1``: ``[N, x_dim]``."""
        if guide is None:
            raise InputError("HierarchicalVAE.reconstruct needs the guide that encodes x")
        return decode_posterior_draws(self, guide, x, mean=mean)
