"""Declarative LatentModel: the contract, priors, dependent latents, and the ten-line example."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.models import Latent, LatentModel


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="threshold")


def test_code_and_brightness_in_ten_lines_trains_with_an_auto_guide(digits):
    pyro.set_rng_seed(0)
    model = LatentModel(
        x_dim=64,
        latents=[Latent("code", 16), Latent("brightness", prior=dist.LogNormal, params=(0.0, 0.3))],
        decoder=(128,),
        likelihood="bernoulli",
    )
    guide = AutoAmortizedGuide(model, digits.x[:10], hidden=(128,))
    before = get_objective("elbo", num_particles=10).loss(model, guide, digits.x)
    fit(model, guide, digits, epochs=30, batch_size=100, lr=3e-3, progress=False)
    after = get_objective("elbo", num_particles=10).loss(model, guide, digits.x)
    assert after < before - 10 * digits.num_points
    assert torch.isfinite(log_likelihood(model, guide, digits.x[:30], num_samples=100)).all()
    assert model.generate(5).shape == (5, 64) and model.reconstruct(digits.x[:4], guide).shape == (4, 64)


def test_contract_and_the_prior_densities():
    model = LatentModel(10, [Latent("code", (2, 3)), Latent("scale", prior=dist.Gamma, params=(2.0, 3.0))], decoder=(8,))
    x = (torch.rand(5, 10) > 0.5).float()
    trace = poutine.trace(model).get_trace(x)
    for name in ("code", "scale", "x"):
        assert [f.name for f in trace.nodes[name]["cond_indep_stack"]] == ["data"]
    code, scale = trace.nodes["code"]["value"], trace.nodes["scale"]["value"]
    assert code.shape == (5, 2, 3) and scale.shape == (5,) and (scale > 0).all()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["code"]["log_prob"], torch.distributions.Normal(0.0, 1.0).log_prob(code).sum((-1, -2)))
    torch.testing.assert_close(trace.nodes["scale"]["log_prob"], torch.distributions.Gamma(2.0, 3.0).log_prob(scale))
    assert model(None, batch_size=7).shape == (7, 10)


def test_a_latent_given_another_gets_a_conditional_prior():
    model = LatentModel(10, [Latent("top", 2), Latent("bottom", 3, prior=dist.LogNormal, given="top")], decoder=(8,))
    x = (torch.rand(4, 10) > 0.5).float()
    trace = poutine.trace(model).get_trace(x)
    top, bottom = trace.nodes["top"]["value"], trace.nodes["bottom"]["value"]
    assert bottom.shape == (4, 3) and (bottom > 0).all()
    prior = trace.nodes["bottom"]["fn"]
    raw = model.conditionals["bottom"](top)
    torch.testing.assert_close(prior.base_dist.loc, raw[:, :3])
    torch.testing.assert_close(prior.base_dist.scale, raw[:, 3:].exp())
    grads = torch.autograd.grad(prior.log_prob(bottom).sum(), list(model.conditionals.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_refusals():
    with pytest.raises(InputError, match="'z' is given 'w'"):
        LatentModel(4, [Latent("z", 2, given="w")])
    with pytest.raises(InputError, match="'z' is reserved or used twice"):
        LatentModel(4, [Latent("z", 2), Latent("z", 3)])
    with pytest.raises(InputError, match="'x' is reserved"):
        LatentModel(4, [Latent("x", 2)])
    with pytest.raises(InputError, match="distribution class"):
        LatentModel(4, [Latent("z", 2, prior=dist.Normal(0.0, 1.0))])
