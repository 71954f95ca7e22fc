"""The evidence lower bound, with a Monte Carlo or a closed-form KL term, and a beta weight on the KL.

    ELBO_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))

``elbo`` estimates the whole bound by Monte Carlo, ``log p(x, z) - log q(z | x)`` at
``z ~ q`` (Pyro's ``Trace_ELBO`` semantics); ``elbo-analytic`` replaces ``log q - log p`` of each
latent site by its closed-form KL (``TraceMeanField_ELBO`` semantics), which removes that
term's sampling variance (Kingma & Welling 2014, appendix B); ``elbo-stl`` keeps the Monte
Carlo KL but drops its zero-mean score term from the gradient ("sticking the landing", Roeder
et al. 2017). ``beta != 1`` is the beta-VAE
(Higgins et al. 2017); a rising beta is KL warm-up (Bowman et al. 2016; Sonderby et al. 2016).
Both estimators assume reparameterized guide samples (every guide in elbolab has them); their
gradient is the pathwise one, without score-function terms.
"""

from __future__ import annotations

__all__ = ["ELBO"]

from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import pyro.infer
import torch
from torch import Tensor
from torch.distributions import kl_divergence

from elbolab.config import is_integer, is_real
from elbolab.contract import pair_contract, refuse_not_reparameterized
from elbolab.errors import InputError
from elbolab.inference.traces import (
    detached_guide_trace,
    enumerated_log_joint,
    max_plate_nesting,
    run_traced,
    sample_sites,
    site_log_prob,
)


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

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args, **kwargs) -> Tensor:
        """``-ELBO_beta`` summed over the batch, averaged over particles; differentiable."""
        contract = pair_contract(model, guide, args, kwargs)
        refuse_not_reparameterized(contract, "the ELBO's pathwise gradient")
        if (self.num_particles > 1 or contract.enumerated) and self.plate_nesting is None:
            self.plate_nesting = max_plate_nesting(model, guide, args, kwargs)
        if contract.enumerated and self.analytic_kl:
            raise InputError(
                f"elbo-analytic: the model sums out its discrete site {contract.enumerated[0]!r} (enumerated), so the "
                "prior of the guide's latents is a mixture over its values, whose KL has no closed form: use 'elbo'"
            )
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
        return loss / self.num_particles if self.num_particles > 1 else loss

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
