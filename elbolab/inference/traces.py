"""Running a guide and a model together, and reading log densities off their traces.

The shared machinery of every objective and estimator: run the guide, replay the model on the
guide's samples, optionally with ``K`` particles vectorized in a plate to the left of every
model plate, and read per-site log densities, scaled and masked as Pyro does. Kept lean because
it runs on the hot path of every training step: no trace copies, no graph bookkeeping.
"""

from __future__ import annotations

__all__ = [
    "DATA_PLATE",
    "PARTICLE_PLATE",
    "data_plate_dim",
    "detached_guide_trace",
    "importance_terms",
    "local_latent_sites",
    "log_weights_per_point",
    "max_plate_nesting",
    "per_point_weights_to_site",
    "run_traced",
    "sample_sites",
    "site_log_prob",
]

import contextlib
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from elbolab.errors import InputError

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"


def _particles(num_particles: int, plate_nesting: int) -> Any:
    if num_particles > 1:
        return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))
    return contextlib.nullcontext()


def run_traced(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    num_particles: int = 1,
    plate_nesting: int = 0,
    proxy_latents: bool = False,
) -> tuple[Trace, Trace]:
    """Trace ``guide(*args)``, then ``model(*args)`` replayed on the guide's samples.

    With ``num_particles > 1`` both run inside ``pyro.plate("particles", K)`` at dim
    ``-(plate_nesting + 1)``, so every site gains a leading particle dimension.

    With ``proxy_latents``, the model is replayed on *proxies* of the guide's latent values (an
    identity view of each), and the returned guide trace holds the proxies. Gradients from log
    densities then reach a sample through its proxy, while gradients that flow from one guide
    sample into the next (``z_2`` computed from ``z_1``) bypass it: a gradient hook on the proxies
    acts once per path from a log density to a sample, which DReG needs for guides with several
    dependent sites.
    """
    with poutine.trace() as guide_tracer, _particles(num_particles, plate_nesting):
        guide(*args, **kwargs)
    guide_trace = guide_tracer.trace
    if proxy_latents:
        guide_trace = _with_proxies(guide_trace)
    with (
        poutine.trace() as model_tracer,
        poutine.replay(trace=guide_trace),
        _particles(num_particles, plate_nesting),
    ):
        model(*args, **kwargs)
    return model_tracer.trace, guide_trace


def _with_proxies(trace: Trace) -> Trace:
    """A copy of ``trace`` whose latent values that carry gradients are replaced by identity views of them."""
    proxied = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and isinstance(site["value"], Tensor) and site["value"].requires_grad:
            site = site | {"value": site["value"].view_as(site["value"])}
        proxied.nodes[name] = site
    return proxied


def detached_guide_trace(
    guide: Callable[..., Any],
    guide_trace: Trace,
    args: tuple,
    kwargs: dict,
    num_particles: int = 1,
    plate_nesting: int = 0,
) -> Trace:
    """The guide's trace with its distributions' parameters detached, its samples kept.

    Its log densities ``log q(z; stop_gradient(phi))`` carry gradient only through the samples
    ``z``: the "sticking the landing" estimator (Roeder et al. 2017) and DReG (Tucker et al.
    2019) are built on them. A guide with one Normal site (under any ``to_event``) is detached in
    place; any other guide is re-run on its own samples with its parameters detached, which needs
    an ``nn.Module`` guide. The re-run keeps what detaching in place would lose when a site's
    parameters depend on another sample (``q(z_2 | z_1)``): the path from ``z_1`` through the
    parameters of ``q(z_2 | z_1)``, which is not part of the score term. Every latent sample must
    be reparameterized.
    """
    latent = [(name, site) for name, site in sample_sites(guide_trace) if not site["is_observed"]]
    for name, site in latent:
        if not site["fn"].has_rsample:
            raise InputError(
                f"sticking-the-landing and DReG gradients need reparameterized guide samples; "
                f"guide site {name!r} ({type(site['fn']).__name__}) has none"
            )
    detached_fns = {name: _detached_distribution(site["fn"]) for name, site in latent}
    if len(latent) == 1 and all(fn is not None for fn in detached_fns.values()):
        # No second run of the guide's networks: the same samples, densities with stopped parameters.
        trace = Trace()
        for name, site in guide_trace.nodes.items():
            trace.nodes[name] = site | {"fn": detached_fns[name]} if name in detached_fns else site
        return trace
    if not isinstance(guide, nn.Module):
        raise InputError(
            "sticking-the-landing and DReG gradients re-run a guide with non-Normal sites with its "
            f"parameters detached, which needs an nn.Module guide; got {type(guide).__name__}"
        )
    detached = {name: param.detach() for name, param in guide.named_parameters()}
    with poutine.trace() as tracer, poutine.replay(trace=guide_trace), _particles(num_particles, plate_nesting):
        torch.func.functional_call(guide, detached, args, kwargs)
    return tracer.trace


def _detached_distribution(fn: Any) -> Any:
    """``fn`` with detached parameters when it is a Normal (possibly ``Independent``), else ``None``."""
    if isinstance(fn, torch.distributions.Independent):
        base = _detached_distribution(fn.base_dist)
        return None if base is None else dist.Independent(base, fn.reinterpreted_batch_ndims, validate_args=False)
    if type(fn) in (dist.Normal, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach(), validate_args=False)
    return None


def max_plate_nesting(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    """How many plates deep the model and guide nest (one un-vectorized run, without gradients)."""
    with torch.no_grad():
        model_trace, guide_trace = run_traced(model, guide, args, kwargs)
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for _, site in sample_sites(trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def sample_sites(trace: Trace) -> list[tuple[str, dict]]:
    """``(name, site)`` of every sample site, without the index sites that plates record."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def local_latent_sites(trace: Trace, purpose: str, vectorizing: tuple[str, ...] = (PARTICLE_PLATE,)) -> list[tuple[str, dict]]:
    """The latent sites of a trace, each one value per data point: inside ``pyro.plate("data")`` only.

    Observed and auxiliary sites (an auto guide's joint variable) are skipped; ``vectorizing``
    names plates added around the program to draw several samples at once. A latent outside the
    data plate, or in a further plate, is an :class:`InputError` naming it and ``purpose``.
    """
    sites = []
    for name, site in sample_sites(trace):
        if site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        frames = [frame.name for frame in site["cond_indep_stack"] if frame.name not in vectorizing]
        if DATA_PLATE not in frames:
            raise InputError(f"latent site {name!r} is outside pyro.plate({DATA_PLATE!r}); {purpose} reads per-data-point latents only")
        if len(frames) > 1:
            raise InputError(f"latent site {name!r} sits in plates besides {DATA_PLATE!r}, which {purpose} does not read")
        sites.append((name, site))
    return sites


def site_log_prob(site: dict) -> Tensor:
    """``log p(value)`` of a sample site, with its plate scale and mask applied, unsummed."""
    try:
        log_prob = site["fn"].log_prob(site["value"])
    except (NotImplementedError, KeyError):
        if not isinstance(site["fn"], torch.distributions.TransformedDistribution):
            raise
        # Pyro's planar and radial flows invert only their own cached samples (KeyError otherwise).
        raise InputError(
            f"site {site['name']!r} ({type(site['fn']).__name__}) cannot invert its transforms to evaluate its "
            "log density at a given value; sticking-the-landing and DReG gradients need that (they re-evaluate "
            "log q with detached parameters): use elbo, iwae or renyi with this guide"
        ) from None
    mask = site["mask"]
    if isinstance(mask, Tensor):
        log_prob = log_prob.masked_fill(~mask, 0.0)
    elif mask is False:
        log_prob = torch.zeros_like(log_prob)
    if not _is_unit(site["scale"]):
        log_prob = log_prob * site["scale"]
    return log_prob


def _is_unit(scale: Any) -> bool:
    return scale is None or (isinstance(scale, (int, float)) and scale == 1.0)


def data_plate_dim(trace: Trace) -> int:
    """The (negative) dim of ``pyro.plate("data")`` in a trace; an error if the model has none."""
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.name == DATA_PLATE:
                    return frame.dim
    raise InputError(
        'the model has no pyro.plate("data", N): the model contract puts every data point\'s '
        'latents and the observation "x" inside it'
    )


def _per_point(log_prob: Tensor, particle_dim: int, data_dim: int) -> Tensor:
    """Sum a site's log density over every dim but the particle and data dims -> ``[K or 1, N or 1]``."""
    ndim = max(log_prob.dim(), -particle_dim)
    if ndim == 2 and log_prob.dim() == 2 and particle_dim == -2 and data_dim == -1:
        return log_prob  # already [K, N]: the common case, kept free of ops
    log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    other = [d for d in range(ndim) if d - ndim not in (particle_dim, data_dim)]
    if other:
        log_prob = log_prob.sum(other, keepdim=True)
    return log_prob.reshape(log_prob.shape[ndim + particle_dim], log_prob.shape[ndim + data_dim])


def log_weights_per_point(
    model_trace: Trace, guide_trace: Trace, plate_nesting: int
) -> tuple[Tensor, Tensor]:
    """Per particle and data point: ``log p(x, z) - log q(z | x)`` and ``log p(x | z)``, each ``[K, N]``.

    Requires traces from :func:`run_traced` with particles at dim ``-(plate_nesting + 1)``.
    Sites outside the data plate (global latents) enter every data point's weight once.
    """
    data_dim = data_plate_dim(model_trace)
    particle_dim = -(plate_nesting + 1)
    log_weight: Tensor | float = 0.0
    log_lik: Tensor | float = 0.0
    for _, site in sample_sites(model_trace):
        term = _per_point(site_log_prob(site), particle_dim, data_dim)
        log_weight = log_weight + term
        if site["is_observed"]:
            log_lik = log_lik + term
    if not isinstance(log_lik, Tensor):
        raise InputError('the model observes no data (no sample site with obs=...): nothing to weigh')
    for _, site in sample_sites(guide_trace):
        if not site["is_observed"]:
            log_weight = log_weight - _per_point(site_log_prob(site), particle_dim, data_dim)
    log_weight, log_lik = torch.broadcast_tensors(log_weight, log_lik)
    return log_weight, log_lik


def importance_terms(
    model_trace: Trace, guide_trace: Trace, plate_nesting: int, q_trace: Trace | None = None
) -> tuple[Tensor, Tensor | float, float]:
    """The pieces of importance-weighted objectives, with the data plate's subsampling undone.

    Returns:
        ``local``: ``[K, N]``, per particle and data point, ``log p - log q`` of every site inside
        ``pyro.plate("data")``, *without* the plate's subsample scale, so that a logsumexp over
        particles is taken of true per-point weights; ``global_``: ``[K]`` (or 0), ``log p - log
        q`` of the sites outside the data plate, scaled as Pyro scales them; ``data_scale``: the
        data plate's ``full_size / subsample_size`` (1 without subsampling), to apply *outside*
        the logsumexp.

    ``q_trace`` (default: ``guide_trace``) supplies the guide densities, e.g. a
    :func:`detached_guide_trace`.
    """
    data_dim = data_plate_dim(model_trace)
    frame = next(
        f for _, site in sample_sites(model_trace) for f in site["cond_indep_stack"] if f.name == DATA_PLATE
    )
    data_scale = frame.full_size / frame.size if frame.full_size else 1.0
    particle_dim = -(plate_nesting + 1)
    local: Tensor | None = None
    global_: Tensor | float = 0.0
    for trace, sign in ((model_trace, 1.0), (q_trace if q_trace is not None else guide_trace, -1.0)):
        for _, site in sample_sites(trace):
            if sign < 0 and site["is_observed"]:
                continue
            log_prob = site_log_prob(site)
            if any(f.name == DATA_PLATE for f in site["cond_indep_stack"]):
                if data_scale != 1.0:
                    log_prob = log_prob / data_scale
                term = _per_point(log_prob, particle_dim, data_dim)
                # Every op here is one more node in the backward pass of every training step.
                local = (term if sign > 0 else -term) if local is None else (local + term if sign > 0 else local - term)
            else:
                global_ = global_ + sign * _per_point(log_prob, particle_dim, data_dim).sum(-1)
    if local is None:
        raise InputError('the model has no sample site inside pyro.plate("data"): nothing to weigh per data point')
    return local, global_, data_scale


def per_point_weights_to_site(weights: Tensor, site: dict, plate_nesting: int, data_dim: int) -> Tensor:
    """Reshape per-point ``[K, N]`` weights to broadcast against a site's value (batch + event dims)."""
    event_dim = len(site["fn"].event_shape)
    batch_dim = site["value"].dim() - event_dim
    shape = [1] * batch_dim
    shape[batch_dim - (plate_nesting + 1)] = weights.shape[0]
    shape[batch_dim + data_dim] = weights.shape[1]
    return weights.reshape(shape + [1] * event_dim)
