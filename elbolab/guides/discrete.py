"""Amortized guides for a model's discrete latents that are sampled, not summed out.

    q(d_s | x) = Categorical / OneHotCategorical / Bernoulli(logits_s(x)),   one head per site s

An encoder maps ``x`` to the logits of every discrete site of a point at once; each site is then
sampled inside the data plate with the model's distribution family. Such sites have no
reparameterized sampler, and the objectives give them score-function gradients:
``elbo`` with a learned baseline (NVIL), ``iwae`` with VIMCO's leave-one-out baselines
(:mod:`elbolab.inference.elbo`, :mod:`elbolab.inference.iwae`). A discrete latent that the model
marks for enumeration needs no head: every objective sums it out exactly.
"""

from __future__ import annotations

__all__ = ["DISCRETE_FAMILIES", "DiscreteHeads", "discrete_site"]

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.nn import mlp

# The model's distribution families a head can be, by the name of the guide's.
DISCRETE_FAMILIES = ("Categorical", "OneHotCategorical", "Bernoulli")


@dataclass(frozen=True)
class DiscreteSite:
    """A discrete latent of one data point: its family, the shape of its logits and its event dims."""

    name: str
    family: str
    logits_shape: torch.Size
    event_dim: int

    @property
    def size(self) -> int:
        return math.prod(self.logits_shape)


def _base(fn: Any) -> tuple[Any, int]:
    """The distribution under ``to_event`` and ``expand`` wrappers, and how many batch dims ``to_event`` made event dims."""
    reinterpreted = 0
    while True:
        if isinstance(fn, torch.distributions.Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, reinterpreted


def discrete_site(name: str, fn: Any, batch_size: int) -> DiscreteSite:
    """The head a local discrete site of batch shape ``[N]`` needs; another family or layout is refused by name."""
    base, _ = _base(fn)
    family = next((f for f in DISCRETE_FAMILIES if type(base).__name__ == f), None)
    if family is None:
        raise InputError(
            f"AutoAmortizedGuide: latent site {name!r} is discrete ({type(base).__name__}), and the auto guide has heads for "
            f"{', '.join(DISCRETE_FAMILIES)} only; mark it infer={{'enumerate': 'parallel'}} to sum it out, or write its guide"
        )
    if tuple(fn.batch_shape) != (batch_size,):
        raise InputError(
            f"AutoAmortizedGuide: discrete site {name!r} has batch shape {list(fn.batch_shape)}; a sampled discrete latent "
            f"needs one value per data point (batch shape [{batch_size}]), its further dims as event dims (to_event)"
        )
    event = tuple(fn.event_shape)
    if family == "Categorical":
        logits_shape = torch.Size((*event, base.logits.shape[-1]))
    else:  # OneHotCategorical's event is its one-hot vector; Bernoulli's logits are its value's shape
        logits_shape = torch.Size(event)
    return DiscreteSite(name, family, logits_shape, len(event))


class DiscreteHeads(nn.Module):
    """One encoder ``x -> logits`` of every discrete site; :meth:`forward` samples them in the current data plate.

    Arguments:
        x_width: the width of a flattened data point.
        sites: the sites' :class:`DiscreteSite` descriptions.
        hidden, activation: the encoder's hidden widths and activation.
    """

    def __init__(self, x_width: int, sites: Sequence[DiscreteSite], hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.sites = tuple(sites)
        self.encoder = mlp(x_width, tuple(hidden), sum(site.size for site in self.sites), activation)

    def forward(self, x: Tensor) -> None:
        logits = self.encoder(x.reshape(x.shape[0], -1))
        start = 0
        for site in self.sites:
            piece = logits[:, start : start + site.size].reshape(x.shape[0], *site.logits_shape)
            start += site.size
            if site.family == "Categorical":
                q = dist.Categorical(logits=piece)
            elif site.family == "OneHotCategorical":
                q = dist.OneHotCategorical(logits=piece)
            else:
                q = dist.Bernoulli(logits=piece)
            # The one-hot vector is OneHotCategorical's own event; other event dims are the site's.
            own = 1 if site.family == "OneHotCategorical" else 0
            pyro.sample(site.name, q.to_event(site.event_dim - own) if site.event_dim > own else q)
