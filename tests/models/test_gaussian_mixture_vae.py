"""The Gaussian-mixture VAE: its cluster summed out is its mixture prior written as a density; clusters match labels."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab.analysis import cluster_probabilities, clustering_accuracy
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import fit, get_objective, importance_estimate
from elbolab.models import GaussianMixtureVAE


class MixtureDensityPrior(nn.Module):
    """The same model with z's prior the mixture density itself: no discrete site at all."""

    def __init__(self, gmvae: GaussianMixtureVAE) -> None:
        super().__init__()
        self.m = gmvae

    def forward(self, x):
        m = self.m
        prior = dist.MixtureSameFamily(
            dist.Categorical(logits=m.mixture_logits),
            dist.Normal(m.component_means, m.component_log_scales.exp()).to_event(1),
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", m.observation(m.decoder(z)), obs=x)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = GaussianMixtureVAE(12, 3, clusters=4, hidden=(16,), spread=2.0)
    guide = GaussianGuide(12, 3, hidden=(16,))
    x = torch.bernoulli(torch.full((30, 12), 0.3))
    return model, guide, x


@pytest.mark.parametrize("estimate", ["log_likelihood", "elbo", "reconstruction"])
def test_the_enumerated_cluster_is_the_mixture_prior(pair, estimate):
    model, guide, x = pair
    estimates = []
    for program in (model, MixtureDensityPrior(model)):
        pyro.set_rng_seed(3)  # the same draws of q(z | x) for both
        estimates.append(getattr(importance_estimate(program, guide, x, num_samples=50), estimate))
    assert torch.allclose(*estimates, atol=1e-4)


@pytest.mark.parametrize("name", ["elbo", "elbo-stl", "iwae", "iwae-dreg", "renyi"])
def test_every_objective_and_its_gradient_are_the_mixture_priors(pair, name):
    model, guide, x = pair
    values, grads = [], []
    for program in (model, MixtureDensityPrior(model)):
        pyro.set_rng_seed(4)
        loss = get_objective(name, num_particles=3).differentiable_loss(program, guide, x)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, [model.component_means, *guide.parameters()]))
    assert torch.allclose(*values, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_cluster_posterior_and_accuracy(pair):
    model, guide, x = pair
    z = torch.randn(5, 3)
    joint = dist.Normal(model.component_means, model.component_log_scales.exp()).to_event(1).log_prob(z[:, None]) - torch.log(
        torch.tensor(4.0))
    assert torch.allclose(model.cluster_log_posterior(z).exp(), joint.softmax(-1), atol=1e-6)
    probabilities = cluster_probabilities(model, guide, x)
    assert probabilities.shape == (30, 4) and torch.allclose(probabilities.sum(-1), torch.ones(30))
    assert clustering_accuracy([0, 0, 1, 1, 1], [7, 7, 3, 3, 7]) == pytest.approx(0.8)  # one-to-one: 7 is taken
    assert clustering_accuracy([0, 0, 0, 1, 1], [1, 1, 2, 2, 2]) == pytest.approx(0.8)
    assert clustering_accuracy([0, 1, 2, 3], [5, 5, 6, 6]) == 1.0  # more clusters than labels: many-to-one
    with pytest.raises(InputError, match="one cluster per label"):
        clustering_accuracy([0, 1], [0])


def test_training_separates_two_well_separated_groups():
    # Two groups of binary vectors (first half of the pixels on, or the second): the two clusters find them.
    torch.manual_seed(0)
    group = torch.arange(200) % 2
    probabilities = torch.where((torch.arange(16) < 8) == group[:, None].bool(), 0.9, 0.1)
    x = torch.bernoulli(probabilities)
    pyro.set_rng_seed(0)
    model, guide = GaussianMixtureVAE(16, 2, clusters=2, hidden=(16,), spread=2.0), GaussianGuide(16, 2, hidden=(16,))
    fit(model, guide, x, epochs=30, batch_size=50, lr=1e-2, progress=False)
    clusters = cluster_probabilities(model, guide, x).argmax(-1)
    assert clustering_accuracy(clusters, group) > 0.95
