"""The latent space of a trained model, read through its guide: means, paths, traversals, collapse.

Every tool works on any model/guide pair that follows the contract, for the per-data-point latents
(the sites inside ``pyro.plate("data")``; auxiliary guide sites, such as an auto guide's joint
variable, are not latents of the model and are skipped). A point's position in latent space is
its posterior mean ``E_q[z | x]``: exact when the guide's distribution has one (Gaussian,
mixture), else the average of ``num_samples`` draws (flows, auto guides).

- :func:`interpolate`: decoded paths between two points' posterior means, linear or spherical
  (``slerp``, White 2016, "Sampling generative networks", which keeps a path between two typical
  draws of a Gaussian prior at a typical norm instead of cutting through the low-norm centre);
- :func:`traverse`: one latent dimension swept over a range, the others held at a point's mean;
- :func:`latent_arithmetic`: ``z_a - z_b + z_c`` decoded;
- :func:`latent_projection`: posterior means in 2-D (PCA when the latent has more than 2 dims);
- :func:`unit_activity` / :func:`active_units`: Burda et al.'s criterion of posterior collapse;
- :func:`kl_per_dimension`: ``KL(q(z_d | x) || p(z_d))`` per latent dimension, averaged over points.
"""

from __future__ import annotations

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "active_units",
    "interpolate",
    "kl_per_dimension",
    "latent_arithmetic",
    "latent_projection",
    "posterior_means",
    "slerp",
    "traverse",
    "unit_activity",
]

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import kl_divergence

from elbolab.contract import floating_dtype, pair_contract
from elbolab.data.checks import as_points
from elbolab.distributions import without_event_dims
from elbolab.errors import InputError
from elbolab.inference.traces import data_plate_of, local_latent_sites, run_traced
from elbolab.models.draws import decode_latents

Guide = Callable[..., Any]
Model = Callable[..., Any]


DRAWS_PLATE = "_latent_draws"

# A latent unit is active when Cov_x(E_q[z_d | x]) exceeds this: the criterion of Burda et al.
# (2016, "Importance weighted autoencoders", section 5.2). Every count of active units uses it.
ACTIVE_UNIT_THRESHOLD = 0.01


def _latent_sites(trace: poutine.Trace, batch_size: int) -> list[tuple[str, dict]]:
    """The guide's per-point latent sites: inside its plate over the ``batch_size`` data points.

    Global latents (outside that plate) are left out: every tool here reads one value per point.
    So are discrete ones (a semi-supervised guide's label): the tools read continuous codes.
    """
    plate = data_plate_of(trace, batch_size, vectorizing=(DRAWS_PLATE,))
    sites = [
        (name, site)
        for name, site in local_latent_sites(trace, "the latent-space tools", vectorizing=(DRAWS_PLATE,), plate=plate)
        if not _is_discrete(site["fn"])
    ]
    if not sites:
        raise InputError(f"the guide has no latent sample site inside its plate {plate!r} over the data points")
    return sites


def _is_discrete(fn: Any) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except NotImplementedError:  # a dependent support that does not say
        return False


def _guide_trace(guide: Guide, x: Tensor, *args: Tensor) -> poutine.Trace:
    """One trace of the guide; a guide that fails on ``x`` is an :class:`InputError` naming its shape."""
    try:
        return poutine.trace(guide).get_trace(x, *args)
    except InputError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"the guide fails on x of shape {tuple(x.shape)}: {first}") from None


def _guide_points(guide: Guide, x: Any, what: str = "x") -> Tensor:
    """``x`` checked (finite rows, numpy converted) in the guide's floating dtype."""
    return as_points(x, what, dtype=floating_dtype(guide))


def _as_points(x: Tensor, name: str) -> Tensor:
    """A data point ``[D]`` or points ``[P, D]`` -> ``[P, D]``."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{name} must be one data point [D] or a batch [P, D], got shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def latent_draws(guide: Guide, x: Tensor, *args: Tensor, num_samples: int) -> dict[str, Tensor]:
    """``num_samples`` draws of every latent site from ``q(z | x)``: ``{site: [S, N, *shape]}``.

    ``args`` are the guide's further per-point arguments (a conditional guide's labels).
    """
    x = _guide_points(guide, x)
    with pyro.plate(DRAWS_PLATE, num_samples, dim=-2), pyro.validation_enabled(False):
        trace = _guide_trace(guide, x, *args)
    return {
        name: site["value"].reshape(num_samples, x.shape[0], *site["fn"].event_shape)
        for name, site in _latent_sites(trace, x.shape[0])
    }


@torch.no_grad()
def posterior_means(guide: Guide, x: Tensor, *args: Tensor, num_samples: int = 256) -> dict[str, Tensor]:
    """``E_q[z | x]`` of every latent site, ``{site: [N, *shape]}``.

    Exact where the guide's distribution has a mean (a Delta site of an auto guide is one draw,
    so it does not count); otherwise the average of ``num_samples`` draws.
    """
    x = _guide_points(guide, x)
    with pyro.validation_enabled(False):
        trace = _guide_trace(guide, x, *args)
    sites = _latent_sites(trace, x.shape[0])
    means: dict[str, Tensor] = {}
    for name, site in sites:
        if isinstance(site["fn"], dist.Delta):
            continue
        try:
            means[name] = site["fn"].mean.expand(site["value"].shape).clone()
        except NotImplementedError:
            continue
    if len(means) < len(sites):
        draws = latent_draws(guide, x, *args, num_samples=num_samples)
        means |= {name: value.mean(0) for name, value in draws.items() if name not in means}
    return means


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation of the rows of ``a`` and ``b`` ``[P, d]`` at fractions ``t`` ``[T]``: ``[P, T, d]``.

    ``sin((1 - t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b`` with ``Ω`` the angle between ``a`` and
    ``b``; linear where the two are (nearly) parallel, where the formula is 0/0.
    """
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)[:, None, None]  # [P, 1, 1]
    omega = torch.arccos(cos)
    t = t[None, :, None]
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(parallel, t, torch.sin(t * omega) / safe)
    return wa * a[:, None] + wb * b[:, None]


@torch.no_grad()
def interpolate(
    model: Model,
    guide: Guide,
    x_a: Tensor,
    x_b: Tensor,
    steps: int = 8,
    *,
    method: str = "linear",
    mean: bool = True,
    num_samples: int = 256,
) -> Tensor:
    """Decoded path from ``x_a``'s posterior mean to ``x_b``'s, in ``steps`` equal steps of ``t``.

    Arguments:
        model, guide: a trained model and its guide.
        x_a, x_b: one data point each ``[D]``, or ``P`` pairs ``[P, D]``.
        steps: points on the path, endpoints included (>= 2).
        method: ``"linear"`` (``(1 - t) z_a + t z_b``) or ``"spherical"`` (:func:`slerp`), per site.
        mean: decode to the means of ``p(x | z)`` (else samples of it).
        num_samples: draws for posterior means without a closed form.

    Returns:
        ``[steps, D]`` for one pair, ``[P, steps, D]`` for ``P``.

    Example:
        >>> path = interpolate(model, guide, test_x[0], test_x[1], steps=10, method="spherical")
    """
    if method not in ("linear", "spherical"):
        raise InputError(f"unknown interpolation method {method!r}; use linear or spherical")
    if int(steps) != steps or steps < 2:
        raise InputError(f"an interpolation needs steps >= 2, got {steps}")
    single = x_a.dim() == 1
    x_a, x_b = _as_points(x_a, "x_a"), _as_points(x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise InputError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    pairs = x_a.shape[0]
    means = posterior_means(guide, torch.cat([x_a, x_b]), num_samples=num_samples)
    t = torch.linspace(0.0, 1.0, steps, device=x_a.device)
    path = {}
    for name, value in means.items():
        a, b = value[:pairs].reshape(pairs, -1), value[pairs:].reshape(pairs, -1)
        if method == "linear":
            points = (1 - t)[None, :, None] * a[:, None] + t[None, :, None] * b[:, None]
        else:
            points = slerp(a, b, t)
        path[name] = points.reshape(pairs * steps, *value.shape[1:])
    decoded = decode_latents(model, path, mean=mean).reshape(pairs, steps, -1)
    return decoded[0] if single else decoded


def _site_and_width(means: dict[str, Tensor], site: str | None) -> tuple[str, int]:
    if site is None:
        if len(means) > 1:
            raise InputError(f"the model has several latent sites ({', '.join(means)}); name one with site=")
        site = next(iter(means))
    if site not in means:
        raise InputError(f"no latent site {site!r}; the guide's latent sites are {', '.join(means)}")
    return site, math.prod(means[site].shape[1:])


@torch.no_grad()
def traverse(
    model: Model,
    guide: Guide,
    x: Tensor,
    *,
    site: str | None = None,
    dims: Sequence[int] | None = None,
    values: Tensor | Sequence[float] = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0),
    mean: bool = True,
    num_samples: int = 256,
) -> Tensor:
    """Latent traversals: each dimension of ``site`` set to each of ``values``, the rest at ``x``'s mean.

    Arguments:
        x: one data point ``[D]`` (or ``[1, D]``): the posterior mean every traversal starts from.
        site: the latent site (default: the only one).
        dims: which dimensions of the (flattened) site; default all.
        values: the values a dimension takes, in the latent's own units (±3 prior standard
            deviations under the default N(0, I) prior).

    Returns:
        ``[len(dims), len(values), D]`` decoded images.
    """
    x = _as_points(x, "x")
    if x.shape[0] != 1:
        raise InputError(f"traverse starts from one data point, got {x.shape[0]}")
    means = posterior_means(guide, x, num_samples=num_samples)
    site, width = _site_and_width(means, site)
    dims = list(range(width)) if dims is None else [int(d) for d in dims]
    for d in dims:
        if not 0 <= d < width:
            raise InputError(f"latent site {site!r} has {width} dimensions; no dimension {d}")
    values = torch.as_tensor(values, dtype=means[site].dtype, device=x.device)
    count = len(dims) * len(values)
    fixed = {name: value.expand(count, *value.shape[1:]).clone() for name, value in means.items()}
    flat = fixed[site].reshape(count, width)
    for i, d in enumerate(dims):
        flat[i * len(values) : (i + 1) * len(values), d] = values
    fixed[site] = flat.reshape(fixed[site].shape)
    return decode_latents(model, fixed, mean=mean).reshape(len(dims), len(values), -1)


@torch.no_grad()
def latent_arithmetic(
    model: Model, guide: Guide, x_a: Tensor, x_b: Tensor, x_c: Tensor, *, mean: bool = True, num_samples: int = 256
) -> Tensor:
    """``z_a - z_b + z_c`` of the points' posterior means, decoded: ``[D]`` for single points, else ``[P, D]``.

    The analogy "a is to b as c is to ?" of Radford et al. (2016) and White (2016), per latent site.
    """
    single = x_a.dim() == 1
    points = [_as_points(x, name) for x, name in ((x_a, "x_a"), (x_b, "x_b"), (x_c, "x_c"))]
    if len({p.shape for p in points}) != 1:
        raise InputError("x_a, x_b and x_c must have the same shape")
    p = points[0].shape[0]
    means = posterior_means(guide, torch.cat(points), num_samples=num_samples)
    combined = {name: v[:p] - v[p : 2 * p] + v[2 * p :] for name, v in means.items()}
    decoded = decode_latents(model, combined, mean=mean)
    return decoded[0] if single else decoded


@torch.no_grad()
def latent_projection(guide: Guide, x: Tensor, *, num_samples: int = 256) -> tuple[np.ndarray, tuple[str, str]]:
    """Posterior means in two dimensions, for a scatter plot: ``(coords [N, 2], axis labels)``.

    All latent sites are concatenated; with more than two dimensions they are projected on their
    first two principal components (scikit-learn's PCA), and the labels say how much of the
    means' variance each keeps. One dimension is shown against zero.
    """
    means = posterior_means(guide, x, num_samples=num_samples)
    flat = torch.cat([v.reshape(x.shape[0], -1) for v in means.values()], dim=1).double().cpu().numpy()
    if flat.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(flat)
        share = pca.explained_variance_ratio_ * 100
        return pca.transform(flat), (f"PC 1 ({share[0]:.0f}% of variance)", f"PC 2 ({share[1]:.0f}% of variance)")
    names = [f"{name}[{d}]" for name, v in means.items() for d in range(math.prod(v.shape[1:]))]
    if flat.shape[1] == 1:
        return np.hstack([flat, np.zeros_like(flat)]), (names[0], "")
    return flat, (names[0], names[1])


@torch.no_grad()
def unit_activity(guide: Guide, x: Tensor, *args: Tensor, num_samples: int = 64) -> pd.DataFrame:
    """``Cov_x(E_q[z_d | x])`` per latent dimension: the activity of Burda et al. (2016, section 5.2).

    ``E_q[z | x]`` is the mean of ``num_samples`` draws of the guide, so it works for any guide;
    the variance that this Monte Carlo estimate adds, ``E_x[Var_q(z_d | x)] / num_samples``
    (about 1/64 for a collapsed unit, more than :data:`ACTIVE_UNIT_THRESHOLD`), is subtracted.

    Returns:
        A DataFrame with columns ``site``, ``dim`` (index in the flattened site) and ``activity``.
    """
    rows = []
    for name, value in latent_draws(guide, x, *args, num_samples=num_samples).items():
        flat = value.reshape(num_samples, x.shape[0], -1)
        means = flat.mean(0)  # [N, dims]
        noise = flat.var(0).mean(0) / num_samples
        activity = (means.var(0) - noise).cpu()
        rows += [{"site": name, "dim": d, "activity": float(a)} for d, a in enumerate(activity)]
    return pd.DataFrame(rows)


def active_units(
    guide: Guide, x: Tensor, *args: Tensor, num_samples: int = 64, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> int:
    """Latent dimensions whose posterior mean varies across data points: ``Cov_x(E_q[z|x]) > threshold``.

    The criterion of Burda et al. (2016, section 5.2), with their threshold
    :data:`ACTIVE_UNIT_THRESHOLD` by default: a unit whose posterior mean does not depend on x
    carries no information about it (posterior collapse). See :func:`unit_activity`.
    """
    return int((unit_activity(guide, x, *args, num_samples=num_samples)["activity"] > threshold).sum())


def _diagonal_normal(fn: Any) -> dist.Normal | None:
    """The Normal inside ``fn`` (possibly under ``to_event``), else ``None``."""
    fn = without_event_dims(fn)
    return fn if isinstance(fn, torch.distributions.Normal) else None


@torch.no_grad()
def kl_per_dimension(model: Model, guide: Guide, x: Tensor) -> pd.DataFrame:
    """``KL(q(z_d | x) || p(z_d))`` per latent dimension, in nats, averaged over the points of ``x``.

    Closed form for a diagonal-Gaussian guide site against a diagonal-Gaussian prior site, where
    the KL of the whole site is the sum of these terms; a prior conditioned on another latent is
    evaluated at one draw of it per point. Dimensions with KL near 0 carry no information about
    x (collapsed). Other guide families do not factor over dimensions, and are refused.

    Returns:
        A DataFrame with columns ``site``, ``dim`` and ``kl``.
    """
    x = _guide_points(guide, x)
    contract = pair_contract(model, guide, (x,))
    if contract.enumerated:
        raise InputError(
            f"KL per dimension needs a Gaussian prior per site; the model sums out its discrete site "
            f"{contract.enumerated[0]!r}, which makes the prior of the guide's latents a mixture without a closed-form KL"
        )
    with pyro.validation_enabled(False):
        model_trace, guide_trace = run_traced(model, guide, (x,), {})
    rows = []
    for name, site in _latent_sites(guide_trace, x.shape[0]):
        q, p = _diagonal_normal(site["fn"]), _diagonal_normal(model_trace.nodes[name]["fn"])
        if q is None or p is None:
            which = "guide" if q is None else "prior"
            fn = site["fn"] if q is None else model_trace.nodes[name]["fn"]
            raise InputError(
                f"KL per dimension needs diagonal-Gaussian guide and prior sites; the {which} of {name!r} is "
                f"{type(fn).__name__}, which does not factor over dimensions"
            )
        kl = kl_divergence(q, p).reshape(x.shape[0], -1).mean(0).cpu()
        rows += [{"site": name, "dim": d, "kl": float(value)} for d, value in enumerate(kl)]
    return pd.DataFrame(rows)
