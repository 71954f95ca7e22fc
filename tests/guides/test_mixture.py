"""The mixture guide: exact log density, pathwise gradients for every parameter, contract, refusals."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide, MixtureGuide
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.inference.traces import sample_sites
from elbolab.models import VAE


def test_log_density_is_the_exact_mixture_density():
    torch.manual_seed(0)
    guide = MixtureGuide(6, 3, components=4, hidden=(8,))
    x = torch.rand(5, 6)
    weights, loc, scale = guide.encode(x)
    z = torch.randn(5, 3)
    components = torch.distributions.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)  # [5, 4]
    expected = (weights.log() + components).logsumexp(-1)
    torch.testing.assert_close(guide.distribution(x).log_prob(z), expected)
    assert weights.shape == (5, 4) and loc.shape == scale.shape == (5, 4, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def test_guide_covers_the_model_and_training_reaches_every_parameter():
    digits = load_dataset("digits", binarize="threshold")
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 4, hidden=(32,)), MixtureGuide(64, 4, components=3, hidden=(32,))
    x = digits.x[:50]
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    latent = {n for n, s in sample_sites(model_trace) if not s["is_observed"]}
    assert latent == {n for n, _ in sample_sites(guide_trace)} == {"z"}
    loss = get_objective("iwae", num_particles=3).differentiable_loss(model, guide, x)
    loss.backward()
    for name, param in guide.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    before = get_objective("elbo").loss(model, guide, digits.x)
    fit(model, guide, digits, epochs=20, batch_size=100, lr=3e-3, progress=False)
    assert get_objective("elbo").loss(model, guide, digits.x) < before - 10 * digits.num_points
    assert torch.isfinite(log_likelihood(model, guide, digits.x[:20], num_samples=100)).all()


def test_mixture_guide_is_no_worse_than_a_diagonal_gaussian_on_a_correlated_posterior():
    """synthetic-linear-gaussian: the mixture family contains the diagonal Gaussian (one component)."""
    data = load_dataset("synthetic-linear-gaussian", "train")
    model, x = data.truth, data.x[:2000]
    z_dim = model.z_dim
    elbos = {}
    for name, guide in (("gaussian", GaussianGuide(x.shape[1], z_dim, hidden=(32,))),
                        ("mixture", MixtureGuide(x.shape[1], z_dim, components=3, hidden=(32,)))):
        pyro.set_rng_seed(0)
        # Eight particles per point: a mixture's ELBO gradient is noisier than a Gaussian's.
        fit(model, guide, x, epochs=100, batch_size=200, lr=3e-3, particles=8, progress=False)
        pyro.set_rng_seed(1)
        elbos[name] = -get_objective("elbo", num_particles=50).loss(model, guide, x) / x.shape[0]
    # The family holds the Gaussian, but two 100-epoch fits differ by their gradient noise: about
    # 0.1 nats per point between seeds here. A wrong mixture density is off by far more.
    assert elbos["mixture"] > elbos["gaussian"] - 0.15
    assert elbos["mixture"] < model.log_likelihood(x).mean()


def test_refusals():
    with pytest.raises(InputError, match="components"):
        MixtureGuide(6, 3, components=0)
    model, guide = VAE(6, 3, hidden=(8,)), MixtureGuide(6, 3, hidden=(8,))
    x = (torch.rand(4, 6) > 0.5).float()
    with pytest.raises(InputError, match="'z'"):
        get_objective("elbo-analytic").differentiable_loss(model, guide, x)
    assert math.isfinite(get_objective("elbo-stl").differentiable_loss(model, guide, x).item())
