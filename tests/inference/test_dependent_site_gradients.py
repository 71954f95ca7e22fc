"""STL and DReG gradients for a guide whose second latent is sampled given the first.

For the bottom-up guide z1 = m1(x) + s1(x) e1, z2 = m2(z1) + s2(z1) e2, with per-particle log
weights l_k = log p(x, z_k) - log q(z_k; stop_gradient(phi)) evaluated along the reparameterized
path z_k(phi), the estimators' gradients for the guide's parameters are

    STL:   -grad_phi mean_k l_k                   (Roeder et al. 2017)
    DReG:  -grad_phi sum_k wbar_k^2 l_k           (Tucker et al. 2019, equation 7)

and DReG's gradient for the model's parameters is -sum_k wbar_k grad_theta l_k at fixed z. The
references below rebuild z(phi) from the noise of elbolab's own draws and differentiate by
autograd; the stop-gradient keeps the dependence of q(z2 | z1)'s parameters on z1, which
detaching its distribution in place would lose.
"""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbolab.guides import BottomUpGuide, LadderGuide
from elbolab.inference.elbo import ELBO
from elbolab.inference.iwae import IWAE
from elbolab.models import HierarchicalVAE

K, N, X_DIM = 6, 4, 8


def setup():
    pyro.set_rng_seed(0)
    model = HierarchicalVAE(X_DIM, (3, 2), hidden=(10,))
    guide = BottomUpGuide(X_DIM, (3, 2), hidden=(10,))
    x = torch.bernoulli(torch.full((N, X_DIM), 0.5))
    return model, guide, x


def reference_log_weights(model, guide, x, draws):
    """l_k [K, N] along z(phi), rebuilt from the noise of ``draws`` (z1, z2 values)."""
    frozen = copy.deepcopy(guide).requires_grad_(False)
    loc1, scale1 = guide.encoders[0](x)
    noise1 = ((draws["z1"] - loc1) / scale1).detach()
    z1 = loc1 + scale1 * noise1
    loc2, scale2 = guide.encoders[1](z1)
    noise2 = ((draws["z2"] - loc2) / scale2).detach()
    z2 = loc2 + scale2 * noise2
    # log q with the guide's parameters stopped, its inputs (x, and z1 for q(z2 | z1)) not.
    stopped_loc1, stopped_scale1 = frozen.encoders[0](x)
    stopped_loc2, stopped_scale2 = frozen.encoders[1](z1)
    log_q = dist.Normal(stopped_loc1, stopped_scale1).log_prob(z1).sum(-1) + dist.Normal(stopped_loc2, stopped_scale2).log_prob(z2).sum(-1)
    conditioned = poutine.trace(poutine.condition(model, data={"z1": z1, "z2": z2})).get_trace(x)
    conditioned.compute_log_prob()
    log_p = sum(conditioned.nodes[name]["log_prob"] for name in ("z1", "z2", "x"))
    return log_p - log_q


def draws_of(guide, x, seed):
    pyro.set_rng_seed(seed)
    with pyro.plate("particles", K, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    return {name: trace.nodes[name]["value"].detach() for name in ("z1", "z2")}


def gradients(loss, modules):
    params = [p for module in modules for p in module.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_dreg_matches_its_formula_for_dependent_sites():
    model, guide, x = setup()
    pyro.set_rng_seed(5)
    loss = IWAE(num_particles=K, gradient="dreg", max_plate_nesting=1).differentiable_loss(model, guide, x)
    got_guide, got_model = gradients(loss, [guide]), gradients(loss, [model])

    draws = draws_of(guide, x, seed=5)
    log_w = reference_log_weights(model, guide, x, draws)
    normalized = torch.softmax(log_w, dim=0).detach()
    expected_guide = gradients(-(normalized**2 * log_w).sum(), [guide])
    log_w_fixed_z = reference_log_weights(model, guide, x, draws)  # model gradient at fixed z: z carries none to theta
    expected_model = gradients(-(normalized * log_w_fixed_z).sum(), [model])
    assert torch.allclose(loss, -(log_w.logsumexp(0) - torch.log(torch.tensor(float(K)))).sum(), atol=1e-4)
    for got, expected in ((got_guide, expected_guide), (got_model, expected_model)):
        for g, e in zip(got, expected, strict=True):
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)


def test_dreg_differs_from_weighting_each_site_once_more():
    """The check above can fail: weighting the gradient at every sample (z2's flows into z1) gives another value."""
    model, guide, x = setup()
    draws = draws_of(guide, x, seed=5)
    log_w = reference_log_weights(model, guide, x, draws)
    normalized = torch.softmax(log_w, dim=0).detach()
    once = gradients(-(normalized**2 * log_w).sum(), [guide])
    triple = gradients(-(normalized**3 * log_w).sum(), [guide])
    assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(once, triple, strict=True))


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_stl_matches_its_formula_for_dependent_sites(objective):
    model, guide, x = setup()
    pyro.set_rng_seed(7)
    if objective == "elbo":
        loss = ELBO(num_particles=K, stick_the_landing=True, max_plate_nesting=1).differentiable_loss(model, guide, x)
    else:
        loss = IWAE(num_particles=K, gradient="stl", max_plate_nesting=1).differentiable_loss(model, guide, x)
    got = gradients(loss, [guide])
    log_w = reference_log_weights(model, guide, x, draws_of(guide, x, seed=7))
    if objective == "elbo":
        expected = gradients(-log_w.mean(0).sum(), [guide])
    else:
        expected = gradients(-(log_w.logsumexp(0)).sum(), [guide])
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)


def test_dreg_and_stl_stop_the_ladder_guides_shared_prior_networks_in_log_q():
    """The ladder guide's q depends on the model's top-down networks; STL's value is still the ELBO."""
    pyro.set_rng_seed(0)
    model = HierarchicalVAE(X_DIM, (3, 2), hidden=(10,))
    guide = LadderGuide(model)
    x = torch.bernoulli(torch.full((N, X_DIM), 0.5))
    pyro.set_rng_seed(3)
    stl = ELBO(num_particles=K, stick_the_landing=True, max_plate_nesting=1).differentiable_loss(model, guide, x)
    pyro.set_rng_seed(3)
    plain = ELBO(num_particles=K, max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert torch.allclose(stl, plain)
    pyro.set_rng_seed(3)
    IWAE(num_particles=K, gradient="dreg", max_plate_nesting=1).differentiable_loss(model, guide, x).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
