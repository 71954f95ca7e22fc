"""Guides for the hierarchical VAE: the ladder guide (top-down inference) and the bottom-up guide.

Bottom-up (Burda et al. 2016, section 5): ``q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})``, each a
diagonal Gaussian whose parameters an MLP computes from the layer below.

Ladder (Sonderby et al. 2016, "Ladder variational autoencoders", equations 17-21): a deterministic
bottom-up pass ``d_1 = f_1(x), d_l = f_l(d_{l-1})`` gives each layer a data-dependent estimate
``N(mu_hat_l, sigma_hat_l^2)``; inference then runs top-down, in the model's order, and combines
each estimate with the model's own conditional prior by precision weighting:

    q(z_L | x)                = N(mu_hat_L, sigma_hat_L^2)
    q(z_l | z_{l+1}, x)       = N(mu_q, sigma_q^2),   sigma_q^-2 = sigma_hat_l^-2 + sigma_p^-2,
                                 mu_q = (mu_hat_l sigma_hat_l^-2 + mu_p sigma_p^-2) sigma_q^2,

where ``(mu_p, sigma_p)`` are ``p(z_l | z_{l+1})``'s. The top-down networks are the model's, shared
as in the paper: the generative model and the posterior learn them together.
"""

from __future__ import annotations

__all__ = ["BottomUpGuide", "LadderGuide"]

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from torch import Tensor, nn

from elbolab.models.hierarchical import HierarchicalVAE
from elbolab.nn import GaussianEncoder, mlp, trunk_width
from elbolab.param_store import register

MIN_SCALE = 1e-4


class BottomUpGuide(nn.Module):
    """``q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})``: each layer encoded from the sample below it.

    Arguments:
        x_dim: data width.
        z_dims: the model's stochastic widths, ``z_1`` first.
        hidden: hidden widths of ``q(z_1 | x)``.
        hidden_upper: hidden widths of each ``q(z_{l+1} | z_l)`` (default: ``hidden``).
        activation: a key of :data:`elbolab.nn.ACTIVATIONS`.
        trunk: a module ``[N, x_dim] -> [N, F]`` to use as the trunk of ``q(z_1 | x)`` instead of
            the MLP of ``hidden`` (a :class:`~elbolab.nn.conv.ConvEncoder`).
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden: Sequence[int] = (400,),
        hidden_upper: Sequence[int] | None = None,
        activation: str = "relu",
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        widths = (x_dim, *z_dims)
        self.encoders = nn.ModuleList(
            GaussianEncoder(widths[level], widths[level + 1], tuple(hidden if level == 0 else hidden_upper or hidden), activation,
                            trunk=trunk if level == 0 else None)
            for level in range(len(z_dims))
        )

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        below = x
        with pyro.plate("data", x.shape[0]):
            for level, encoder in enumerate(self.encoders, start=1):
                loc, scale = encoder(below)
                below = pyro.sample(f"z{level}", dist.Normal(loc, scale).to_event(1))
        return below


class LadderGuide(nn.Module):
    """Top-down inference for a :class:`~elbolab.models.HierarchicalVAE`, sharing its prior networks.

    The bottom-up trunks reuse the model's widths: ``hidden`` from ``x`` to the first layer's
    features, ``hidden_upper`` between layers. ``model.top_down`` is registered here too, so that
    the guide's parameters include what its ``q`` depends on (gradient estimators that stop the
    guide's parameters, STL and DReG, stop those as well); the optimizer sees each tensor once.

    Arguments:
        model: the hierarchical VAE whose posterior this is.

    Example:
        >>> model = HierarchicalVAE(784, z_dims=(64, 32), hidden=(512, 256))
        >>> guide = LadderGuide(model)
    """

    def __init__(self, model: HierarchicalVAE) -> None:
        super().__init__()
        config = model.config
        self.z_dims = model.z_dims
        self.top_down = model.top_down  # shared with the model
        trunks, heads, width = [], [], model.x_dim
        for level, z_dim in enumerate(self.z_dims):
            if level == 0:  # the networks from x mirror the decoder's: an MLP, or convolutions
                trunks.append(config.architecture(model.image_shape).encoder(model.x_dim))
                width = trunk_width(trunks[0], model.x_dim)
            else:
                trunks.append(mlp(width, config.hidden_upper, None, config.activation))
                width = config.hidden_upper[-1]
            heads.append(GaussianEncoder(width, z_dim, (), config.activation, min_scale=MIN_SCALE))
        self.trunks, self.heads = nn.ModuleList(trunks), nn.ModuleList(heads)

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        estimates, features = [], x
        for trunk, head in zip(self.trunks, self.heads, strict=True):
            features = trunk(features)
            estimates.append(head(features))
        top = len(self.z_dims)
        with pyro.plate("data", x.shape[0]):
            loc, scale = estimates[-1]
            z = pyro.sample(f"z{top}", dist.Normal(loc, scale).to_event(1))
            for level in range(top - 1, 0, -1):
                prior_loc, prior_scale = self.top_down[level - 1](z)
                loc, scale = precision_weighted(*estimates[level - 1], prior_loc, prior_scale)
                z = pyro.sample(f"z{level}", dist.Normal(loc, scale).to_event(1))
        return z


def precision_weighted(loc_a: Tensor, scale_a: Tensor, loc_b: Tensor, scale_b: Tensor) -> tuple[Tensor, Tensor]:
    """The normalized product of ``N(loc_a, scale_a^2)`` and ``N(loc_b, scale_b^2)``: ``(loc, scale)``."""
    precision_a, precision_b = scale_a.pow(-2), scale_b.pow(-2)
    variance = 1.0 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()
