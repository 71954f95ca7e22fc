"""Declarative latent-variable models: list the latents, name a decoder and a likelihood.

    z_1 ~ p_1,   z_2 ~ p_2(z_2 | z_1) (optional dependence),   ...,   x | z ~ p(x | decoder([z_1, z_2, ...]))

:class:`LatentModel` builds the Pyro program that follows the model contract (every latent and
``"x"`` inside ``pyro.plate("data")``; ``model(None, batch_size=n)`` generates), so that any
guide and objective of elbolab train it; :class:`~elbolab.guides.AutoAmortizedGuide` gives it an
encoder without writing one. A latent whose prior depends on another gets a small network from
the parent's value to the unconstrained parameters of its prior, as in a ladder of stochastic
layers (Sonderby et al. 2016).

Example, a 16-dimensional code and a positive per-image brightness over binarized digits:

    >>> model = LatentModel(
    ...     x_dim=64,
    ...     latents=[Latent("code", 16), Latent("brightness", prior=dist.LogNormal, params=(0.0, 0.3))],
    ...     decoder=(128,),
    ...     likelihood="bernoulli",
    ... )
    >>> guide = AutoAmortizedGuide(model, x[:10], hidden=(128,))
    >>> fit(model, guide, x, epochs=50)
"""

from __future__ import annotations

__all__ = ["Latent", "LatentModel"]

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import biject_to

from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood
from elbolab.nn import mlp

RESERVED = ("x", "data")


@dataclass(frozen=True)
class Latent:
    """One latent variable of a :class:`LatentModel`, one value per data point.

    Attributes:
        name: the sample site's name.
        shape: its shape per data point: an int, a tuple, or ``()`` for a scalar.
        prior: a Pyro distribution class (``dist.Normal``, ``dist.LogNormal``, ``dist.Gamma``, ...).
        params: the prior's parameters, in the order of the class's arguments; ignored when
            ``given`` is set.
        given: the name of an earlier latent the prior depends on: its parameters are then a
            network of that latent's value.
    """

    name: str
    shape: int | tuple[int, ...] = ()
    prior: type[dist.TorchDistribution] = dist.Normal
    params: tuple[float, ...] = (0.0, 1.0)
    given: str | None = None

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size((self.shape,) if isinstance(self.shape, int) else self.shape)


class LatentModel(nn.Module):
    """A Pyro model built from a list of :class:`Latent` s, a decoder and a likelihood.

    Arguments:
        x_dim: data width.
        latents: the latent variables, in sampling order.
        decoder: hidden widths of an MLP from the concatenated (flattened) latents to the
            likelihood's parameters, or any ``nn.Module`` doing that map.
        likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"continuous-bernoulli"``.
        activation: activation of the networks elbolab builds.
        obs_scale: Gaussian likelihood only: a fixed scale, or ``None`` to learn one per pixel.
        conditional_hidden: hidden widths of the networks of dependent priors.
    """

    def __init__(
        self,
        x_dim: int,
        latents: Sequence[Latent],
        decoder: Sequence[int] | nn.Module = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        conditional_hidden: Sequence[int] = (64,),
    ) -> None:
        super().__init__()
        self.latents = list(latents)
        seen: dict[str, Latent] = {}
        for latent in self.latents:
            if latent.name in seen or latent.name in RESERVED:
                raise InputError(f"LatentModel: latent name {latent.name!r} is reserved or used twice")
            if latent.given is not None and latent.given not in seen:
                raise InputError(f"LatentModel: latent {latent.name!r} is given {latent.given!r}, which is not an earlier latent")
            if not (isinstance(latent.prior, type) and issubclass(latent.prior, torch.distributions.Distribution)):
                raise InputError(f"LatentModel: the prior of {latent.name!r} must be a distribution class such as dist.Normal")
            seen[latent.name] = latent
        self.widths = {latent.name: math.prod(latent.event_shape) for latent in self.latents}
        self.x_dim = x_dim
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        total = sum(self.widths.values())
        self.decoder = decoder if isinstance(decoder, nn.Module) else mlp(total, tuple(decoder), x_dim, activation)
        self.conditionals = nn.ModuleDict()
        for latent in self.latents:
            names = list(latent.prior.arg_constraints)
            if latent.given is not None:
                out = len(names) * self.widths[latent.name]
                self.conditionals[latent.name] = mlp(self.widths[latent.given], tuple(conditional_hidden), out, activation)
            else:
                for index, value in enumerate(latent.params):
                    # Buffers, so that the priors move with the model to another device.
                    self.register_buffer(f"prior_{latent.name}_{index}", torch.as_tensor(float(value)), persistent=False)

    def prior(self, latent: Latent, values: dict[str, Tensor]) -> dist.TorchDistribution:
        """``p(latent | its parent)`` for a batch, event shape ``latent.event_shape``."""
        shape = latent.event_shape
        if latent.given is None:
            params = [getattr(self, f"prior_{latent.name}_{i}") for i in range(len(latent.params))]
            prior = latent.prior(*params)
            return prior.expand(shape).to_event(len(shape)) if shape else prior
        parent = values[latent.given]
        batch = parent.shape[: parent.dim() - len(self._latent(latent.given).event_shape)]
        raw = self.conditionals[latent.name](parent.reshape(*batch, -1))
        names = list(latent.prior.arg_constraints)
        params = {
            name: biject_to(latent.prior.arg_constraints[name])(chunk).reshape(*batch, *shape)
            for name, chunk in zip(names, raw.chunk(len(names), dim=-1), strict=True)
        }
        prior = latent.prior(**params)
        return prior.to_event(len(shape)) if shape else prior

    def _latent(self, name: str) -> Latent:
        return next(latent for latent in self.latents if latent.name == name)

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        n = x.shape[0] if x is not None else (batch_size or 1)
        values: dict[str, Tensor] = {}
        with pyro.plate("data", n):
            for latent in self.latents:
                values[latent.name] = pyro.sample(latent.name, self.prior(latent, values))
            pieces = []
            for latent in self.latents:
                value = values[latent.name]
                batch = value.shape[: value.dim() - len(latent.event_shape)]
                pieces.append(value.reshape(*batch, self.widths[latent.name]))
            return pyro.sample("x", self.observation(self.decoder(torch.cat(pieces, dim=-1))), obs=x)

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        """``n`` draws from the prior, decoded: the means of ``p(x | z)``, or samples with ``mean=False``."""
        return decode_prior_draws(self, n, mean=mean)

    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Encode ``x`` with ``guide`` (one draw of every latent) and decode it: ``[N, x_dim]``."""
        if guide is None:
            raise InputError("LatentModel.reconstruct needs the guide that encodes x")
        return decode_posterior_draws(self, guide, x, mean=mean)
