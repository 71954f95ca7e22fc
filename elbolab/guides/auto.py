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
sites marked for enumeration get no part of ``u``: the objectives sum them out of the model.
"""

from __future__ import annotations

__all__ = ["AutoAmortizedGuide"]

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from elbolab.param_store import register

FAMILY_OPTIONS = {"gaussian": (), "mixture": ("components",), "flow": ("flow", "flow_depth", "flow_hidden")}


@dataclass(frozen=True)
class _Site:
    """A latent site of the model: where its piece of u sits and how it is constrained."""

    name: str
    shape: torch.Size  # constrained value: the event shape (local) or the whole value (global)
    unconstrained_shape: torch.Size
    support: constraints.Constraint
    start: int
    size: int


def _latent_sites(sites: list[dict]) -> list[_Site]:
    found, start = [], 0
    for site in sites:
        support = site["fn"].support
        shape = site["shape"]
        unconstrained_shape = biject_to(support).inv.forward_shape(shape)
        size = math.prod(unconstrained_shape)
        found.append(_Site(site["name"], shape, unconstrained_shape, support, start, size))
        start += size
    return found


class AutoAmortizedGuide(nn.Module):
    """One encoder ``x -> q(all latents | x)`` for any model with its latents in ``pyro.plate("data")``.

    Arguments:
        model: the Pyro model (called as ``model(x, *args)``); traced once, not stored.
        x_example: a batch of data (two or more points) to trace the model on.
        family: ``"gaussian"`` (diagonal), ``"mixture"`` or ``"flow"``: the distribution of u.
        hidden: hidden widths of the encoder.
        activation: encoder activation.
        **family_options: ``components`` (mixture); ``flow``, ``flow_depth``, ``flow_hidden`` (flow).

    Example:
        >>> guide = AutoAmortizedGuide(model, x[:10], family="flow", flow="iaf", flow_depth=2)
        >>> fit(model, guide, x)
    """

    def __init__(
        self,
        model: Callable[..., Any],
        x_example: Tensor,
        family: str = "gaussian",
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
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
        local, global_, frame = self._inspect(model, x_example)
        # The guide's plate over the data points is the model's: same name and dim (a subsampling
        # plate's scale comes from elbolab's data-plate scale in training, which covers both).
        self.data_plate, self.data_dim = frame.name, frame.dim
        self.x_shape = tuple(x_example.shape[1:])
        self.local_sites, self.global_sites = _latent_sites(local), _latent_sites(global_)
        x_width = math.prod(x_example.shape[1:])
        joint = GUIDE_CLASSES[family]
        self.local_q = None
        if self.local_sites:
            width = sum(site.size for site in self.local_sites)
            self.local_q = joint(x_width, width, hidden=hidden, activation=activation, **family_options)
        self.global_q = None
        if self.global_sites:
            width = sum(site.size for site in self.global_sites)
            self.global_q = joint(1, width, hidden=(32,), activation=activation, **family_options)
            self.register_buffer("constant_input", torch.ones(1), persistent=False)
        self.family = family

    @staticmethod
    def _inspect(model: Callable[..., Any], x: Tensor) -> tuple[list[dict], list[dict], Any]:
        """The model's latent sites inside and outside its data plate, and that plate's frame."""
        trace = trace_model(model, (x,))
        frame = find_data_plate(model, trace, x.shape[0])
        local, global_ = [], []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
                continue
            fn = site["fn"]
            if site["infer"].get("enumerate"):
                continue  # summed out by the objectives and estimators (the pair's contract checks how)
            if fn.support.is_discrete:
                raise InputError(
                    f"AutoAmortizedGuide: latent site {name!r} is discrete ({type(fn).__name__}) and not marked for "
                    "enumeration; mark it infer={'enumerate': 'parallel'} (or wrap the model in Pyro's "
                    "config_enumerate) and every objective and estimator sums it out exactly"
                )
            frames = [f for f in site["cond_indep_stack"] if f.vectorized]
            if any(f.name == frame.name for f in frames):
                if len(frames) > 1 or tuple(fn.batch_shape) != (frame.size,):
                    raise InputError(
                        f"AutoAmortizedGuide: latent site {name!r} sits in plates {[f.name for f in frames]}; "
                        f"latents inside the data plate {frame.name!r} must have one value per data point (batch shape [N])"
                    )
                local.append({"name": name, "fn": fn, "shape": fn.event_shape})
            else:
                if frames:
                    raise InputError(
                        f"AutoAmortizedGuide: latent site {name!r} sits in plates {[f.name for f in frames]} outside the "
                        f"data plate {frame.name!r}; a global latent must sit outside every plate"
                    )
                global_.append({"name": name, "fn": fn, "shape": site["value"].shape})
        if not local and not global_:
            raise InputError("AutoAmortizedGuide: the model has no latent sample site")
        return local, global_, frame

    @staticmethod
    def _constrain(u: Tensor, sites: list[_Site]) -> None:
        """Split u into the sites' pieces; sample each site as a Delta at its constrained value.

        Each Delta carries ``log |det du_s / dz_s|``, so the guide's log density of the sites is
        ``log q(u) + sum_s log |det du_s / dz_s|`` (Pyro's ``AutoContinuous`` does the same).
        """
        batch = u.shape[:-1]
        for site in sites:
            piece = u[..., site.start : site.start + site.size].reshape(tuple(batch) + tuple(site.unconstrained_shape))
            transform = biject_to(site.support)
            value = transform(piece)
            event_dim = len(site.shape)
            log_density = transform.inv.log_abs_det_jacobian(value, piece)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
            pyro.sample(site.name, dist.Delta(value, log_density=log_density, event_dim=event_dim))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        if tuple(x.shape[1:]) != self.x_shape:
            raise InputError(
                f"AutoAmortizedGuide was built for data points of shape {self.x_shape} (its x_example), "
                f"got a batch of shape {tuple(x.shape)}"
            )
        if self.global_q is not None:
            q_global = self.global_q.distribution(self.constant_input)
            self._constrain(pyro.sample("_auto_global", q_global, infer={"is_auxiliary": True}), self.global_sites)
        if self.local_q is not None:
            q = self.local_q.distribution(x.reshape(x.shape[0], -1))
            with pyro.plate(self.data_plate, x.shape[0], dim=self.data_dim):
                self._constrain(pyro.sample("_auto_latent", q, infer={"is_auxiliary": True}), self.local_sites)
