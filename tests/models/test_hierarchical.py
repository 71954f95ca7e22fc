"""The hierarchical VAE's evidence estimate is exact on a two-layer linear-Gaussian chain.

With linear conditional means and constant scales, z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s^2),
x | z1 ~ N(W z1 + b, sigma^2 I) has the Gaussian marginal

    x ~ N(W a + b, W (A A^T + diag s^2) W^T + sigma^2 I),

so ``log_likelihood`` with either guide, trained on data from the model, must match it point by point.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab.errors import InputError
from elbolab.guides import BottomUpGuide, LadderGuide
from elbolab.guides.hierarchical import precision_weighted
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.models import HierarchicalVAE
from elbolab.nn import GaussianEncoder

X_DIM, Z1, Z2, SIGMA = 6, 3, 2, 0.5


def linear_gaussian_chain():
    """A HierarchicalVAE made linear-Gaussian, frozen, and its exact marginal of x."""
    pyro.set_rng_seed(0)
    model = HierarchicalVAE(X_DIM, (Z1, Z2), hidden=(32,), likelihood="gaussian", obs_scale=SIGMA)
    model.decoder = nn.Sequential(nn.Linear(Z1, X_DIM))
    model.top_down[0] = GaussianEncoder(Z2, Z1, ())
    head = model.top_down[0].head
    with torch.no_grad():
        head.weight[Z1:].zero_()  # the scale of p(z1 | z2) no longer depends on z2
        head.bias[Z1:].fill_(0.3)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    A, a = head.weight[:Z1], head.bias[:Z1]
    s = torch.nn.functional.softplus(head.bias[Z1:]) + model.top_down[0].min_scale
    W, b = model.decoder[0].weight, model.decoder[0].bias
    covariance = W @ (A @ A.T + torch.diag(s**2)) @ W.T + SIGMA**2 * torch.eye(X_DIM)
    return model, dist.MultivariateNormal(W @ a + b, covariance)


@pytest.mark.parametrize("family", ["ladder", "bottom-up"])
def test_log_likelihood_matches_the_exact_marginal_of_a_linear_gaussian_chain(family):
    model, marginal = linear_gaussian_chain()
    x = marginal.sample((512,))
    guide = LadderGuide(model) if family == "ladder" else BottomUpGuide(X_DIM, (Z1, Z2), hidden=(32,), hidden_upper=(32,))
    exact = marginal.log_prob(x[:64])
    pyro.set_rng_seed(1)
    untrained = log_likelihood(model, guide, x[:64], num_samples=20000)
    fit(model, guide, x, epochs=150, batch_size=64, lr=3e-3, progress=False, device="cpu")
    estimate = log_likelihood(model, guide, x[:64], num_samples=20000)
    assert (untrained - exact).abs().max() > 1.0  # the untrained guide's estimate is visibly off
    assert (estimate - exact).abs().max() < 0.05


def test_ladder_guide_combines_estimate_and_prior_by_precision():
    loc, scale = precision_weighted(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]))
    # precisions 1 and 1/4: variance 1 / 1.25 = 0.8, mean (1 * 1 + 3 / 4) * 0.8 = 1.4
    assert torch.allclose(loc, torch.tensor([1.4])) and torch.allclose(scale, torch.tensor([0.8]).sqrt())


def test_ladder_guide_shares_the_model_top_down_networks():
    model = HierarchicalVAE(10, (4, 3, 2), hidden=(8,))
    guide = LadderGuide(model)
    model_ids = {id(p) for p in model.top_down.parameters()}
    assert model_ids and model_ids <= {id(p) for p in guide.parameters()}


def test_iwae_paper_architecture_is_one_call():
    model = HierarchicalVAE(784, z_dims=(100, 50), hidden=(200, 200), hidden_upper=(100, 100), activation="tanh")
    assert model.sites == ("z1", "z2")
    assert [m.out_features for m in model.decoder if isinstance(m, nn.Linear)] == [200, 200, 784]
    assert [m.out_features for m in model.top_down[0].trunk if isinstance(m, nn.Linear)] == [100, 100]


def test_analytic_kl_needs_the_model_order():
    model = HierarchicalVAE(10, (4, 2), hidden=(8,))
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    get_objective("elbo-analytic").differentiable_loss(model, LadderGuide(model), x)
    with pytest.raises(InputError, match="model's order"):
        get_objective("elbo-analytic").differentiable_loss(model, BottomUpGuide(10, (4, 2), hidden=(8,)), x)
