"""An amortized guide built automatically for any Pyro model that follows the model contract.

Pyro's autoguides are not amortized: they learn one posterior per data point, as parameters, and
cannot encode a new x. :class:`AutoAmortizedGuide` traces the model once, finds its latent sites,
and builds one encoder network for all of them jointly:

    u ~ q(u | x)                      (a Gaussian, mixture or flow over R^U, one u per data point)
    z_s = T_s(u_s)                    (u split per site, T_s = biject_to(support of site s))
    log q(z | x) = log q(u | x) + sum_s log |det du_s / dz_s|

as Pyro's ``AutoContinuous`` does for non-amortized guides: ``u`` is an auxiliary sample site
inside ``pyro.plate("data")``, and every latent site is a ``Delta`` at its constrained value that
carries the log-Jacobian of the inverse transform as its log density. Because one distribution
covers every site, a mixture or a flow can capture dependence between sites. Latents outside the
data plate (global latents) get a non-amortized distribution of the same family: the family's
network fed a constant input, so its output weights are the distribution's parameters. Discrete
sites marked for enumeration get no part of ``u``: the objectives sum them out of the model. Other
discrete sites inside the data plate get heads of their own (:mod:`elbolab.guides.discrete`),
sampled independently of ``u`` given x, with score-function gradients.
"""

from __future__ import annotations

__all__ = ["AutoAmortizedGuide"]

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to, constraints

from elbolab.contract import find_data_plate, floating_dtype, trace_model
from elbolab.data.checks import as_points
from elbolab.errors import InputError, closest_names
from elbolab.guides.config import GUIDE_CLASSES
from elbolab.guides.discrete import DiscreteHeads, DiscreteSite, discrete_site
from elbolab.param_store import register

FAMILY_OPTIONS = {"gaussian": (), "mixture": ("components",), "flow": ("flow", "flow_depth", "flow_hidden")}


@dataclass(frozen=True)
class LatentSite:
    """A latent site of the model: where its piece of u sits and how it is constrained.

    A local site's ``shape`` is one data point's block: its event shape, preceded by the sizes of
    the plates nested in the data plate that it sits in (``nested``: name, size and dim of each,
    as the model declares them); the point's block is moved to the data plate's dim,
    ``data_position`` counted from the right of the value, when it is sampled.
    """

    name: str
    shape: torch.Size  # constrained value: a point's block (local) or the whole value (global)
    unconstrained_shape: torch.Size
    support: constraints.Constraint
    start: int
    size: int
    event_dim: int
    nested: tuple[tuple[str, int, int], ...] = ()
    data_position: int = 0


def latent_sites(sites: list[dict]) -> list[LatentSite]:
    found, start = [], 0
    for site in sites:
        support = site["fn"].support
        shape = site["shape"]
        unconstrained_shape = biject_to(support).inv.forward_shape(shape)
        size = math.prod(unconstrained_shape)
        found.append(LatentSite(site["name"], shape, unconstrained_shape, support, start, size, site["event_dim"],
                           site.get("nested", ()), site.get("data_position", 0)))
        start += size
    return found


def _local_block(name: str, fn: Any, frames: list[Any], data: Any) -> dict:
    """A latent site inside the data plate: one point's block of values, and the plates nested around it.

    The site's batch shape must be the plates' sizes at their dims (one value per point and per
    element of each nested plate), so that a point's block is the value with the data dim taken out.
    """
    batch_shape = tuple(fn.batch_shape)
    nested = [f for f in frames if f.name != data.name]
    expected = [1] * max([-f.dim for f in frames], default=0)
    for f in frames:
        expected[f.dim] = f.size
    if batch_shape != tuple(expected):
        raise InputError(
            f"AutoAmortizedGuide: latent site {name!r} in plates {[f.name for f in frames]} has batch shape "
            f"{list(batch_shape)}; a latent inside the data plate {data.name!r} must have one value per data point and "
            f"per element of each plate around it (batch shape {expected})"
        )
    block = torch.Size([size for dim, size in enumerate(batch_shape) if dim - len(batch_shape) != data.dim]) + fn.event_shape
    return {
        "name": name, "fn": fn, "shape": block, "event_dim": len(fn.event_shape),
        "nested": tuple((f.name, f.size, f.dim) for f in nested), "data_position": -data.dim,
    }


class AutoAmortizedGuide(nn.Module):
    """One encoder ``x -> q(all latents | x)`` for any model with its latents in ``pyro.plate("data")``.

    Arguments:
        model: the Pyro model (called as ``model(x, *args)``); traced once, not stored.
        x_example: a batch of data (two or more points) to trace the model on.
        family: ``"gaussian"`` (diagonal), ``"mixture"`` or ``"flow"``: the distribution of u.
        hidden: hidden widths of the encoder.
        activation: encoder activation.
        encoder: a module ``[N, D] -> [N, F]`` (D the data's width, rows flattened) to use as the
            trunk of the local latents' encoder instead of the MLP of ``hidden``: a user's own
            network, or :class:`~elbolab.nn.conv.ConvEncoder` for images. The family's head sits
            on its F features. (The heads of sampled discrete sites keep their MLP.)
        **family_options: ``components`` (mixture); ``flow``, ``flow_depth``, ``flow_hidden`` (flow).

    Example:
        >>> guide = AutoAmortizedGuide(model, x[:10], family="flow", flow="iaf", flow_depth=2)
        >>> guide = AutoAmortizedGuide(model, x[:10], encoder=ConvEncoder((28, 28), channels=(32, 64)))
        >>> fit(model, guide, x)
    """

    def __init__(
        self,
        model: Callable[..., Any],
        x_example: Tensor,
        family: str = "gaussian",
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        encoder: nn.Module | None = None,
        **family_options: Any,
    ) -> None:
        super().__init__()
        if family not in GUIDE_CLASSES:
            raise InputError(f"AutoAmortizedGuide: unknown family {family!r}; {closest_names(family, GUIDE_CLASSES)}")
        unknown = set(family_options) - set(FAMILY_OPTIONS[family])
        if unknown:
            valid = ", ".join(FAMILY_OPTIONS[family]) or "none"
            raise InputError(f"AutoAmortizedGuide: family {family!r} has no option {sorted(unknown)[0]!r} (its options: {valid})")
        x_example = as_points(x_example, "AutoAmortizedGuide: x_example", dtype=floating_dtype(model))
        if x_example.shape[0] < 2:
            raise InputError("AutoAmortizedGuide: x_example must be a batch of two or more data points")
        local, global_, discrete, frame = model_latents(model, x_example)
        # The guide's plate over the data points is the model's: same name and dim (a subsampling
        # plate's scale comes from elbolab's data-plate scale in training, which covers both).
        self.data_plate, self.data_dim = frame.name, frame.dim
        self.x_shape = tuple(x_example.shape[1:])
        self.local_sites, self.global_sites = latent_sites(local), latent_sites(global_)
        x_width = math.prod(x_example.shape[1:])
        joint = GUIDE_CLASSES[family]
        self.local_q = None
        if encoder is not None and not self.local_sites:
            raise InputError("AutoAmortizedGuide: an encoder was given, but the model has no continuous latent inside its "
                             f"data plate {frame.name!r} for it to encode")
        if self.local_sites:
            width = sum(site.size for site in self.local_sites)
            self.local_q = joint(x_width, width, hidden=hidden, activation=activation, trunk=encoder, **family_options)
        self.global_q = None
        if self.global_sites:
            width = sum(site.size for site in self.global_sites)
            self.global_q = joint(1, width, hidden=(32,), activation=activation, **family_options)
            self.register_buffer("constant_input", torch.ones(1), persistent=False)
        self.discrete_q = DiscreteHeads(x_width, discrete, hidden, activation) if discrete else None
        self.family = family

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        if tuple(x.shape[1:]) != self.x_shape:
            raise InputError(
                f"AutoAmortizedGuide was built for data points of shape {self.x_shape} (its x_example), "
                f"got a batch of shape {tuple(x.shape)}"
            )
        if self.global_q is not None:
            q_global = self.global_q.distribution(self.constant_input)
            sample_constrained(pyro.sample("_auto_global", q_global, infer={"is_auxiliary": True}), self.global_sites)
        if self.local_q is None and self.discrete_q is None:
            return
        with pyro.plate(self.data_plate, x.shape[0], dim=self.data_dim):
            if self.local_q is not None:
                self._sample_u(self.local_q.local_parameters(x.reshape(x.shape[0], -1)))
            if self.discrete_q is not None:
                self.discrete_q(x)

    def local_parameters(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The local family's :meth:`local_parameters` of x (for a per-point optimized guide, with :meth:`sample_local`).

        Only for a model whose latents are all continuous and inside the data plate: a global
        latent's distribution is shared by every point, and a sampled discrete site's head
        is not part of the family of u.
        """
        if self.local_q is None:
            raise InputError(f"AutoAmortizedGuide: the model has no continuous latent inside its data plate {self.data_plate!r}")
        others = [site.name for site in self.global_sites]
        others += [site.name for site in self.discrete_q.sites] if self.discrete_q is not None else []
        if others:
            raise InputError(
                "AutoAmortizedGuide: a per-point guide of its family covers the continuous latents inside the data "
                f"plate {self.data_plate!r}; the model also has global or sampled discrete latents {others}"
            )
        return self.local_q.local_parameters(x.reshape(x.shape[0], -1))

    def sample_local(self, local: Tensor) -> None:
        """The guide's program given :meth:`local_parameters` instead of x."""
        with pyro.plate(self.data_plate, local.shape[0], dim=self.data_dim):
            self._sample_u(local)

    def _sample_u(self, local: Tensor) -> None:
        """Inside the data plate: u ~ q(u) of the local family's parameters, then each site at its constrained value."""
        q = self.local_q.distribution_from(local)
        trailing = -self.data_dim - 1  # plates nested right of the data plate's dim
        if trailing:
            q = PointBatch(q, trailing)
        u = pyro.sample("_auto_latent", q, infer={"is_auxiliary": True})
        sample_constrained(u.reshape(*u.shape[: u.dim() - 1 - trailing], u.shape[-1]), self.local_sites)


def model_latents(model: Callable[..., Any], x: Tensor, args: tuple = ()) -> tuple[list[dict], list[dict], list[DiscreteSite], Any]:
    """The model's continuous latent sites inside and outside its data plate, its sampled discrete ones, and the plate's frame."""
    trace = trace_model(model, (x, *args))
    frame = find_data_plate(model, trace, x.shape[0])
    local, global_, discrete = [], [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
            continue
        fn = site["fn"]
        if site["infer"].get("enumerate"):
            continue  # summed out by the objectives and estimators (the pair's contract checks how)
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        if fn.support.is_discrete:
            if not any(f.name == frame.name for f in frames):
                raise InputError(
                    f"AutoAmortizedGuide: latent site {name!r} is discrete ({type(fn).__name__}) and global (outside the "
                    f"data plate {frame.name!r}); the auto guide encodes discrete latents per data point: write its guide"
                )
            discrete.append(discrete_site(name, fn, x.shape[0]))
        elif any(f.name == frame.name for f in frames):
            local.append(_local_block(name, fn, frames, frame))
        else:
            if frames:
                raise InputError(
                    f"AutoAmortizedGuide: latent site {name!r} sits in plates {[f.name for f in frames]} outside the "
                    f"data plate {frame.name!r}; a global latent must sit outside every plate"
                )
            global_.append({"name": name, "fn": fn, "shape": site["value"].shape, "event_dim": site["value"].dim()})
    if not local and not global_ and not discrete:
        raise InputError("AutoAmortizedGuide: the model has no latent sample site")
    return local, global_, discrete, frame


def sample_constrained(u: Tensor, sites: list[LatentSite]) -> None:
    """Split u into the sites' pieces; sample each site as a Delta at its constrained value.

    Each Delta carries ``log |det du_s / dz_s|``, so the guide's log density of the sites is
    ``log q(u) + sum_s log |det du_s / dz_s|`` (Pyro's ``AutoContinuous`` does the same). A
    site in plates nested in the data plate is sampled inside them, as in the model, with
    the point's block laid out as the model lays out its value; its Jacobian term is per
    element, and ``log q(u)`` of the whole block is the auxiliary site's.
    """
    batch = u.shape[:-1]
    for site in sites:
        piece = u[..., site.start : site.start + site.size].reshape(tuple(batch) + tuple(site.unconstrained_shape))
        transform = biject_to(site.support)
        value = transform(piece)
        log_density = transform.inv.log_abs_det_jacobian(value, piece)
        log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site.event_dim)
        if not site.data_position:  # a global site: the whole value
            pyro.sample(site.name, dist.Delta(value, log_density=log_density, event_dim=site.event_dim))
            continue
        # [..., N, block...] -> the data dim where the model has it, among the nested plates' dims.
        block_dims = len(site.shape) - site.event_dim
        value = value.movedim(-(len(site.shape) + 1), -site.data_position - site.event_dim)
        log_density = log_density.movedim(-(block_dims + 1), -site.data_position)
        with contextlib.ExitStack() as plates:
            for plate_name, size, dim in site.nested:
                plates.enter_context(pyro.plate(plate_name, size, dim=dim))
            pyro.sample(site.name, dist.Delta(value, log_density=log_density, event_dim=site.event_dim))


_NO_SAMPLE_SHAPE = torch.Size()


class PointBatch(dist.TorchDistribution):
    """``q(u | x)`` (batch ``[N]``, event ``[U]``) with ``trailing`` size-1 batch dims, ``[N, 1, ...]``.

    For a data plate at dim ``-(trailing + 1)``, left of plates nested in it: the plate needs the
    points on that dim. Draws and densities are the base distribution's.
    """

    arg_constraints: ClassVar[dict] = {}

    def __init__(self, base: Any, trailing: int) -> None:
        self.base, self.trailing = base, trailing
        super().__init__(base.batch_shape + (1,) * trailing, base.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    @property
    def support(self) -> Any:
        return self.base.support

    def _unsqueeze(self, u: Tensor) -> Tensor:
        return u.reshape(*u.shape[:-1], *(1,) * self.trailing, u.shape[-1])

    def rsample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        return self._unsqueeze(self.base.rsample(sample_shape))

    def sample(self, sample_shape: torch.Size = _NO_SAMPLE_SHAPE) -> Tensor:
        return self._unsqueeze(self.base.sample(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        log_prob = self.base.log_prob(value.reshape(*value.shape[: value.dim() - 1 - self.trailing], value.shape[-1]))
        return log_prob.reshape(*log_prob.shape, *(1,) * self.trailing)

    def expand(self, batch_shape: Any, _instance: Any = None) -> PointBatch:
        batch_shape = torch.Size(batch_shape)
        return PointBatch(self.base.expand(batch_shape[: len(batch_shape) - self.trailing]), self.trailing)
