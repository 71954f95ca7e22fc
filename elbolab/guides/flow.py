"""An amortized normalizing-flow posterior: a diagonal Gaussian pushed through conditional flows.

    z_0 ~ N(mu(x), diag sigma(x)^2),   z = f_L(... f_1(z_0; h(x)) ...; h(x))
    log q(z | x) = log N(z_0; mu, sigma) - sum_l log |det df_l / dz_{l-1}|

(Rezende & Mohamed 2015, "Variational inference with normalizing flows"; Kingma et al. 2016,
"Improved variational inference with inverse autoregressive flow"). The encoder gives the base
Gaussian and an embedding ``h(x)`` on which every flow layer is conditioned, so that one set of
flow weights serves every data point.

The layers are Pyro's conditional transforms (``pyro.distributions.transforms.conditional_*``):
they are already ``TransformModule``s that Pyro's sample sites, objectives and caches understand,
and they need no dependency beyond Pyro. ``flow`` picks the layer:

- ``"iaf"``: affine autoregressive (Kingma et al. 2016), a MADE network per layer; sampling is
  one pass, and the log density of the guide's own samples comes from the transform's cache.
- ``"spline"``: autoregressive linear-rational splines (Dolatabadi et al. 2020, after the neural
  spline flows of Durkan et al. 2019), 8 bins on [-3, 3], identity outside.
- ``"affine-coupling"``: RealNVP coupling (Dinh et al. 2017), cheap in both directions.
- ``"planar"``, ``"radial"``: Rezende & Mohamed's layers; not invertible in closed form, so the
  estimators that re-evaluate ``log q`` at a given z without the cache (``*-stl``, ``iwae-dreg``)
  refuse them.

Between autoregressive and coupling layers the coordinates are reversed, so that every coordinate
is transformed conditionally on every other one after two layers (and once more after the last
layer when needed to make the number of reversals even). The last layer of every flow's parameter
network is set so that the whole flow starts at the identity and training starts from the plain
Gaussian guide.
"""

from __future__ import annotations

__all__ = ["FLOWS", "FlowGuide"]

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.errors import InputError, closest_names
from elbolab.nn import mlp, trunk_width
from elbolab.param_store import register

SPLINE_BINS = 8
SPLINE_MIN_DERIVATIVE = 1e-3  # Pyro's default for its splines

# flow name -> conditional layer (z_dim, context_dim, hidden widths of its parameter network)
_LAYERS: dict[str, Callable[[int, int, list[int]], T.ConditionalTransformModule]] = {
    "iaf": lambda z, c, h: T.conditional_affine_autoregressive(z, c, hidden_dims=h),
    "spline": lambda z, c, h: T.conditional_spline_autoregressive(z, c, hidden_dims=h, count_bins=SPLINE_BINS, bound=3.0),
    "affine-coupling": lambda z, c, h: T.conditional_affine_coupling(z, c, hidden_dims=h),
    "planar": lambda z, c, h: T.conditional_planar(z, c, hidden_dims=h),
    "radial": lambda z, c, h: T.conditional_radial(z, c, hidden_dims=h),
}
FLOWS = tuple(_LAYERS)
_PERMUTED = ("iaf", "spline", "affine-coupling")  # layers that transform some coordinates given others


def _start_at_identity(layer: nn.Module, flow: str, z_dim: int) -> None:
    """Set the output layer of a flow layer's parameter network so that the layer is the identity.

    Zero outputs make the affine, coupling and radial layers the identity. A spline needs unit
    derivatives at its knots (``min_derivative + softplus(d) = 1``). A planar layer
    ``z + u_hat tanh(w^T z + b)`` is the identity when ``u_hat = 0``; with Pyro's invertibility
    correction ``u_hat = u + (softplus(w^T u) - 1 - w^T u) w / |w|^2`` that needs
    ``w^T u = log(e - 1)``, so ``w`` starts at a fixed unit vector and ``u`` along it.
    """
    last = [m for m in layer.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    with torch.no_grad():
        if flow == "spline":
            # Output rows are [widths, heights, derivatives, lambdas] x z_dim, bins each (derivatives bins - 1).
            start, stop = 2 * SPLINE_BINS * z_dim, (3 * SPLINE_BINS - 1) * z_dim
            last.bias[start:stop] = math.log(math.expm1(1.0 - SPLINE_MIN_DERIVATIVE))
        elif flow == "planar":  # outputs [b, u, w]
            direction = torch.full((z_dim,), z_dim**-0.5)
            last.bias[1 : 1 + z_dim] = math.log(math.e - 1) * direction
            last.bias[1 + z_dim :] = direction


class FlowGuide(nn.Module):
    """Amortized flow posterior for one latent site inside ``pyro.plate("data")``.

    Arguments:
        x_dim: data width.
        z_dim: latent width.
        flow: one of :data:`FLOWS`.
        flow_depth: number of flow layers L (the [guide] option of the same name).
        hidden: hidden widths of the encoder; its last hidden layer is the flows' context h(x).
        flow_hidden: hidden widths of each layer's parameter network (default ``[max(4 z_dim, 32)]``).
        site: name of the model's latent sample site.
        activation: encoder activation.
        trunk: a module ``[N, x_dim] -> [N, F]`` to use as the encoder's trunk instead of the MLP
            of ``hidden`` (e.g. :class:`~elbolab.nn.conv.ConvEncoder`, or a user's own network).
        min_scale: lower bound of the base Gaussian's scale.

    Example:
        >>> guide = FlowGuide(784, 20, flow="iaf", flow_depth=4, hidden=(400,))
        >>> q = guide.distribution(torch.zeros(3, 784))  # batch [3], event [20]
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        flow: str = "iaf",
        flow_depth: int = 4,
        hidden: Sequence[int] = (400,),
        flow_hidden: Sequence[int] | None = None,
        site: str = "z",
        activation: str = "relu",
        min_scale: float = 1e-4,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if flow not in FLOWS:
            raise InputError(f"FlowGuide: unknown flow {flow!r}; {closest_names(flow, FLOWS)}")
        if not is_integer(flow_depth) or flow_depth < 1:
            raise InputError(f"FlowGuide: flow_depth must be a positive integer, got {flow_depth}")
        if flow in _PERMUTED and z_dim < 2:
            raise InputError(f"FlowGuide: the {flow} flow needs z_dim of 2 or more, got {z_dim}")
        if not hidden and trunk is None:
            raise InputError("FlowGuide: hidden needs at least one width (its last layer is the flows' context)")
        self.trunk = trunk if trunk is not None else mlp(x_dim, tuple(hidden), None, activation)
        context_dim = trunk_width(self.trunk, x_dim) if trunk is not None else hidden[-1]
        self.head = nn.Linear(context_dim, 2 * z_dim)
        widths = list(flow_hidden) if flow_hidden is not None else [max(4 * z_dim, 32)]
        self.layers = nn.ModuleList(_LAYERS[flow](z_dim, context_dim, widths) for _ in range(int(flow_depth)))
        for layer in self.layers:
            _start_at_identity(layer, flow, z_dim)
        self.flow, self.z_dim, self.site, self.min_scale = flow, z_dim, site, min_scale
        self.register_buffer("reversal", torch.arange(z_dim - 1, -1, -1), persistent=False)

    def distribution(self, x: Tensor) -> dist.TransformedDistribution:
        """``q(z | x)`` for a batch: batch shape ``[N]``, event shape ``[z_dim]``."""
        return self.distribution_from(self.local_parameters(x))

    def local_parameters(self, x: Tensor) -> Tensor:
        """What the encoder gives each point, ``[N, F + 2 z_dim]``: the flows' context h(x), the base's loc and raw scale.

        With :meth:`sample_local`, what a per-point optimized guide of this family optimizes
        (:class:`~elbolab.guides.per_point.PerPointGuide`); the flow layers' weights are shared.
        """
        context = self.trunk(x)
        return torch.cat([context, self.head(context)], dim=-1)

    def distribution_from(self, local: Tensor) -> dist.TransformedDistribution:
        """``q(z)`` of the given :meth:`local_parameters`: batch shape ``[N]``, event shape ``[z_dim]``."""
        context, loc, raw_scale = local.split([local.shape[-1] - 2 * self.z_dim, self.z_dim, self.z_dim], dim=-1)
        base = dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
        transforms: list[dist.transforms.Transform] = []
        for index, layer in enumerate(self.layers):
            if index > 0 and self.flow in _PERMUTED:
                transforms.append(T.Permute(self.reversal))
            transforms.append(layer.condition(context))
        if self.flow in _PERMUTED and len(self.layers) % 2 == 0:
            transforms.append(T.Permute(self.reversal))  # an even number of reversals: identity at init
        return dist.TransformedDistribution(base, transforms)

    def sample_local(self, local: Tensor) -> Tensor:
        """The guide's program given its :meth:`local_parameters` instead of x."""
        q = self.distribution_from(local)
        with pyro.plate("data", local.shape[0]):
            return pyro.sample(self.site, q)

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        return self.sample_local(self.local_parameters(x))
