"""Declarative latent-variable models: list the latents, name a decoder and a likelihood.

    z_1 ~ p_1,   z_2 ~ p_2(z_2 | z_1) (optional dependence),   ...,   x | z ~ p(x | decoder([z_1, z_2, ...]))

:class:`LatentModel` builds the Pyro program that follows the model contract (every latent and
``"x"`` inside ``pyro.plate("data")``; ``model(None, batch_size=n)`` generates), so that any
guide and objective of elbolab train it; :class:`~elbolab.guides.AutoAmortizedGuide` gives it an
encoder without writing one. A latent whose prior depends on another gets a small network from
the parent's value to the unconstrained parameters of its prior, as in a ladder of stochastic
layers (Sonderby et al. 2016).

A prior may have an event shape of its own: ``Latent("mix", 5, prior=dist.Dirichlet, params=(1.0,))``
is one point of the 5-simplex per data point (a scalar concentration is broadcast to K = 5; or
give K of them). A latent's shape is the prior's batch shape followed by its event shape, and only
the batch part is made part of the event by ``to_event``. Discrete priors are refused: a discrete latent
is written in a Pyro program, marked for enumeration or sampled by a guide (README, "Discrete latents").

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

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import biject_to, constraints

from elbolab.data.checks import describe_support
from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood
from elbolab.nn import mlp
from elbolab.param_store import register

RESERVED = ("x", "data")
STANDARD_PARAMS = (0.0, 1.0)  # what params=None means for a location-scale prior


@dataclass(frozen=True)
class Latent:
    """One latent variable of a :class:`LatentModel`, one value per data point.

    Attributes:
        name: the sample site's name.
        shape: its shape per data point: an int, a tuple, or ``()`` for a scalar. With a prior
            that has an event shape of its own (``dist.Dirichlet``: ``[K]``), the shape ends with it.
        prior: a continuous Pyro distribution class (``dist.Normal``, ``dist.LogNormal``,
            ``dist.Gamma``, ``dist.Dirichlet``, ...).
        params: the prior's parameters, in the order of the class's arguments: numbers, or
            arrays that broadcast to the latent's shape; a scalar for a vector argument (a
            Dirichlet's concentration) is broadcast to it. ``None`` (the default) means
            ``(0.0, 1.0)`` for a location-scale prior (arguments ``loc, scale``); other priors
            need them. Not allowed with ``given``.
        given: the name of an earlier latent the prior depends on: its parameters are then a
            network of that latent's value.

    Example:
        >>> Latent("mix", 5, prior=dist.Dirichlet, params=(0.5,))  # a point of the 5-simplex
    """

    name: str
    shape: int | tuple[int, ...] = ()
    prior: type[dist.TorchDistribution] = dist.Normal
    params: tuple[float | Sequence[float], ...] | None = None
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

    Example, mixture weights on the 5-simplex and a code whose prior depends on them:

        >>> model = LatentModel(64, [Latent("mix", 5, prior=dist.Dirichlet, params=(1.0,)),
        ...                          Latent("code", 8, given="mix")], decoder=(64,))
        >>> fit(model, AutoAmortizedGuide(model, x[:10]), x, epochs=2)
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
        if not self.latents:
            raise InputError("LatentModel: latents is empty; list one or more Latent(name, shape, ...)")
        if any(size < 1 for latent in self.latents for size in latent.event_shape):
            empty = next(latent for latent in self.latents if any(size < 1 for size in latent.event_shape))
            raise InputError(f"LatentModel: latent {empty.name!r} has shape {tuple(empty.event_shape)}, with no values")
        seen: dict[str, Latent] = {}
        for latent in self.latents:
            _check_latent(latent, seen)
            seen[latent.name] = latent
        self.widths = {latent.name: math.prod(latent.event_shape) for latent in self.latents}
        self.x_dim = x_dim
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        total = sum(self.widths.values())
        self.decoder = decoder if isinstance(decoder, nn.Module) else mlp(total, tuple(decoder), x_dim, activation)
        self.conditionals = nn.ModuleDict()
        self.num_params: dict[str, int] = {}
        for latent in self.latents:
            if latent.given is not None:
                out = len(latent.prior.arg_constraints) * self.widths[latent.name]
                self.conditionals[latent.name] = mlp(self.widths[latent.given], tuple(conditional_hidden), out, activation)
            else:
                params = _prior_params(latent)
                self.num_params[latent.name] = len(params)
                for index, value in enumerate(params):
                    # Buffers, so that the priors move with the model to another device.
                    self.register_buffer(f"prior_{latent.name}_{index}", value, persistent=False)
            self._check_prior(latent)

    def prior(self, latent: Latent, values: dict[str, Tensor]) -> dist.TorchDistribution:
        """``p(latent | its parent)`` for a batch, event shape ``latent.event_shape``.

        The prior's own event dims (the K of a Dirichlet) end the latent's shape; the dims
        before them are the prior's batch, reinterpreted as part of the event.
        """
        shape = latent.event_shape
        if latent.given is None:
            params = [getattr(self, f"prior_{latent.name}_{i}") for i in range(self.num_params[latent.name])]
            prior = latent.prior(*params)
            batch = shape[: len(shape) - len(prior.event_shape)]
            return prior.expand(batch).to_event(len(batch)) if batch else prior
        parent = values[latent.given]
        batch = parent.shape[: parent.dim() - len(self._latent(latent.given).event_shape)]
        raw = self.conditionals[latent.name](parent.reshape(*batch, -1))
        arg_constraints = latent.prior.arg_constraints
        params = {
            name: biject_to(arg_constraints[name])(chunk.reshape(*batch, *shape))
            for name, chunk in zip(arg_constraints, raw.split(self.widths[latent.name], dim=-1), strict=True)
        }
        prior = latent.prior(**params)
        reinterpreted = len(shape) - len(prior.event_shape)
        return prior.to_event(reinterpreted) if reinterpreted > 0 else prior

    def _latent(self, name: str) -> Latent:
        return next(latent for latent in self.latents if latent.name == name)

    @torch.no_grad()
    def _check_prior(self, latent: Latent) -> None:
        """Build the prior once (of a zero parent, for a dependent one): one it cannot build is an InputError now."""
        shape = latent.event_shape
        parent = {} if latent.given is None else {latent.given: torch.zeros(1, *self._latent(latent.given).event_shape)}
        try:
            prior = self.prior(latent, parent)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
            source = "its params" if latent.given is None else f"parameters computed from {latent.given!r}"
            raise InputError(
                f"LatentModel: latent {latent.name!r}: cannot build its {latent.prior.__name__} prior of shape "
                f"{tuple(shape)} from {source}: {' '.join(str(error).split())}"
            ) from None
        if _is_discrete(prior.support):
            raise InputError(_discrete_message(latent, prior.support))
        if tuple(prior.event_shape) != tuple(shape) or tuple(prior.batch_shape) != ((1,) if parent else ()):
            raise InputError(
                f"LatentModel: latent {latent.name!r}: its {latent.prior.__name__} prior has batch shape "
                f"{tuple(prior.batch_shape)} and event shape {tuple(prior.event_shape)}; the latent's shape "
                f"{tuple(shape)} must be the prior's batch shape followed by its event shape"
            )

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
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


def _check_latent(latent: Latent, seen: dict[str, Latent]) -> None:
    """Refuse a latent whose name, parent, prior class or params cannot make a prior (before any is built)."""
    name, prior = latent.name, latent.prior
    if name in seen or name in RESERVED:
        raise InputError(f"LatentModel: latent name {name!r} is reserved or used twice")
    if latent.given is not None and latent.given not in seen:
        raise InputError(f"LatentModel: latent {name!r} is given {latent.given!r}, which is not an earlier latent")
    if not (isinstance(prior, type) and issubclass(prior, torch.distributions.Distribution)):
        raise InputError(f"LatentModel: the prior of {name!r} must be a distribution class such as dist.Normal")
    support = getattr(prior, "support", None)
    if isinstance(support, constraints.Constraint) and _is_discrete(support):
        raise InputError(_discrete_message(latent, support))
    if latent.given is not None:
        if latent.params is not None:
            raise InputError(
                f"LatentModel: latent {name!r} is given {latent.given!r}, so its prior's parameters are a network "
                f"of {latent.given!r}; params={latent.params!r} cannot be set with given"
            )
        if not isinstance(prior.arg_constraints, dict):
            raise InputError(
                f"LatentModel: latent {name!r}: the constraints of a {prior.__name__} prior's arguments depend on "
                "their values, so no network can output them; it cannot be given another latent"
            )
        for arg, constraint in prior.arg_constraints.items():
            _check_room_for(latent, arg, constraint.event_dim)
        return
    names, required = _arguments(prior)
    if latent.params is None and names[:2] != ["loc", "scale"]:
        raise InputError(f"LatentModel: latent {name!r} needs params for its {prior.__name__} prior: ({', '.join(names)})")
    if not isinstance(latent.params, tuple | list | None):
        raise InputError(f"LatentModel: params of latent {name!r} must be a tuple such as (0.0, 1.0), got {latent.params!r}")
    params = STANDARD_PARAMS if latent.params is None else latent.params
    if not required <= len(params) <= len(names):
        count = f"{len(names)}" if required == len(names) else f"{required} to {len(names)}"
        raise InputError(
            f"LatentModel: latent {name!r} has a {prior.__name__} prior, which takes {count} "
            f"parameter{'' if len(names) == 1 else 's'} ({', '.join(names)}); "
            f"params has {len(params)}: {tuple(params)!r}"
        )
    for arg in names[: len(params)]:
        _check_room_for(latent, arg, _arg_event_dim(prior, arg))


def _arguments(prior: type[torch.distributions.Distribution]) -> tuple[list[str], int]:
    """The parameters a prior class takes by position, and how many of them it requires."""
    names, required = [], 0
    for parameter in list(inspect.signature(prior.__init__).parameters.values())[1:]:
        positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        if parameter.name == "validate_args" or not positional:
            break
        names.append(parameter.name)
        required += parameter.default is parameter.empty
    return names, required


def _arg_event_dim(prior: type[torch.distributions.Distribution], name: str) -> int:
    arg_constraints = prior.arg_constraints
    return arg_constraints[name].event_dim if isinstance(arg_constraints, dict) and name in arg_constraints else 0


def _check_room_for(latent: Latent, arg: str, event_dim: int) -> None:
    if event_dim > len(latent.event_shape):
        raise InputError(
            f"LatentModel: latent {latent.name!r}: the {latent.prior.__name__} prior's argument {arg!r} has "
            f"{event_dim} event dim(s), so the latent's shape needs {event_dim} or more dims "
            f"(e.g. Latent({latent.name!r}, {5 if event_dim == 1 else (5,) * event_dim}, ...)); got shape {tuple(latent.event_shape)}"
        )


def _prior_params(latent: Latent) -> list[Tensor]:
    """The prior's parameters as tensors; a scalar for a vector argument (a Dirichlet's) is broadcast to it."""
    names, _ = _arguments(latent.prior)
    shape = latent.event_shape
    tensors = []
    for name, value in zip(names, STANDARD_PARAMS if latent.params is None else latent.params, strict=False):
        try:
            tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"LatentModel: parameter {name!r} of latent {latent.name!r} must be numbers, got {value!r}") from None
        event_dim = _arg_event_dim(latent.prior, name)
        if event_dim and tensor.dim() == 0:
            tensor = tensor.expand(shape[len(shape) - event_dim :]).clone()
        constraint = latent.prior.arg_constraints.get(name) if isinstance(latent.prior.arg_constraints, dict) else None
        if constraint is not None and not constraints.is_dependent(constraint) and not bool(constraint.check(tensor).all()):
            raise InputError(
                f"LatentModel: parameter {name!r} of latent {latent.name!r} ({latent.prior.__name__} prior) must be "
                f"{describe_support(constraint)}, got {value!r}"
            )
        tensors.append(tensor)
    return tensors


def _is_discrete(support: constraints.Constraint) -> bool:
    try:
        return bool(support.is_discrete)
    except NotImplementedError:  # a dependent support that does not say
        return False


def _discrete_message(latent: Latent, support: constraints.Constraint) -> str:
    # A class's dependent support (a Categorical's) is a property that only an instance can describe.
    words = "" if isinstance(support, property) else f" (support: {describe_support(support)})"
    return (
        f"LatentModel: latent {latent.name!r} has a discrete {latent.prior.__name__} prior{words}; LatentModel builds "
        "continuous latents: write the model as a Pyro program and mark the site infer={'enumerate': 'parallel'} "
        "(every objective then sums it out), or let AutoAmortizedGuide sample it"
    )
