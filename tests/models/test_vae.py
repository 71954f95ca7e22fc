"""The VAE and autoencoder follow the model contract; their likelihoods are the right densities."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from elbolab.errors import InputError
from elbolab.families import checked_model_config
from elbolab.guides import GaussianGuide
from elbolab.inference import ELBO
from elbolab.models import LIKELIHOODS, VAE, Autoencoder, ModelConfig


def data_for(likelihood, n=6, d=10):
    x = torch.rand(n, d)
    return (x > 0.5).float() if likelihood == "bernoulli" else x


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_contract_sites_plate_and_generation(likelihood):
    model, guide = VAE(10, 3, hidden=(8,), likelihood=likelihood), GaussianGuide(10, 3, hidden=(8,))
    x = data_for(likelihood)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    for name in ("z", "x"):
        site = model_trace.nodes[name]
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert model_trace.nodes["x"]["is_observed"] and not model_trace.nodes["z"]["is_observed"]
    assert torch.equal(model_trace.nodes["z"]["value"], guide_trace.nodes["z"]["value"])
    assert model.generate(5).shape == (5, 10)
    assert model.generate(5, mean=False).shape == (5, 10)
    assert model.reconstruct(x, guide).shape == (6, 10)


def test_likelihoods_are_the_stated_densities():
    logits = torch.randn(4, 3)
    x_binary = (torch.rand(4, 3) > 0.5).float()
    bern = VAE(3, 2, likelihood="bernoulli").observation(logits).log_prob(x_binary)
    expected = (x_binary * torch.nn.functional.logsigmoid(logits) + (1 - x_binary) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    assert torch.allclose(bern, expected, atol=1e-5)

    x = torch.rand(4, 3)
    gauss = VAE(3, 2, likelihood="gaussian", obs_scale=0.5).observation(logits).log_prob(x)
    expected = (-0.5 * ((x - logits) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(gauss, expected, atol=1e-5)

    # The continuous Bernoulli integrates to one on [0, 1] (Loaiza-Ganem & Cunningham 2019).
    grid = torch.linspace(0, 1, 20001).unsqueeze(-1)
    density = VAE(1, 2, likelihood="continuous-bernoulli").observation(torch.full((20001, 1), 1.7)).log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-4)


def test_learned_gaussian_scale_is_a_parameter_that_receives_gradient():
    model, guide = VAE(10, 3, hidden=(8,), likelihood="gaussian"), GaussianGuide(10, 3, hidden=(8,))
    ELBO().differentiable_loss(model, guide, torch.rand(6, 10)).backward()
    assert model.observation.raw_scale.grad is not None and model.observation.raw_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradients_reach_every_parameter(likelihood):
    model, guide = VAE(10, 3, hidden=(8, 8), likelihood=likelihood), GaussianGuide(10, 3, hidden=(8, 8))
    ELBO(num_particles=3).differentiable_loss(model, guide, data_for(likelihood)).backward()
    for name, param in [*model.named_parameters(), *guide.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_autoencoder_has_no_latents_and_cannot_generate():
    model = Autoencoder(10, 3, hidden=(8,))
    x = data_for("bernoulli")
    trace = poutine.trace(model).get_trace(x)
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    assert latent == []
    assert model.reconstruct(x).shape == (6, 10)
    with pytest.raises(InputError, match="cannot generate"):
        model.generate(3)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"z_dim": 0}, "z_dim"), ({"hidden": ()}, "hidden"), ({"likelihood": "poisson"}, "likelihood"),
     ({"activation": "sigmoidd"}, "activation"), ({"obs_scale": -1.0}, "obs_scale"), ({"name": "vqvaee"}, "model"), ({"name": "hvae", "z_dims": (8,)}, "two or more"), ({"z_dims": (4, 2)}, "hvae"),
     ({"name": "vqvae", "codebook_size": 1}, "at least 2"), ({"name": "hvae", "z_dim": 5}, "not an option of the hvae"),
     ({"codebook_size": 16}, "options of the vqvae")],
)
def test_model_config_is_validated(kwargs, message):
    """Fields by the config itself, names and family options by the registry."""
    with pytest.raises(InputError, match=message):
        checked_model_config(ModelConfig(**kwargs))


def test_generation_follows_the_prior():
    """With a decoder that ignores z, generated means equal sigmoid(bias) exactly."""
    pyro.set_rng_seed(0)
    model = VAE(4, 2, hidden=(3,))
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
    assert torch.allclose(model.generate(7), torch.sigmoid(model.decoder[-1].bias).expand(7, 4))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_output_bias_init_starts_the_decoder_at_the_data_mean(likelihood):
    x = data_for(likelihood, n=50)
    model = VAE(10, 3, hidden=(8,), likelihood=likelihood, obs_scale=0.3 if likelihood == "gaussian" else None)
    model.init_output_bias(x)
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
    mean = model.generate(4)
    if likelihood == "continuous-bernoulli":  # logit of the mean, as for the Bernoulli: mean of CB differs
        expected = VAE(10, 3, likelihood=likelihood).observation(torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3))).mean
        assert torch.allclose(mean, expected.expand(4, 10), atol=1e-5)
    else:
        assert torch.allclose(mean, x.mean(0).clamp(1e-3, 1 - 1e-3).expand(4, 10), atol=1e-5)
