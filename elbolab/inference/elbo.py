"""The evidence lower bound, with a Monte Carlo or a closed-form KL term, and a beta weight on the KL.

    ELBO_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))

``elbo`` estimates the whole bound by Monte Carlo, ``log p(x, z) - log q(z | x)`` at
``z ~ q`` (Pyro's ``Trace_ELBO`` semantics); ``elbo-analytic`` replaces ``log q - log p`` of each
latent site by its closed-form KL (``TraceMeanField_ELBO`` semantics), which removes that
term's sampling variance (Kingma & Welling 2014, appendix B); ``elbo-stl`` keeps the Monte
Carlo KL but drops its zero-mean score term from the gradient ("sticking the landing", Roeder
et al. 2017). ``beta != 1`` is the beta-VAE
(Higgins et al. 2017); a rising beta is KL warm-up (Bowman et al. 2016; Sonderby et al. 2016).
The gradient is the pathwise one through reparameterized guide samples. A guide site without a
reparameterized sampler (a discrete latent the guide samples, not one the model sums out) adds
the score-function term ``(f - b(x)) grad log q(d | x)`` per data point, with a learned baseline
``b(x)`` (:meth:`ELBO._score_surrogate`). A model with discrete sites marked for enumeration has
them summed out (:func:`~elbolab.inference.traces.enumerated_log_joint`): ``log p(x, z)`` is then
``log sum_c p(x, z, c)``, and beta weighs ``log p(z) - log q(z | x)`` with ``p(z)`` the marginal.
"""

from __future__ import annotations

__all__ = ["DISCRETE_GRADIENTS", "ELBO", "Relaxed"]

import contextlib
import math
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import pyro.infer
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.distributions import kl_divergence

from elbolab.config import is_integer, is_real
from elbolab.contract import pair_contract, refuse_not_reparameterized
from elbolab.errors import InputError
from elbolab.inference.traces import (
    data_plate_dim,
    detached_guide_trace,
    enumerated_log_joint,
    log_weights_per_point,
    max_plate_nesting,
    per_point,
    run_traced,
    sample_sites,
    site_log_prob,
)
from elbolab.nn import mlp

# Gradients for guide sites without a reparameterized sampler: the score function with a learned
# baseline, without one, or none (refused, as before).
DISCRETE_GRADIENTS = ("baseline", "score", "relaxed", "pathwise")
BASELINE_HIDDEN = (64,)


class ELBO(pyro.infer.ELBO):
    """Negative beta-ELBO as a loss, summed over the data points of a batch.

    Arguments:
        num_particles: samples of ``z`` per data point, vectorized in one plate.
        analytic_kl: use the closed-form ``KL(q || p)`` of every latent site (an error names the
            site when the guide/prior pair has none).
        beta: weight of the KL term (``1`` is the ELBO); :func:`~elbolab.inference.fit` sets it
            per step under KL warm-up.
        max_plate_nesting: plates the model nests; found by one trace when ``None``.
        stick_the_landing: evaluate ``log q`` with stopped gradients on the guide's parameters,
            dropping the zero-mean score term (Roeder et al. 2017); the value is unchanged.
        discrete: the gradient for guide sites without a reparameterized sampler (discrete
            sites the guide samples): ``"baseline"``, the score function with a learned
            input-dependent baseline (NVIL); ``"score"``, without a baseline; ``"relaxed"``, the
            Concrete / Gumbel-softmax relaxation (:class:`Relaxed`) at ``temperature``, whose
            loss is then the relaxed model's; ``"pathwise"``, none (such sites are refused).
        temperature: the relaxation's temperature (``discrete="relaxed"``).

    Example:
        >>> loss = ELBO(num_particles=4).differentiable_loss(model, guide, x)
        >>> loss.backward()
    """

    supports_beta = True

    def __init__(
        self,
        num_particles: int = 1,
        analytic_kl: bool = False,
        beta: float = 1.0,
        max_plate_nesting: int | None = None,
        stick_the_landing: bool = False,
        discrete: str = "baseline",
        temperature: float = 0.5,
    ) -> None:
        if not is_integer(num_particles) or num_particles < 1:
            raise InputError(f"num_particles must be a positive integer, got {num_particles}")
        if not is_real(beta) or beta < 0:
            raise InputError(f"beta must be finite and >= 0, got {beta}")
        super().__init__(num_particles=int(num_particles), vectorize_particles=True)
        self.analytic_kl = analytic_kl
        self.beta = float(beta)
        self.plate_nesting = max_plate_nesting
        if stick_the_landing and analytic_kl:
            raise InputError("sticking the landing drops the score term of a Monte Carlo KL; the analytic KL has none")
        self.stick_the_landing = stick_the_landing
        if discrete not in DISCRETE_GRADIENTS:
            raise InputError(f"discrete must be one of {', '.join(DISCRETE_GRADIENTS)}, got {discrete!r}")
        self.discrete = discrete
        if not is_real(temperature) or temperature <= 0:
            raise InputError(f"temperature must be a positive number, got {temperature}")
        self.temperature = float(temperature)
        self.baseline: nn.Module | None = None  # b(x) of the score-function gradient, built on first use

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> Tensor:
        """``-ELBO_beta`` summed over the batch, averaged over particles; differentiable."""
        contract = pair_contract(model, guide, args, kwargs)
        scored = self._scored_sites(contract)
        if (self.num_particles > 1 or contract.enumerated or scored) and self.plate_nesting is None:
            self.plate_nesting = max_plate_nesting(model, guide, args, kwargs)
        if contract.enumerated and self.analytic_kl:
            raise InputError(
                f"elbo-analytic: the model sums out its discrete site {contract.enumerated[0]!r} (enumerated), so the "
                "prior of the guide's latents is a mixture over its values, whose KL has no closed form: use 'elbo'"
            )
        relaxed = scored if self.discrete == "relaxed" else ()
        scored = () if relaxed else scored
        with Relaxed(relaxed, self.temperature) if relaxed else contextlib.nullcontext():
            model_trace, guide_trace = run_traced(
                model, guide, args, kwargs, self.num_particles, self.plate_nesting or 0, enumerated=bool(contract.enumerated)
            )
        log_lik: Tensor | float = 0.0
        kl: Tensor | float = 0.0
        if contract.enumerated:
            # Per point, the discrete sites summed out: log p(x | z) = log p(x, z) - log p(z).
            log_joint, log_latent, scale = enumerated_log_joint(model_trace, self.plate_nesting, contract)
            log_lik, kl = scale * (log_joint - log_latent).sum(), -scale * log_latent.sum()
        if self.analytic_kl:
            for name, site in sample_sites(guide_trace):
                if name not in model_trace.nodes or isinstance(site["fn"], dist.Delta):
                    raise InputError(
                        f"elbo-analytic: the guide's site {name!r} is an auxiliary variable or a transformed "
                        "copy of one (as in an AutoAmortizedGuide); a KL per model site has no closed form "
                        "for it: use the Monte Carlo objective 'elbo'"
                    )
            _check_sampling_order(model_trace, guide_trace)
        for name, site in sample_sites(model_trace):
            if contract.enumerated and any(f.name in contract.plates for f in site["cond_indep_stack"]):
                continue  # in the enumerated terms above
            if site["is_observed"]:
                log_lik = log_lik + site_log_prob(site).sum()
            elif self.analytic_kl:
                kl = kl + _analytic_kl(name, guide_trace.nodes[name], site)
            else:
                kl = kl - site_log_prob(site).sum()
        if not self.analytic_kl:
            if self.stick_the_landing:
                guide_trace = detached_guide_trace(
                    guide, guide_trace, args, kwargs, self.num_particles, self.plate_nesting or 0
                )
            for _, site in sample_sites(guide_trace):
                if not site["is_observed"]:
                    kl = kl + site_log_prob(site).sum()
        # beta is a float, or a 0-d tensor while the compiled step is traced (KL warm-up changes it).
        unweighted = isinstance(self.beta, float) and self.beta == 1.0
        loss = (kl if unweighted else self.beta * kl) - log_lik
        if scored:
            loss = loss + self._score_surrogate(model_trace, guide_trace, contract, scored, args[0])
        return loss / self.num_particles if self.num_particles > 1 else loss

    def _scored_sites(self, contract: Any) -> tuple[str, ...]:
        """The guide's sites without a reparameterized sampler, which get score-function gradients; refusals by name."""
        if not contract.not_reparameterized:
            return ()
        name = contract.not_reparameterized[0]
        if self.analytic_kl or self.stick_the_landing:
            which = "elbo-analytic" if self.analytic_kl else "elbo-stl"
            raise InputError(
                f"{which} differentiates through the guide's samples, and the guide's site {name!r} has no reparameterized "
                "sampler (a discrete site): use 'elbo', whose score-function gradient with a learned baseline covers it"
            )
        if self.discrete == "pathwise":
            refuse_not_reparameterized(contract, "the ELBO's pathwise gradient (discrete='pathwise')")
        for name in (n for n in contract.not_reparameterized if n in contract.global_latents):
            raise InputError(
                f"the guide's site {name!r} has no reparameterized sampler and sits outside the data plate (a global "
                "latent): the score-function gradient weighs each data point's sites, and this one has no point"
            )
        return contract.not_reparameterized

    def _score_surrogate(self, model_trace: Any, guide_trace: Any, contract: Any, scored: tuple[str, ...], x: Tensor) -> Tensor:
        """Zero-valued terms whose gradient is the score-function part of the ELBO's gradient (and trains the baseline).

        For the guide's sites ``d`` without a reparameterized sampler, per data point and particle

            grad E_q[f] = E_q[grad f + (f - b(x)) grad log q(d | x)],   f = log p(x, z) - log q(z | x),

        with ``b(x)`` an input-dependent baseline (Mnih & Gregor 2014, "Neural variational inference
        and learning in belief networks", NVIL) trained to minimize ``(f - b(x))^2``; it subtracts
        a control variate and leaves the gradient unbiased (``E[grad log q] = 0``). With
        ``discrete="score"`` there is no baseline. ``f`` is the beta-weighted per-point ELBO.
        """
        nesting = self.plate_nesting or 0
        log_w, log_lik = log_weights_per_point(model_trace, guide_trace, nesting, contract)
        signal = log_w if isinstance(self.beta, float) and self.beta == 1.0 else log_lik + self.beta * (log_w - log_lik)
        signal = signal.detach()
        data_dim = data_plate_dim(model_trace, contract.data_plate)
        # The signal carries the data plate's scale (N / B in training) already: log q does not, or
        # the gradient would carry it twice.
        log_q = sum(
            per_point(site_log_prob(guide_trace.nodes[name], scaled=False), -(nesting + 1), data_dim) for name in scored
        )
        if self.discrete == "baseline":
            baseline = self._baseline(x)(x.reshape(x.shape[0], -1)).squeeze(-1)  # [N]
            fitted = (signal - baseline).pow(2).sum()
            centred = signal - baseline.detach()
            return -(centred * log_q).sum() + (centred * log_q).sum().detach() + fitted - fitted.detach()
        return -(signal * log_q).sum() + (signal * log_q).sum().detach()

    def _baseline(self, x: Tensor) -> nn.Module:
        width = math.prod(x.shape[1:])
        if self.baseline is None or self.baseline[0].in_features != width:
            self.baseline = mlp(width, BASELINE_HIDDEN, 1).to(device=x.device, dtype=x.dtype)
        return self.baseline

    def _get_trace(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict):
        """One (model trace, guide trace) pair, un-vectorized (Pyro's ``ELBO`` interface)."""
        return run_traced(model, guide, args, kwargs)

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> float:
        """The loss as a float, without gradients."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> float:
        """The loss as a float, after backpropagating it (Pyro's ``SVI`` interface)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


class Relaxed(Messenger):
    """The Concrete / Gumbel-softmax relaxation of discrete sites, in the model and the guide alike.

    Each named ``OneHotCategorical`` site becomes a ``RelaxedOneHotCategorical`` and each
    ``Bernoulli`` a ``RelaxedBernoulli`` of the same logits at ``temperature`` (Maddison, Mnih &
    Teh 2017, "The Concrete distribution"; Jang, Gu & Poole 2017): the guide's draws are then
    reparameterized and the model's prior is evaluated with the Concrete density, as Maddison et
    al. do, so that the ELBO is a bound on the relaxed model's evidence. The gradient is biased
    for the discrete model (less as the temperature falls, with more variance); the printed loss
    is the relaxed bound, and evaluation (``log_likelihood``) scores the discrete model. A
    ``Categorical`` site (integer values, which a model indexes with) has no relaxation and is
    refused by name.
    """

    def __init__(self, sites: tuple[str, ...], temperature: float) -> None:
        super().__init__()
        self.sites, self.temperature = frozenset(sites), temperature

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] in self.sites and not msg["is_observed"]:
            msg["fn"] = _relaxed(msg["name"], msg["fn"], self.temperature)


def _relaxed(name: str, fn: Any, temperature: float) -> Any:
    reinterpreted = 0
    base = fn
    while isinstance(base, torch.distributions.Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    batch_shape = base.batch_shape  # a plate's expansion of the site, kept
    if isinstance(base, dist.ExpandedDistribution):
        base = base.base_dist
    if isinstance(base, torch.distributions.OneHotCategorical):
        relaxed = dist.RelaxedOneHotCategorical(torch.tensor(temperature, dtype=base.logits.dtype, device=base.logits.device),
                                                logits=base.logits)
    elif isinstance(base, torch.distributions.Bernoulli):
        relaxed = dist.RelaxedBernoulli(torch.tensor(temperature, dtype=base.logits.dtype, device=base.logits.device),
                                        logits=base.logits)
    else:
        raise InputError(
            f"the Concrete relaxation (discrete='relaxed') relaxes OneHotCategorical and Bernoulli sites; site {name!r} is "
            f"{type(base).__name__}, whose integer values a model indexes with: use discrete='baseline' (the score function)"
        )
    relaxed = relaxed.expand(batch_shape)
    return relaxed.to_event(reinterpreted) if reinterpreted else relaxed


def _check_sampling_order(model_trace: Any, guide_trace: Any) -> None:
    """Refuse a guide that samples latents in another order than the model.

    The closed-form KL of a site is taken given the values of the sites sampled before it:

        E_q[log q(z) / p(z)] = sum_l E_q[ KL(q(z_l | z_<l) || p(z_l | z_<l)) ]

    holds when q and p factor in the same order (a ladder guide's top-down inference does). A
    bottom-up guide samples ``z_1`` before ``z_2`` while ``p(z_1 | z_2)`` conditions on ``z_2``:
    its per-site KLs would condition on a sample drawn after, and their sum is not the KL.
    """
    model_order = [name for name, site in sample_sites(model_trace) if not site["is_observed"]]
    guide_order = [name for name, site in sample_sites(guide_trace) if not site["is_observed"]]
    if len(model_order) > 1 and model_order != guide_order:
        raise InputError(
            f"elbo-analytic takes each site's closed-form KL given the sites sampled before it, which needs the guide "
            f"to sample the latents in the model's order ({', '.join(model_order)}); this guide samples "
            f"{', '.join(guide_order)}: use the Monte Carlo objective 'elbo' (or a top-down guide such as the ladder guide)"
        )


def _analytic_kl(name: str, guide_site: dict, model_site: dict) -> Tensor:
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        raise InputError(
            f"elbo-analytic: latent site {name!r} has no closed-form KL between the guide's "
            f"{type(guide_site['fn']).__name__} and the prior's {type(model_site['fn']).__name__}; "
            "use the Monte Carlo objective 'elbo'"
        ) from None
    # The KL inherits the site's plate scale and mask, as a log density would.
    return site_log_prob({**guide_site, "fn": _Constant(kl)}).sum()


class _Constant:
    """Stands in for a distribution so that :func:`site_log_prob` scales and masks a KL tensor."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def log_prob(self, _: Any) -> Tensor:
        return self.value
