"""The importance-weighted bound, with standard, sticking-the-landing or doubly reparameterized gradients.

    L_K(x) = E[ log (1/K) sum_k w_k ],   w_k = p(x, z_k) / q(z_k | x),   z_k ~ q(z | x)

(Burda et al. 2016, "Importance weighted autoencoders"). L_1 is the ELBO, L_K rises with K and
tends to log p(x). The logsumexp over particles is taken per data point: the data plate stays
a batch dimension, and its scale (N / B under subsampling) multiplies each point's bound after the
logsumexp. A model with latents outside the data plate (global latents) is refused: each particle
would carry its own global draw, and a point's logsumexp over them is not a bound on log p(X).

Gradients for the guide's parameters phi:

- ``"standard"``: the reparameterized gradient of the bound; its signal-to-noise ratio falls as
  K grows (Rainforth et al. 2018).
- ``"stl"``: "sticking the landing" (Roeder et al. 2017): ``log q`` is evaluated with stopped
  gradients on phi, dropping the score term, whose expectation is zero.
- ``"dreg"``: doubly reparameterized (Tucker et al. 2019, "Doubly reparameterized gradient
  estimators for Monte Carlo objectives"):
  ``grad_phi = sum_k wbar_k^2 dlog w_k / dz_k dz_k / dphi``, with ``wbar`` the normalized
  weights and ``log q`` under stopped gradients on phi. The model's parameters get the standard
  IWAE gradient ``sum_k wbar_k grad_theta log w_k``. The second factor ``wbar_k`` is applied by a
  gradient hook on a proxy of each guide sample through which the log densities read it
  (:func:`~elbolab.inference.traces.run_traced` with ``proxy_latents``): it acts once on every
  path from ``log w_k`` to the guide's parameters, also for guides whose sites depend on each
  other, such as the hierarchical VAE's ladder and bottom-up guides.

The value of the loss is ``-L_K`` in every case; only the gradients differ.
"""

from __future__ import annotations

__all__ = ["IWAE"]

import math
from collections.abc import Callable
from typing import Any

import pyro.infer
import torch
from torch import Tensor

from elbolab.config import is_integer
from elbolab.contract import pair_contract, refuse_not_reparameterized
from elbolab.errors import InputError
from elbolab.inference.traces import (
    data_plate_dim,
    detached_guide_trace,
    importance_terms,
    max_plate_nesting,
    per_point,
    per_point_weights_to_site,
    run_traced,
    sample_sites,
    site_log_prob,
)

GRADIENTS = ("standard", "stl", "dreg")
# Gradients for guide sites without a reparameterized sampler: VIMCO's, the plain score function's, or none (refused).
DISCRETE_GRADIENTS = ("vimco", "score", "pathwise")


class IWAE(pyro.infer.ELBO):
    """Negative importance-weighted bound, summed over the data points of a batch.

    Arguments:
        num_particles: K, importance samples per data point (vectorized in one plate).
        gradient: ``"standard"``, ``"stl"`` or ``"dreg"`` (see the module docstring).
        max_plate_nesting: plates the model nests; found by one trace when ``None``.

    Example:
        >>> IWAE(num_particles=5, gradient="dreg").differentiable_loss(model, guide, x).backward()
    """

    supports_beta = False

    def __init__(
        self, num_particles: int = 5, gradient: str = "standard", max_plate_nesting: int | None = None, discrete: str = "vimco"
    ) -> None:
        if not is_integer(num_particles) or num_particles < 1:
            raise InputError(f"num_particles must be a positive integer, got {num_particles}")
        if gradient not in GRADIENTS:
            raise InputError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        if discrete not in DISCRETE_GRADIENTS:
            raise InputError(f"discrete must be one of {', '.join(DISCRETE_GRADIENTS)}, got {discrete!r}")
        super().__init__(num_particles=int(num_particles), vectorize_particles=True)
        self.gradient = gradient
        self.plate_nesting = max_plate_nesting
        self.discrete = discrete

    def _get_trace(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict):
        return run_traced(model, guide, args, kwargs)

    def log_weights(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict):
        """``(local [K, N], global [K] or 0, data scale, traces)``, with detached ``log q`` for stl/dreg."""
        contract = pair_contract(model, guide, args, kwargs)
        if contract.not_reparameterized and (self.gradient != "standard" or self.discrete == "pathwise" or type(self) is not IWAE):
            what = "the Renyi bound" if type(self) is not IWAE else f"iwae with {self.gradient} gradients"
            refuse_not_reparameterized(contract, f"{what} (score-function gradients for discrete sites: iwae, VIMCO)")
        if contract.global_latents:
            # Each particle carries its own draw of the globals, so a point's logsumexp would mix
            # draws: the result rises above log p(X) (not a bound) and widens q of the globals.
            raise InputError(
                f"importance-weighted bounds average each data point's particles, which here carry different draws of "
                f"the global latent {contract.global_latents[0]!r} (outside the data plate {contract.data_plate!r}): the "
                "result would not be a bound on log p(X). Train with elbo (or elbo-stl), and estimate the whole data's "
                "evidence with log_evidence"
            )
        if self.plate_nesting is None:
            self.plate_nesting = max_plate_nesting(model, guide, args, kwargs)
        k, nesting = self.num_particles, self.plate_nesting
        model_trace, guide_trace = run_traced(
            model, guide, args, kwargs, k, nesting, proxy_latents=self.gradient == "dreg", enumerated=bool(contract.enumerated)
        )
        q_trace = None
        if self.gradient != "standard":
            q_trace = detached_guide_trace(guide, guide_trace, args, kwargs, k, nesting)
        local, global_, data_scale = importance_terms(model_trace, guide_trace, nesting, contract, q_trace)
        return local, global_, data_scale, (model_trace, guide_trace, contract)

    def _bound(self, local: Tensor) -> Tensor:
        """Per data point, ``log (1/K) sum_k w_k`` from the ``[K, N]`` log weights."""
        return local.logsumexp(0) - math.log(local.shape[0])

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> Tensor:
        """``-L_K`` summed over the batch (scaled to the full data set under subsampling)."""
        local, global_, data_scale, (model_trace, guide_trace, contract) = self.log_weights(model, guide, args, kwargs)
        bound = self._bound(local)
        if contract.not_reparameterized:
            bound = bound + self._score_surrogate(local, guide_trace, contract, model_trace)
        if self.gradient == "dreg":
            normalized = torch.softmax(local, dim=0).detach()
            surrogate = (normalized * local).sum(0)
            data_dim = data_plate_dim(model_trace, contract.data_plate)
            sampled = [
                site for _, site in sample_sites(guide_trace)
                if not site["is_observed"] and site["value"].requires_grad
            ]
            for site in sampled:
                if not any(f.name in contract.plates for f in site["cond_indep_stack"]):
                    raise InputError(
                        f"iwae-dreg weighs each data point's samples; the global latent {site['name']!r} "
                        f"outside the data plate {contract.data_plate!r} has no per-point weight: use iwae or iwae-stl"
                    )
            for site in sampled:
                weight = per_point_weights_to_site(normalized, site, self.plate_nesting, data_dim)
                # The surrogate already weighs z_k by wbar_k; the hook on the proxy adds the second factor.
                site["value"].register_hook(lambda grad, weight=weight: grad * weight)
            bound = bound.detach() + surrogate - surrogate.detach()
        return -_total(bound, global_, data_scale)

    def _score_surrogate(self, local: Tensor, guide_trace: Any, contract: Any, model_trace: Any) -> Tensor:
        """Per data point, a zero-valued term whose gradient is the bound's score-function part for the guide's discrete sites.

        With ``L = log (1/K) sum_k w_k`` and ``d_k`` the k-th particle's non-reparameterized sites,

            grad L = sum_k wbar_k grad log w_k + sum_k c_k grad log q(d_k | x).

        The plain score function (``discrete="score"``) takes ``c_k = L``, the same learning
        signal for every particle, whose variance grows with K. VIMCO (Mnih & Rezende 2016,
        "Variational inference for Monte Carlo objectives") takes ``c_k = L - L_{-k}``, where
        ``L_{-k}`` is ``L`` with ``log w_k`` replaced by the mean of the other particles' log
        weights: a baseline per particle from the other K - 1 that leaves the gradient unbiased,
        since it does not depend on ``d_k``. Needs K >= 2.
        """
        k = local.shape[0]
        nesting = self.plate_nesting
        data_dim = data_plate_dim(model_trace, contract.data_plate)
        # Unscaled, as the log weights are: the data plate's scale multiplies the bound after this term is added.
        log_q = sum(per_point(site_log_prob(guide_trace.nodes[name], scaled=False), -(nesting + 1), data_dim)
                    for name in contract.not_reparameterized)  # [K, N]
        weights = local.detach()
        bound = weights.logsumexp(0) - math.log(k)
        if self.discrete == "vimco":
            if k < 2:
                raise InputError("VIMCO's leave-one-out baselines need two or more particles: iwae:k=2 or more")
            others_mean = (weights.sum(0, keepdim=True) - weights) / (k - 1)  # [K, N]: mean log w of the others
            eye = torch.eye(k, dtype=torch.bool, device=weights.device).unsqueeze(-1)  # [K, K, 1]
            # Row j: the particles' log weights with the j-th replaced by the others' mean.
            replaced = torch.where(eye, others_mean.unsqueeze(1), weights.unsqueeze(0))
            signal = bound - (replaced.logsumexp(1) - math.log(k))
        else:
            signal = bound.expand_as(weights)
        term = (signal * log_q).sum(0)
        return term - term.detach()

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> float:
        with torch.no_grad():
            local, global_, data_scale, _ = self.log_weights(model, guide, args, kwargs)
            return -_total(self._bound(local), global_, data_scale).item()

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def _total(bound: Tensor, global_: Tensor | float, data_scale: float) -> Tensor:
    """``data_scale * sum_n bound_n + mean_k global_k``, without ops that multiply by 1 or add 0."""
    total = bound.sum()
    if data_scale != 1.0:
        total = data_scale * total
    if isinstance(global_, Tensor):
        total = total + global_.mean()
    return total
