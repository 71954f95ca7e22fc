"""Non-amortized posteriors, one per data point: what a guide could do for each point if it did not share an encoder.

An amortized guide ``q(z | x) = q(z; lambda(x))`` maps every data point to the parameters of one
family through one encoder ``lambda``. Two per-point relaxations of it measure what that costs
(Cremer, Li & Duvenaud 2018, "Inference Suboptimality in Variational Autoencoders"):

- :class:`PerPointGuide`, the guide's own family with free parameters per point:
  ``q_n(z) = q(z; lambda_n)``, ``lambda_n`` started at the encoder's output ``lambda(x_n)``.
  What ``lambda`` is, is the guide's :meth:`local_parameters`: the diagonal Gaussian's loc and
  raw scale, the mixture's logits, means and raw scales, the flow's base Gaussian and the
  context h(x) its layers are conditioned on (the layers' weights stay shared, as in the
  amortized guide). Maximizing the ELBO of point n over ``lambda_n`` alone gives ``q*_n``, the
  best member of the family for that point (semi-amortized inference, Kim et al. 2018).
- :class:`PerPointGaussian`, a Gaussian over the joint unconstrained vector ``u`` of all the
  model's continuous latents inside the data plate, per point, diagonal or with a full
  covariance: ``u_n ~ N(m_n, L_n L_n^T)``, ``z_s = T_s(u_s)`` with ``T_s = biject_to(support of
  site s)``, exactly as :class:`~elbolab.guides.AutoAmortizedGuide` lays out its ``u``.

Both are tables of posteriors for the rows of ``x`` they were built on, in that order: called on
another batch, they refuse rather than give a point another point's posterior.
"""

from __future__ import annotations

__all__ = ["COVARIANCES", "PerPointGaussian", "PerPointGuide", "require_local_parameters"]

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import biject_to

from elbolab.errors import InputError
from elbolab.guides.auto import PointBatch, latent_sites, model_latents, sample_constrained

COVARIANCES = ("diagonal", "full")


def _check_rows(what: str, points: Tensor, x: Tensor) -> None:
    """Refuse a batch that is not the rows a per-point guide was built on."""
    if x.shape != points.shape or not torch.equal(x, points):
        raise InputError(
            f"{what} holds posteriors for the {points.shape[0]} data points it was built on, in order; "
            f"it was called on another batch of shape {tuple(x.shape)}"
        )


def require_local_parameters(guide: Any) -> None:
    """Refuse a guide without the local-parameter protocol, of which a per-point guide is built.

    Raises:
        InputError: ``guide`` has no ``local_parameters(x, *args)`` and ``sample_local(local)``.
    """
    if not (callable(getattr(guide, "local_parameters", None)) and callable(getattr(guide, "sample_local", None))):
        raise InputError(
            f"the guide {type(guide).__name__} does not expose its family's parameters per point "
            "(local_parameters(x) and sample_local(local)): a per-point guide of its family cannot be built. "
            "elbolab's GaussianGuide, MixtureGuide, FlowGuide, ConditionalGuide and AutoAmortizedGuide have them"
        )


class PerPointGuide(nn.Module):
    """The family of an amortized ``guide``, with the encoder's output for each of the points ``x`` made free parameters.

    Arguments:
        guide: an amortized guide with ``local_parameters(x, *args) -> [N, P]`` and
            ``sample_local(local)`` (the guide's program given those parameters):
            :class:`~elbolab.guides.GaussianGuide`, :class:`~elbolab.guides.MixtureGuide`,
            :class:`~elbolab.guides.FlowGuide`, :class:`~elbolab.guides.ConditionalGuide` of one
            of them, and :class:`~elbolab.guides.AutoAmortizedGuide` of a model whose latents
            are all continuous and per point. Referenced, not owned: its weights are not this
            module's parameters and are never changed.
        x, *args: the data points (and the model's further per-point arguments).

    Example:
        >>> per_point = PerPointGuide(guide, x)  # starts as the amortized guide on x
        >>> loss = get_objective("elbo").differentiable_loss(model, per_point, x)
    """

    def __init__(self, guide: Callable[..., Any], x: Tensor, *args: Tensor) -> None:
        super().__init__()
        require_local_parameters(guide)
        with torch.no_grad():
            local = guide.local_parameters(x, *args)
        self.local = nn.Parameter(local.detach().clone())
        self.register_buffer("points", x.detach().clone(), persistent=False)
        self._guide = [guide]  # a list: referenced, so that its weights are not parameters of this module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        _check_rows("PerPointGuide", self.points, x)
        return self._guide[0].sample_local(self.local)


class PerPointGaussian(nn.Module):
    """A Gaussian over the joint unconstrained latents of each of the points ``x``: ``u_n ~ N(m_n, L_n L_n^T)``.

    Arguments:
        model: the model (traced once on ``x``, not stored): its continuous latents inside the
            data plate are what ``u`` covers.
        x, *args: the data points (and the model's further per-point arguments).
        loc: ``m``, ``[N, U]``; ``scale_tril``: ``L``, ``[N, U, U]`` lower triangular with a
            positive diagonal (only its diagonal is read when ``covariance="diagonal"``).
        covariance: ``"full"`` or ``"diagonal"``.

    :meth:`from_draws` starts it at the moments of draws of another guide, e.g. the amortized one.
    """

    def __init__(
        self, model: Callable[..., Any], x: Tensor, *args: Tensor, loc: Tensor, scale_tril: Tensor, covariance: str = "full"
    ) -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise InputError(f"PerPointGaussian: covariance must be one of {COVARIANCES}, got {covariance!r}")
        local, shared, discrete, frame = model_latents(model, x, args)
        if shared or discrete:
            names = [site["name"] for site in shared] + [site.name for site in discrete]
            raise InputError(
                f"PerPointGaussian covers continuous latents inside the data plate {frame.name!r}; the model also has "
                f"global or sampled discrete latents {names}"
            )
        if not local:
            raise InputError(f"PerPointGaussian: the model has no continuous latent inside its data plate {frame.name!r}")
        self.sites = latent_sites(local)
        self.data_plate, self.data_dim = frame.name, frame.dim
        width = sum(site.size for site in self.sites)
        if loc.shape != (x.shape[0], width) or scale_tril.shape != (x.shape[0], width, width):
            raise InputError(
                f"PerPointGaussian: loc must be [{x.shape[0]}, {width}] and scale_tril [{x.shape[0]}, {width}, {width}] "
                f"for these points and the model's latents, got {list(loc.shape)} and {list(scale_tril.shape)}"
            )
        self.covariance = covariance
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_diagonal = nn.Parameter(scale_tril.detach().diagonal(dim1=-2, dim2=-1).log().clone())
        # The strictly lower triangle of L; its diagonal is exp(log_diagonal), positive by construction.
        self.lower = nn.Parameter(scale_tril.detach().tril(-1).clone()) if covariance == "full" else None
        self.register_buffer("points", x.detach().clone(), persistent=False)

    @classmethod
    def from_draws(
        cls, model: Callable[..., Any], x: Tensor, *args: Tensor, draws: dict[str, Tensor], covariance: str = "full"
    ) -> PerPointGaussian:
        """Started at the mean and covariance, per point, of ``draws`` mapped to ``u``.

        ``draws``: for each continuous latent site of the model, ``[S, N, *event]`` values (S draws
        per point, as a particle plate lays them out); S must exceed the width of ``u`` for a
        full covariance to be estimated, and a small ridge keeps it positive definite.
        """
        u = unconstrained(model, x, args, draws)  # [S, N, U]
        if u.shape[0] < 2:
            raise InputError("PerPointGaussian.from_draws needs two or more draws per point")
        loc = u.mean(0)
        centred = u - loc
        if covariance == "full":
            cov = torch.einsum("snu,snv->nuv", centred, centred) / (u.shape[0] - 1)
            ridge = 1e-6 + 1e-4 * cov.diagonal(dim1=-2, dim2=-1).mean(-1)
            scale_tril = torch.linalg.cholesky(cov + ridge[:, None, None] * torch.eye(u.shape[-1], dtype=u.dtype, device=u.device))
        else:
            scale_tril = torch.diag_embed(centred.pow(2).sum(0).div(u.shape[0] - 1).sqrt().clamp_min(1e-6))
        return cls(model, x, *args, loc=loc, scale_tril=scale_tril, covariance=covariance)

    def distribution(self) -> dist.TorchDistribution:
        """``q(u)`` of every point: batch shape ``[N]``, event shape ``[U]``."""
        if self.lower is None:
            return dist.Normal(self.loc, self.log_diagonal.exp()).to_event(1)
        scale_tril = self.lower.tril(-1) + torch.diag_embed(self.log_diagonal.exp())
        return dist.MultivariateNormal(self.loc, scale_tril=scale_tril)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        _check_rows("PerPointGaussian", self.points, x)
        with pyro.plate(self.data_plate, x.shape[0], dim=self.data_dim):
            q = self.distribution()
            trailing = -self.data_dim - 1  # plates nested right of the data plate's dim
            if trailing:
                q = PointBatch(q, trailing)
            u = pyro.sample("_per_point_latent", q, infer={"is_auxiliary": True})
            sample_constrained(u.reshape(*u.shape[: u.dim() - 1 - trailing], u.shape[-1]), self.sites)


def unconstrained(model: Callable[..., Any], x: Tensor, args: tuple, draws: dict[str, Tensor]) -> Tensor:
    """``u`` of draws of the model's continuous local latents: ``[S, N, U]``, sites in the model's order.

    ``draws[name]`` is ``[S, N, *event]``; a site in plates nested in the data plate is refused
    (its values are laid out per nested plate, which this mapping does not undo).
    """
    local, _, _, _ = model_latents(model, x, args)
    pieces = []
    for site in latent_sites(local):
        if site.nested:
            raise InputError(f"latent site {site.name!r} sits in plates nested in the data plate: its draws cannot be "
                             "mapped to a per-point vector here")
        if site.name not in draws:
            raise InputError(f"no draws of the model's latent site {site.name!r}")
        value = draws[site.name]
        expected = (x.shape[0], *site.shape)
        if tuple(value.shape[1:]) != expected:
            raise InputError(f"draws of site {site.name!r} must be [S, {', '.join(map(str, expected))}], got {list(value.shape)}")
        piece = biject_to(site.support).inv(value)
        pieces.append(piece.reshape(value.shape[0], x.shape[0], math.prod(site.unconstrained_shape)))
    return torch.cat(pieces, dim=-1)
