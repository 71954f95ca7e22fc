"""The conditional variational autoencoder: a VAE of ``x`` given a label or any conditioning vector ``y``.

    z ~ N(0, I),    x | z, y ~ p_theta(x | z, y),    q_phi(z | x, y)

(Sohn, Lee & Yan 2015, "Learning structured output representation using deep conditional
generative models"; Kingma et al. 2014, "Semi-supervised learning with deep generative models",
model M2 with observed labels). The decoder reads ``[z, y]``; the guide reads ``[x, y]``
(:class:`~elbolab.guides.ConditionalGuide`). Because ``y`` is given, ``z`` is free to carry
what ``y`` does not (style, for digits), and ``generate(n, y=c)`` draws new data of class ``c``.
"""

from __future__ import annotations

__all__ = ["ConditionalVAE", "as_condition"]

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood, ModelConfig, start_at_data_mean
from elbolab.nn import Architecture
from elbolab.nn.architecture import output_layer
from elbolab.param_store import register


def as_condition(y: Tensor | int | Sequence[int], y_dim: int, n: int | None = None) -> Tensor:
    """A conditioning matrix ``[N, y_dim]`` from integer labels (one-hot) or from a float matrix.

    Arguments:
        y: integer class labels ``[N]`` (or one label, repeated ``n`` times), or float rows ``[N, y_dim]``.
        y_dim: number of classes, or width of the conditioning vector.
        n: rows wanted, to repeat a single label.
    """
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    if not y.is_floating_point():
        if y.ndim == 0:
            y = y.expand(n or 1)
        if y.ndim != 1:
            raise InputError(f"integer labels must have shape [N], got {tuple(y.shape)}")
        if y.numel() and (y.min() < 0 or y.max() >= y_dim):
            raise InputError(f"labels must lie in 0..{y_dim - 1}, got values from {y.min().item()} to {y.max().item()}")
        return F.one_hot(y.long(), y_dim).float()
    if y.ndim == 1 and n is not None and y.shape[0] == y_dim:
        y = y.expand(n, y_dim)
    if y.ndim != 2 or y.shape[1] != y_dim:
        raise InputError(f"a conditioning matrix must have shape [N, {y_dim}], got {tuple(y.shape)}")
    return y


class ConditionalVAE(nn.Module):
    """The conditional VAE ``p(z) p(x | z, y)``, a Pyro program taking ``(x, y)``.

    Follows the model contract with one extra argument: latent ``"z"`` and observation ``"x"``
    inside ``pyro.plate("data", N)``; ``model(None, y)`` generates one ``x`` per row of ``y``.
    ``y`` is a float matrix ``[N, y_dim]`` (one-hot labels, as :func:`fit` receives them) or
    integer labels ``[N]``, one-hot encoded here. Pair it with a guide taking ``(x, y)``, e.g.
    ``ConditionalGuide(GaussianGuide(x_dim + y_dim, z_dim), y_dim)``.

    Arguments:
        x_dim: data width.
        y_dim: number of classes, or width of the conditioning vector.
        z_dim: latent width.
        hidden, likelihood, activation, obs_scale, architecture: as for :class:`~elbolab.models.VAE`;
            the decoder reads ``[z, y]``.

    Example:
        >>> model = ConditionalVAE(64, 10, 8, hidden=(128,))
        >>> threes = model.generate(16, y=3)  # [16, 64] Bernoulli means of digits of class 3
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        architecture: Architecture | None = None,
    ) -> None:
        super().__init__()
        if not is_integer(y_dim) or y_dim < 1:
            raise InputError(f"y_dim must be a positive integer, got {y_dim}")
        architecture = architecture or Architecture("mlp", tuple(hidden), activation)
        self.config = ModelConfig("cvae", z_dim, architecture.hidden, likelihood, architecture.activation, obs_scale,
                                  arch=architecture.kind, channels=architecture.channels, kernel=architecture.kernel,
                                  residual_blocks=architecture.residual_blocks, gated=architecture.gated)
        self.x_dim, self.y_dim, self.z_dim = x_dim, int(y_dim), z_dim
        self.image_shape = architecture.image_shape
        self.decoder = architecture.decoder(z_dim + self.y_dim, x_dim)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        self.register_buffer("prior_loc", torch.zeros(z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(z_dim), persistent=False)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> ConditionalVAE:
        """Start the decoder at the data's per-pixel mean (see :meth:`VAE.init_output_bias`)."""
        start_at_data_mean(output_layer(self.decoder), x, self.config.likelihood)
        return self

    def forward(self, x: Tensor | None = None, y: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        if y is None:
            raise InputError("a ConditionalVAE needs the conditioning y (labels [N] or a matrix [N, y_dim])")
        n = x.shape[0] if x is not None else (batch_size or y.shape[0])
        y = y if y.is_floating_point() else as_condition(y, self.y_dim, n)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
            # Under a particle plate z gains leading dims; y is broadcast to them.
            y = y.expand(*z.shape[:-1], self.y_dim)
            return pyro.sample("x", self.observation(self.decoder(torch.cat([z, y], dim=-1))), obs=x)

    def generate(self, n: int, y: Tensor | int | Sequence[int] | None = None, *, mean: bool = True) -> Tensor:
        """``n`` draws ``z ~ p(z)`` decoded given ``y``: one label for all (``y=3``), or one per row.

        Returns the means of ``p(x | z, y)`` (or samples with ``mean=False``), ``[n, x_dim]``.
        """
        if y is None:
            raise InputError("ConditionalVAE.generate needs y: a class label such as y=3, or one per sample")
        condition = as_condition(y, self.y_dim, n).to(self.prior_loc.device)
        if condition.shape[0] != n:
            raise InputError(f"generate({n}, y=...) needs one label or {n} of them, got {condition.shape[0]}")
        return decode_prior_draws(self, n, condition, mean=mean)

    def reconstruct(
        self, x: Tensor, y: Tensor | None = None, guide: Callable[..., Any] | None = None, *, mean: bool = True
    ) -> Tensor:
        """Encode ``(x, y)`` with ``guide`` (one draw of ``q(z | x, y)``) and decode it: ``[N, x_dim]``."""
        if y is None or guide is None:
            raise InputError("ConditionalVAE.reconstruct needs the labels y and the guide that encodes (x, y)")
        return decode_posterior_draws(self, guide, x, as_condition(y, self.y_dim, x.shape[0]).to(x.device), mean=mean)
