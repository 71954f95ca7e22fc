"""The ELBO objectives against closed forms on the linear-Gaussian model."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from elbolab.data import ExactPosteriorGuide, LinearGaussian
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import ELBO, get_objective


@pytest.fixture
def problem():
    model = LinearGaussian.random(x_dim=6, z_dim=3, noise_scale=2.0, seed=1)
    x = model.sample(5, generator=torch.Generator().manual_seed(2))
    guide = GaussianGuide(6, 3, hidden=(8,))
    return model, guide, x


def closed_form_neg_elbo(model, guide, x, beta=1.0):
    """-(E_q log p(x|z) - beta KL(q || N(0, I))), summed over data points, differentiable."""
    loc, scale = guide.encode(x)
    kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
    return -(model.expected_log_likelihood(x, loc, scale) - beta * kl).sum()


@pytest.mark.parametrize("name", ["elbo", "elbo-analytic"])
def test_value_matches_closed_form(problem, name):
    model, guide, x = problem
    objective = get_objective(name, num_particles=20_000)
    with torch.no_grad():
        losses = torch.stack([objective.differentiable_loss(model, guide, x) for _ in range(8)])
        exact = closed_form_neg_elbo(model, guide, x)
    standard_error = losses.std() / 8**0.5
    assert standard_error < 0.2  # enough draws for the comparison to mean something
    assert (losses.mean() - exact).abs() < 4 * standard_error + 1e-3


def test_analytic_kl_equals_average_monte_carlo_kl(problem):
    model, guide, x = problem
    with torch.no_grad():
        # beta=1 minus beta=0 under one shared seed (same draws of z) isolates the KL term.
        torch.manual_seed(0)
        mc = ELBO(num_particles=50_000, beta=1.0).differentiable_loss(model, guide, x)
        torch.manual_seed(0)
        mc_no_kl = ELBO(num_particles=50_000, beta=0.0).differentiable_loss(model, guide, x)
        torch.manual_seed(0)
        analytic = ELBO(num_particles=1, analytic_kl=True, beta=1.0).differentiable_loss(model, guide, x)
        torch.manual_seed(0)
        analytic_no_kl = ELBO(num_particles=1, analytic_kl=True, beta=0.0).differentiable_loss(model, guide, x)
        loc, scale = guide.encode(x)
        exact_kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum()
    assert (analytic - analytic_no_kl).item() == pytest.approx(exact_kl.item(), rel=1e-5)
    assert (mc - mc_no_kl).item() == pytest.approx(exact_kl.item(), rel=0.01)


def test_exact_posterior_gives_log_evidence_with_zero_variance():
    model = LinearGaussian.random(x_dim=6, z_dim=3, seed=3)
    x = model.sample(7, generator=torch.Generator().manual_seed(4))
    exact = -model.log_likelihood(x).sum()
    with torch.no_grad():
        losses = torch.stack([ELBO().differentiable_loss(model, ExactPosteriorGuide(model), x) for _ in range(5)])
    assert torch.allclose(losses, exact.expand(5), atol=1e-3)


def test_gradient_matches_closed_form_gradient(problem):
    model, guide, x = problem
    params = list(guide.parameters())
    loss = ELBO(num_particles=100_000, analytic_kl=True).differentiable_loss(model, guide, x)
    estimated = torch.autograd.grad(loss, params)
    exact = torch.autograd.grad(closed_form_neg_elbo(model, guide, x), params)
    flat_est, flat_exact = torch.cat([g.flatten() for g in estimated]), torch.cat([g.flatten() for g in exact])
    assert torch.allclose(flat_est, flat_exact, atol=0.05 * flat_exact.abs().max().item())


def test_beta_scales_only_the_kl_term(problem):
    model, guide, x = problem
    with torch.no_grad():
        values = {}
        for beta in (0.0, 1.0, 2.5):
            torch.manual_seed(0)
            values[beta] = ELBO(beta=beta, analytic_kl=True).differentiable_loss(model, guide, x).item()
        loc, scale = guide.encode(x)
        kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum().item()
    assert values[1.0] - values[0.0] == pytest.approx(kl, rel=1e-5)
    assert values[2.5] - values[0.0] == pytest.approx(2.5 * kl, rel=1e-5)


def test_analytic_kl_refuses_pairs_without_closed_form():
    model = LinearGaussian.random(x_dim=6, z_dim=3, seed=3)
    x = model.sample(4)
    with pytest.raises(InputError, match="'z'.*MultivariateNormal"):
        ELBO(analytic_kl=True).differentiable_loss(model, ExactPosteriorGuide(model), x)


@pytest.mark.parametrize("kwargs", [{"num_particles": 0}, {"num_particles": 1.5}, {"beta": -1.0}, {"beta": math.inf}])
def test_bad_options_are_input_errors(kwargs):
    with pytest.raises(InputError):
        get_objective("elbo", **kwargs)


def test_unknown_objective_suggests_the_closest_name():
    with pytest.raises(InputError, match="did you mean 'elbo-analytic'"):
        get_objective("elbo-analytc")
