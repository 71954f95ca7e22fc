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
    "data_plate_of",
    "detached_guide_trace",
    "enumerated_log_joint",
    "importance_terms",
    "local_latent_sites",
    "log_weights_per_point",
    "max_plate_nesting",
    "per_point",
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
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from elbolab.contract import Contract, pair_contract
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
    enumerated: bool = False,
) -> tuple[Trace, Trace]:
    """Trace ``guide(*args)``, then ``model(*args)`` replayed on the guide's samples.

    With ``num_particles > 1`` both run inside ``pyro.plate("particles", K)`` at dim
    ``-(plate_nesting + 1)``, so every site gains a leading particle dimension.

    With ``enumerated`` (the contract's ``enumerated`` sites), the model runs under Pyro's
    parallel enumeration: each site marked ``infer={"enumerate": "parallel"}`` that the guide does
    not sample takes all its values at once, on its own dim left of the particle plate (from
    ``-(plate_nesting + 2)`` leftwards), and :func:`enumerated_log_joint` sums them out.

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
    # Outside replay: a site the guide samples is replayed (done) before enumeration sees it.
    enumeration = poutine.enum(first_available_dim=-(plate_nesting + 2)) if enumerated else contextlib.nullcontext()
    with (
        poutine.trace() as model_tracer,
        enumeration,
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
    2019) are built on them. Every latent sample must be reparameterized.

    A guide with one latent site needs no second run: a Normal (under any ``to_event``) is
    rebuilt from detached parameters, and any other distribution (a ``MultivariateNormal``, a
    flow) has its score term subtracted,

        log q(z; phi) - log q(stop_gradient(z); phi) + stop_gradient(log q(stop_gradient(z); phi)),

    whose value is ``log q(z)`` and whose gradient is the pathwise one alone, wherever the
    parameters live. A guide with several sites is re-run on its own samples with its parameters
    detached: an ``nn.Module``'s through ``torch.func.functional_call``, ``pyro.param`` values by a
    handler; the re-run keeps what detaching in place would lose when a site's parameters depend
    on another sample (``q(z_2 | z_1)``): the path from ``z_1`` through the parameters of
    ``q(z_2 | z_1)``, which is not part of the score term.
    """
    latent = [(name, site) for name, site in sample_sites(guide_trace) if not site["is_observed"]]
    for name, site in latent:
        if not site["fn"].has_rsample:
            raise InputError(
                f"sticking-the-landing and DReG gradients need reparameterized guide samples; "
                f"guide site {name!r} ({type(site['fn']).__name__}) has none"
            )
    if len(latent) == 1:
        name, site = latent[0]
        detached_fn = _detached_distribution(site["fn"])
        trace = Trace()
        for key, node in guide_trace.nodes.items():
            trace.nodes[key] = node | {"fn": detached_fn or _ScoreFree(node["fn"])} if key == name else node
        return trace
    with (
        poutine.trace() as tracer,
        poutine.replay(trace=guide_trace),
        _particles(num_particles, plate_nesting),
        _DetachedParams(),
    ):
        if isinstance(guide, nn.Module):
            detached = {name: param.detach() for name, param in guide.named_parameters()}
            torch.func.functional_call(guide, detached, args, kwargs)
        else:
            guide(*args, **kwargs)
    registered = [name for name, site in tracer.trace.nodes.items() if site["type"] == "param" and "$$$" in name]
    if registered and not isinstance(guide, nn.Module):
        raise InputError(
            f"sticking-the-landing and DReG gradients re-run a guide with several sites with its parameters "
            f"detached; this guide function runs a network registered with pyro.module ({registered[0]!r}), whose "
            "parameters a re-run cannot detach: make the guide an nn.Module"
        )
    return tracer.trace


class _DetachedParams(Messenger):
    """``pyro.param`` returns its value detached: the re-run guide's parameters carry no gradient."""

    def _pyro_post_param(self, msg: dict) -> None:
        msg["value"] = msg["value"].detach()


class _ScoreFree:
    """A distribution's log density without its score term: the value of ``log q``, the pathwise gradient only."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.has_rsample = fn.has_rsample
        self.event_shape, self.batch_shape = fn.event_shape, fn.batch_shape

    def log_prob(self, value: Tensor) -> Tensor:
        at_fixed = self.fn.log_prob(value.detach())
        return self.fn.log_prob(value) - at_fixed + at_fixed.detach()


def _detached_distribution(fn: Any) -> Any:
    """``fn`` with detached parameters when it is a Normal (possibly ``Independent``), else ``None``."""
    if isinstance(fn, torch.distributions.Independent):
        base = _detached_distribution(fn.base_dist)
        return None if base is None else dist.Independent(base, fn.reinterpreted_batch_ndims, validate_args=False)
    if type(fn) in (dist.Normal, torch.distributions.Normal):
        return dist.Normal(fn.loc.detach(), fn.scale.detach(), validate_args=False)
    return None


def max_plate_nesting(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    """How many plates deep the model and guide nest, from the pair's checked contract."""
    return pair_contract(model, guide, args, kwargs).plate_nesting


def sample_sites(trace: Trace) -> list[tuple[str, dict]]:
    """``(name, site)`` of every sample site, without the index sites that plates record."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def local_latent_sites(
    trace: Trace, purpose: str, vectorizing: tuple[str, ...] = (PARTICLE_PLATE,), plate: str = DATA_PLATE
) -> list[tuple[str, dict]]:
    """The latent sites of a trace inside the data plate ``plate``, each one value per data point.

    Observed and auxiliary sites (an auto guide's joint variable) are skipped, and so are latents
    outside the data plate (global latents); ``vectorizing`` names plates added around the
    program to draw several samples at once. A latent in a further plate is an
    :class:`InputError` naming it and ``purpose``.
    """
    sites = []
    for name, site in sample_sites(trace):
        if site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        frames = [frame.name for frame in site["cond_indep_stack"] if frame.name not in vectorizing]
        if plate not in frames:
            continue
        if len(frames) > 1:
            raise InputError(f"latent site {name!r} sits in plates besides {plate!r}, which {purpose} does not read")
        sites.append((name, site))
    return sites


def data_plate_of(trace: Trace, batch_size: int, vectorizing: tuple[str, ...] = (PARTICLE_PLATE,)) -> str:
    """The name of the plate of size ``batch_size`` around a guide's latent sites (for tools that run the guide alone)."""
    names = {
        frame.name
        for _, site in sample_sites(trace)
        if not site["is_observed"]
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name not in vectorizing and frame.size == batch_size
    }
    if len(names) == 1:
        return names.pop()
    if DATA_PLATE in names:
        return DATA_PLATE
    found = ", ".join(sorted(repr(n) for n in names)) or "none"
    raise InputError(f"the guide has no single plate over the {batch_size} data points around its latent sites (found {found})")


def site_log_prob(site: dict, scaled: bool = True) -> Tensor:
    """``log p(value)`` of a sample site, with its mask (and, when ``scaled``, its plate scale) applied, unsummed."""
    try:
        log_prob = site["fn"].log_prob(site["value"])
    except (NotImplementedError, KeyError):
        if not isinstance(getattr(site["fn"], "fn", site["fn"]), torch.distributions.TransformedDistribution):
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
    if scaled and not _is_unit(site["scale"]):
        log_prob = log_prob * site["scale"]
    return log_prob


def _is_unit(scale: Any) -> bool:
    return scale is None or (isinstance(scale, (int, float)) and scale == 1.0)


def data_plate_dim(trace: Trace, plate: str = DATA_PLATE) -> int:
    """The (negative) dim of the data plate ``plate`` in a trace; an error if the trace has none."""
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.name == plate:
                    return frame.dim
    raise InputError(f"the model has no pyro.plate({plate!r}, N) around its observed sites")


def per_point(log_prob: Tensor, particle_dim: int, data_dim: int) -> Tensor:
    """Sum a site's log density over every dim but the particle and data dims -> ``[K or 1, N or 1]``."""
    ndim = max(log_prob.dim(), -particle_dim)
    if ndim == 2 and log_prob.dim() == 2 and particle_dim == -2 and data_dim == -1:
        return log_prob  # already [K, N]: the common case, kept free of ops
    log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + tuple(log_prob.shape))
    other = [d for d in range(ndim) if d - ndim not in (particle_dim, data_dim)]
    if other:
        log_prob = log_prob.sum(other, keepdim=True)
    return log_prob.reshape(log_prob.shape[ndim + particle_dim], log_prob.shape[ndim + data_dim])


def _in_plates(site: dict, plates: frozenset[str] | set[str]) -> bool:
    return any(frame.name in plates for frame in site["cond_indep_stack"])


def _data_plate_scale(scale: Any, name: str, common: Any) -> Any:
    """The one scale of the data plate's sites: ``common`` so far, checked against site ``name``'s."""
    scale = 1.0 if scale is None else scale
    if common is not None and scale is not common and scale != common:
        raise InputError(
            f"importance-weighted objectives and enumeration weigh each data point's sites together, which needs one "
            f"scale on every site of the data plate; site {name!r} has {scale}, another {common}"
        )
    return scale


def enumerated_log_joint(model_trace: Trace, plate_nesting: int, contract: Contract) -> tuple[Tensor, Tensor, float]:
    """Per particle and data point, the model's enumerated sites summed out: ``[K, N]`` twice, and the data scale.

    For a model trace run under enumeration (:func:`run_traced` with ``enumerated``), with the
    enumerated values of a point's discrete latents ``c`` on dims left of every plate,

        log p(x_n, z_n) = log sum_c p(x_n, z_n, c),    log p(z_n) = log sum_c p(z_n, c),

    where ``p(x_n, z_n, c)`` is the product of the densities of every site inside the data plate
    (sites in plates nested in it are first multiplied over those plates: no enumerated site sits
    in them, see :mod:`elbolab.contract`). ``log p(x_n | z_n)`` is their difference. Densities
    are taken without the data plate's scale, which is returned to apply after the sum over ``c``:
    a scale inside the logsumexp would weigh the mixture's terms, not the point.
    """
    data_dim = data_plate_dim(model_trace, contract.data_plate)
    particle_dim = -(plate_nesting + 1)
    batch_dims = plate_nesting + 1
    nested = [d for d in range(-batch_dims, 0) if d not in (particle_dim, data_dim)]
    joint: Tensor | float = 0.0
    latent: Tensor | float = 0.0
    scale = None
    for name, site in sample_sites(model_trace):
        if not _in_plates(site, contract.plates):
            continue
        scale = _data_plate_scale(site["scale"], name, scale)
        term = site_log_prob(site, scaled=False)
        if term.dim() < batch_dims:
            term = term.reshape((1,) * (batch_dims - term.dim()) + tuple(term.shape))
        if nested:
            term = term.sum(nested, keepdim=True)
        joint = joint + term
        if not site["is_observed"]:
            latent = latent + term
    summed = []
    for total in (joint, latent):
        enum_dims = list(range(total.dim() - batch_dims))
        total = total.logsumexp(enum_dims) if enum_dims else total
        summed.append(per_point(total, particle_dim, data_dim))
    log_joint, log_latent = torch.broadcast_tensors(*summed)
    return log_joint, log_latent, float(scale)


def log_weights_per_point(
    model_trace: Trace, guide_trace: Trace, plate_nesting: int, contract: Contract
) -> tuple[Tensor, Tensor]:
    """Per particle and data point: ``log p(x, z) - log q(z | x)`` and ``log p(x | z)``, each ``[K, N]``.

    Requires traces from :func:`run_traced` with particles at dim ``-(plate_nesting + 1)``. Only
    sites inside the data plate enter: for a model with global latents the weights are those of
    ``p(x_n, z_n | g) / q(z_n | x_n, g)`` at the particle's global draw ``g ~ q(g)``, so that their
    mean estimates the posterior predictive ``p(x_n | data)`` under ``q(g)``, not ``p(x_n)``. The
    sites' scales are applied as they stand (evaluation runs under a unit data-plate scale).
    """
    data_dim = data_plate_dim(model_trace, contract.data_plate)
    particle_dim = -(plate_nesting + 1)
    plates = contract.plates
    log_weight: Tensor | float = 0.0
    log_lik: Tensor | float = 0.0
    if contract.enumerated:
        log_joint, log_latent, scale = enumerated_log_joint(model_trace, plate_nesting, contract)
        log_weight, log_lik = scale * log_joint, scale * (log_joint - log_latent)
    for _, site in sample_sites(model_trace):
        if contract.enumerated or not _in_plates(site, plates):
            continue
        term = per_point(site_log_prob(site), particle_dim, data_dim)
        log_weight = log_weight + term
        if site["is_observed"]:
            log_lik = log_lik + term
    for _, site in sample_sites(guide_trace):
        if not site["is_observed"] and _in_plates(site, plates):
            log_weight = log_weight - per_point(site_log_prob(site), particle_dim, data_dim)
    log_weight, log_lik = torch.broadcast_tensors(log_weight, log_lik)
    return log_weight, log_lik


def importance_terms(
    model_trace: Trace, guide_trace: Trace, plate_nesting: int, contract: Contract, q_trace: Trace | None = None
) -> tuple[Tensor, Tensor | float, float]:
    """The pieces of importance-weighted objectives, with the data plate's scale taken out.

    Returns:
        ``local``: ``[K, N]``, per particle and data point, ``log p - log q`` of every site inside
        the data plate, *without* the plate's scale, so that a logsumexp over particles is taken
        of true per-point weights; ``global_``: ``[K]`` (or 0), ``log p - log q`` of the sites
        outside the data plate, scaled as they stand; ``data_scale``: the scale every site inside
        the data plate carries (``N / B`` under subsampling or with global latents in training, 1
        otherwise), to apply *outside* the logsumexp.

    ``q_trace`` (default: ``guide_trace``) supplies the guide densities, e.g. a
    :func:`detached_guide_trace`.
    """
    data_dim = data_plate_dim(model_trace, contract.data_plate)
    plates = contract.plates
    particle_dim = -(plate_nesting + 1)
    local: Tensor | None = None
    global_: Tensor | float = 0.0
    data_scale: Any = None
    if contract.enumerated:
        local, _, data_scale = enumerated_log_joint(model_trace, plate_nesting, contract)
    for trace, sign in ((model_trace, 1.0), (q_trace if q_trace is not None else guide_trace, -1.0)):
        for name, site in sample_sites(trace):
            if sign < 0 and site["is_observed"]:
                continue
            if _in_plates(site, plates):
                if sign > 0 and contract.enumerated:
                    continue  # in the enumerated joint already
                data_scale = _data_plate_scale(site["scale"], name, data_scale)
                term = per_point(site_log_prob(site, scaled=False), particle_dim, data_dim)
                # Every op here is one more node in the backward pass of every training step.
                local = (term if sign > 0 else -term) if local is None else (local + term if sign > 0 else local - term)
            else:
                global_ = global_ + sign * per_point(site_log_prob(site), particle_dim, data_dim).sum(-1)
    if local is None:
        raise InputError(f"the model has no sample site inside its data plate {contract.data_plate!r}: nothing to weigh per data point")
    return local, global_, float(data_scale)


def per_point_weights_to_site(weights: Tensor, site: dict, plate_nesting: int, data_dim: int) -> Tensor:
    """Reshape per-point ``[K, N]`` weights to broadcast against a site's value (batch + event dims)."""
    event_dim = len(site["fn"].event_shape)
    batch_dim = site["value"].dim() - event_dim
    shape = [1] * batch_dim
    shape[batch_dim - (plate_nesting + 1)] = weights.shape[0]
    shape[batch_dim + data_dim] = weights.shape[1]
    return weights.reshape(shape + [1] * event_dim)
