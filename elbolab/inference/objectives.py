"""The registry of objectives: one name, one constructor.

An objective is a Pyro ``ELBO`` subclass (or any object with ``differentiable_loss(model,
guide, *args)``); it never lives inside a model, so the same model and guide train under any
name here unchanged. Add one with :func:`register_objective`.
"""

from __future__ import annotations

__all__ = [
    "OBJECTIVES",
    "Reconstruction",
    "as_objective",
    "get_objective",
    "no_guide",
    "parse_objective_spec",
    "register_objective",
]

from collections.abc import Callable
from typing import Any

import pyro.infer
from torch import Tensor

from elbolab.errors import InputError, closest_names
from elbolab.inference.elbo import ELBO
from elbolab.inference.iwae import IWAE
from elbolab.inference.pyro_objectives import PYRO_ELBOS, PyroObjective, pyro_objective
from elbolab.inference.renyi import Renyi
from elbolab.inference.traces import run_traced, sample_sites, site_log_prob

OBJECTIVES: dict[str, Callable[..., Any]] = {}


def register_objective(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make ``get_objective(name, **kwargs)`` call the decorated constructor."""

    def register(constructor: Callable[..., Any]) -> Callable[..., Any]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = constructor
        return constructor

    return register


def get_objective(name: str, **kwargs: Any) -> Any:
    """The objective registered as ``name``, built with ``kwargs`` (e.g. ``num_particles=5``).

    Example:
        >>> get_objective("elbo-analytic", num_particles=2)
    """
    constructor = OBJECTIVES.get(name)
    if name.startswith("pyro:"):
        constructor = lambda **options: pyro_objective(name.removeprefix("pyro:"), **options)  # noqa: E731
    if constructor is None:
        raise InputError(f"unknown objective {name!r}; {closest_names(name, OBJECTIVES)}")
    try:
        return constructor(**kwargs)
    except TypeError as error:
        raise InputError(f"objective {name!r}: {error}") from None


# Option names of a spec string ("renyi:alpha=0.5:k=5") -> keyword and type.
SPEC_OPTIONS = {
    "k": ("num_particles", int),
    "alpha": ("alpha", float),
    "discrete": ("discrete", str),
    "temperature": ("temperature", float),
}


def parse_objective_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"renyi:alpha=0.5:k=5"`` -> ``("renyi", {"alpha": 0.5, "num_particles": 5})``.

    Options: ``k`` (particles), ``alpha`` (Renyi order; ``-inf`` for VR-max), ``discrete`` (the
    gradient of discrete guide sites: ``baseline``, ``score``, ``relaxed`` for elbo; ``vimco``,
    ``score`` for iwae) and ``temperature`` (of ``discrete=relaxed``). The name is
    checked against the registry; ``pyro:NAME`` names one of Pyro's ELBOs
    (:mod:`~elbolab.inference.pyro_objectives`), ``"pyro:RenyiELBO:alpha=0:k=5"``.

    Example:
        >>> parse_objective_spec("iwae-dreg:k=50")
        ('iwae-dreg', {'num_particles': 50})
    """
    name, *options = spec.strip().split(":")
    if name == "pyro":  # "pyro:RenyiELBO:alpha=0:k=5": one of Pyro's ELBOs
        if not options or options[0] not in PYRO_ELBOS:
            given = options[0] if options else ""
            raise InputError(f"objective spec {spec!r}: pyro: names one of Pyro's ELBOs; {closest_names(given, PYRO_ELBOS)}")
        name, options = f"pyro:{options[0]}", options[1:]
    elif name not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r} in {spec!r}; {closest_names(name, OBJECTIVES)}")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in SPEC_OPTIONS or not value:
            raise InputError(
                f"objective spec {spec!r}: expected options k=INT, alpha=NUMBER, discrete=NAME or temperature=NUMBER, "
                f"got {option!r}"
            )
        keyword, kind = SPEC_OPTIONS[key]
        try:
            kwargs[keyword] = kind(value)
        except ValueError:
            raise InputError(f"objective spec {spec!r}: {key} must be {kind.__name__}, got {value!r}") from None
    return name, kwargs


@register_objective("elbo")
def _elbo(num_particles: int = 1, beta: float = 1.0, **kwargs: Any) -> ELBO:
    return ELBO(num_particles=num_particles, beta=beta, **kwargs)


@register_objective("elbo-analytic")
def _elbo_analytic(num_particles: int = 1, beta: float = 1.0, **kwargs: Any) -> ELBO:
    return ELBO(num_particles=num_particles, beta=beta, analytic_kl=True, **kwargs)


@register_objective("elbo-stl")
def _elbo_stl(num_particles: int = 1, beta: float = 1.0, **kwargs: Any) -> ELBO:
    return ELBO(num_particles=num_particles, beta=beta, stick_the_landing=True, **kwargs)


@register_objective("iwae")
def _iwae(num_particles: int = 5, **kwargs: Any) -> IWAE:
    return IWAE(num_particles=num_particles, **kwargs)


@register_objective("iwae-stl")
def _iwae_stl(num_particles: int = 5, **kwargs: Any) -> IWAE:
    return IWAE(num_particles=num_particles, gradient="stl", **kwargs)


@register_objective("iwae-dreg")
def _iwae_dreg(num_particles: int = 5, **kwargs: Any) -> IWAE:
    return IWAE(num_particles=num_particles, gradient="dreg", **kwargs)


@register_objective("renyi")
def _renyi(alpha: float = 0.5, num_particles: int = 5, **kwargs: Any) -> Renyi:
    return Renyi(alpha=alpha, num_particles=num_particles, **kwargs)


def as_objective(objective: Any) -> Any:
    """An objective instance ready for elbolab's step: Pyro's own ELBOs wrapped in :class:`PyroObjective`.

    elbolab's objectives subclass ``pyro.infer.ELBO`` too and pass through, as does any object
    with a ``differentiable_loss``; anything else is refused by name.
    """
    if isinstance(objective, pyro.infer.ELBO) and not isinstance(objective, ELBO | IWAE):
        return PyroObjective(objective)
    if not callable(getattr(objective, "differentiable_loss", None)):
        raise InputError(
            f"objective {type(objective).__name__} has no differentiable_loss(model, guide, *args): give a registry "
            "name (elbo, iwae:k=5, ...), a pyro.infer.ELBO, or an object with that method"
        )
    return objective


class Reconstruction:
    """``-log p(x | z)`` at the model's own deterministic code: the autoencoder's loss, not an ELBO.

    For models without latent sample sites (:class:`~elbolab.models.Autoencoder`); the guide
    is ignored.
    """

    supports_beta = False
    num_particles = 1

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> Tensor:
        model_trace, _ = run_traced(model, no_guide, args, kwargs)
        loss: Tensor | float = 0.0
        for name, site in sample_sites(model_trace):
            if not site["is_observed"]:
                raise InputError(
                    f"the reconstruction objective is for models without latent sites; "
                    f"this model samples {name!r}: use elbo"
                )
            loss = loss - site_log_prob(site).sum()
        return loss


def no_guide(*args: Any, **kwargs: Any) -> None:
    """The guide of a model without latent sites: samples nothing."""
    return None


@register_objective("reconstruction")
def _reconstruction() -> Reconstruction:
    return Reconstruction()
