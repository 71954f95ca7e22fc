"""The VampPrior: its density against a direct computation, and log p(x) against a linear-Gaussian model's exact evidence."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch import nn

from elbolab.distributions import EqualGaussianMixture
from elbolab.errors import InputError
from elbolab.guides import FlowGuide, GaussianGuide, MixtureGuide
from elbolab.inference import fit, log_likelihood
from elbolab.models import VAE, ModelConfig


def direct_mixture_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log (1/C) sum_c N(z; loc_c, scale_c), by differences: [..., D] -> [...]."""
    components = torch.distributions.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)
    return components.logsumexp(-1) - math.log(loc.shape[0])


@pytest.mark.parametrize("smallest_scale", [1.0, 0.01, 1e-3])
def test_equal_mixture_density_equals_the_direct_sum(smallest_scale: float) -> None:
    torch.manual_seed(0)
    loc = torch.randn(7, 5) * 3
    scale = torch.rand(7, 5) * (1 - smallest_scale) + smallest_scale
    z = loc[torch.randint(7, (4, 3))] + scale[0] * torch.randn(4, 3, 5)  # near the components: large (z/sigma)^2 terms
    mixture = EqualGaussianMixture(loc, scale).expand(torch.Size([3]))
    assert mixture.batch_shape == (3,) and mixture.event_shape == (5,)
    expected = direct_mixture_log_prob(z.double(), loc.double(), scale.double()).float()
    assert torch.allclose(mixture.log_prob(z), expected, rtol=1e-5, atol=1e-4)


def test_equal_mixture_samples_have_the_mixture_moments() -> None:
    torch.manual_seed(1)
    loc, scale = torch.tensor([[-2.0], [3.0]]), torch.tensor([[0.5], [1.0]])
    draws = EqualGaussianMixture(loc, scale).sample(torch.Size([200_000]))
    assert draws.shape == (200_000, 1)
    assert abs(draws.mean().item() - 0.5) < 0.02
    variance = 0.5 * (0.25 + 1.0) + 0.25 * 25  # mean of variances + variance of means
    assert abs(draws.var().item() - variance) < 0.05


def vamp_pair(x_dim: int = 6, z_dim: int = 2, pseudo_inputs: int = 4, seed: int = 0) -> tuple[VAE, GaussianGuide]:
    torch.manual_seed(seed)
    model = VAE(x_dim, z_dim, hidden=(8,), prior="vamp", pseudo_inputs=pseudo_inputs)
    guide = GaussianGuide(x_dim, z_dim, hidden=(8,))
    model.prior.share_encoder(guide)
    return model, guide


def test_prior_is_the_mean_of_the_guides_posteriors_at_the_pseudo_inputs() -> None:
    model, guide = vamp_pair()
    z = torch.randn(10, 2)
    loc, scale = guide.encode(model.prior.pseudo_inputs)
    expected = torch.stack([torch.distributions.Normal(loc[k], scale[k]).log_prob(z).sum(-1) for k in range(4)]).logsumexp(0) - math.log(4)
    assert torch.allclose(model.prior_distribution().log_prob(z), expected, atol=1e-5)
    trace = pyro.poutine.trace(model).get_trace(torch.rand(10, 6).bernoulli())
    value = trace.nodes["z"]["value"]
    assert torch.allclose(trace.nodes["z"]["fn"].log_prob(value), direct_mixture_log_prob(value, loc, scale), atol=1e-5)


def test_log_likelihood_equals_the_exact_evidence_of_a_linear_gaussian_model_with_a_vamp_prior() -> None:
    """z ~ (1/K) sum_k N(mu_k, diag s_k^2), x | z ~ N(W z + b, sigma^2 I): p(x) = (1/K) sum_k N(x; W mu_k + b, W S_k W^T + sigma^2 I)."""
    torch.manual_seed(3)
    x_dim, z_dim, sigma = 4, 2, 0.7
    decoder = nn.Linear(z_dim, x_dim)
    model = VAE(x_dim, z_dim, likelihood="gaussian", obs_scale=sigma, prior="vamp", pseudo_inputs=3, decoder=decoder)
    guide = GaussianGuide(x_dim, z_dim, hidden=(16,))
    model.prior.share_encoder(guide)
    x = torch.randn(5, x_dim)
    with torch.no_grad():
        loc, scale = guide.encode(model.prior.pseudo_inputs)
        W, b = decoder.weight, decoder.bias
        evidence = torch.stack([
            torch.distributions.MultivariateNormal(W @ loc[k] + b, W @ torch.diag(scale[k] ** 2) @ W.T + sigma**2 * torch.eye(x_dim)).log_prob(x)
            for k in range(3)
        ]).logsumexp(0) - math.log(3)
        estimate = log_likelihood(model, guide, x, num_samples=20_000)
    # The guide is not the posterior; with 20,000 samples the estimate's bias and error are below 0.05 nats here.
    assert torch.allclose(estimate, evidence, atol=0.05), (estimate, evidence)


def test_training_moves_the_pseudo_inputs() -> None:
    model, guide = vamp_pair(x_dim=64, z_dim=3, pseudo_inputs=5)
    data = torch.rand(200, 64).bernoulli()
    model.init_output_bias(data)
    start = model.prior.logits.detach().clone()
    fit(model, guide, data, epochs=2, batch_size=50, progress=False)
    assert not torch.equal(model.prior.logits, start)


def test_pseudo_inputs_start_at_training_points() -> None:
    model, _ = vamp_pair(x_dim=6, pseudo_inputs=4)
    data = torch.rand(50, 6).bernoulli()
    model.init_output_bias(data)
    started = model.prior.pseudo_inputs.round()
    assert all((started[k] == data).all(-1).any() for k in range(4))


def test_refusals_name_the_problem() -> None:
    model = VAE(6, 2, hidden=(8,), prior="vamp", pseudo_inputs=4)
    with pytest.raises(InputError, match="share_encoder"):
        model(torch.rand(3, 6).bernoulli())
    for guide in (MixtureGuide(6, 2, hidden=(8,)), FlowGuide(6, 2, hidden=(8,))):
        with pytest.raises(InputError, match="diagonal-Gaussian q"):
            model.prior.share_encoder(guide)
    model, guide = vamp_pair()
    with pytest.raises(InputError, match="'z' has no closed-form KL .* EqualGaussianMixture"):
        fit(model, guide, torch.rand(20, 6).bernoulli(), epochs=1, objective="elbo-analytic", progress=False)
    with pytest.raises(InputError, match="pseudo_inputs is an option of prior vamp"):
        ModelConfig(pseudo_inputs=10)
    with pytest.raises(InputError, match="unknown prior 'vampp'; did you mean 'vamp'"):
        ModelConfig(prior="vampp")
