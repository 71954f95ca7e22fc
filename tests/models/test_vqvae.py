"""The VQ-VAE: its ELBO, its codebook's moving averages, dead-code restarts and codebook usage."""

import math

import pyro
import torch

from elbolab.data import load_dataset
from elbolab.guides import NearestCodeGuide
from elbolab.inference import ELBO, fit, importance_estimate
from elbolab.models import VQVAE, Codebook
from elbolab.models.vqvae import code_usage


def test_elbo_is_the_reconstruction_minus_m_log_k():
    pyro.set_rng_seed(0)
    model = VQVAE(10, codebook_size=8, code_dim=3, num_codes=4, hidden=(16,))
    guide = NearestCodeGuide(model).eval()
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    estimate = importance_estimate(model, guide, x, num_samples=3)
    z = model.codebook.embeddings[guide.codes(x)]
    reconstruction = model.observation(model.decoder(z.flatten(-2))).log_prob(x)
    assert torch.allclose(estimate.elbo, reconstruction - 4 * math.log(8), atol=1e-5)
    assert torch.allclose(estimate.log_likelihood, estimate.elbo, atol=1e-5)  # one-hot q: every weight is equal


def test_straight_through_gradient_and_commitment_reach_the_encoder():
    pyro.set_rng_seed(0)
    model = VQVAE(10, codebook_size=8, code_dim=3, num_codes=2, hidden=(16,), commitment=0.0)
    guide = NearestCodeGuide(model)
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    guide(x)  # the first call starts the codebook at encoder outputs
    ELBO().differentiable_loss(model, guide, x).backward()
    assert guide.encoder[0].weight.grad.abs().sum() > 0  # through the decoder, straight through the quantizer
    assert not any(p is model.codebook.embeddings for p in model.parameters())  # moved by averages, not gradients


def test_one_moving_average_step_matches_its_formula():
    torch.manual_seed(0)
    codebook = Codebook(3, 2, decay=0.9, dead_after=0, epsilon=0.0)
    codebook.initialized.fill_(True)
    before_size, before_sum = codebook.cluster_size.clone(), codebook.embedding_sum.clone()
    z_e = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    codes = torch.tensor([0, 0, 2, 2])
    codebook.update(z_e, codes)
    size = 0.9 * before_size + 0.1 * torch.tensor([2.0, 0.0, 2.0])
    total = 0.9 * before_sum + 0.1 * torch.stack([z_e[:2].sum(0), torch.zeros(2), z_e[2:].sum(0)])
    assert torch.allclose(codebook.cluster_size, size)
    assert torch.allclose(codebook.embeddings, total / size.unsqueeze(1))


def test_a_dead_code_is_restarted_at_an_encoder_output():
    torch.manual_seed(0)
    codebook = Codebook(4, 2, dead_after=1.0)
    codebook.initialized.fill_(True)
    z_e = torch.randn(4, 2)
    codebook.update(z_e, torch.tensor([0, 0, 1, 1]))  # codes 2 and 3 idle for 4 = K assignments: dead
    for code in (2, 3):
        assert any(torch.allclose(codebook.embeddings[code], row) for row in z_e)
    assert torch.equal(codebook.idle, torch.zeros(4))


def test_codebook_usage_stays_above_half_with_restarts_on_digits():
    train = load_dataset("digits", "train", binarize="dynamic")

    def train_codebook(dead_after):
        pyro.set_rng_seed(0)
        model = VQVAE(64, codebook_size=64, code_dim=4, num_codes=4, hidden=(128,)).init_output_bias(train.x)
        model.codebook.dead_after = dead_after
        guide = NearestCodeGuide(model)
        history = fit(model, guide, train, epochs=30, progress=False, device="cpu").history
        guide.eval()
        codes = guide.codes(train.fixed_binarization(0).x)
        return history, code_usage(torch.bincount(codes.flatten(), minlength=64).float())

    history, usage = train_codebook(dead_after=10.0)
    assert (history["codes_used"] > 32).all() and (history["perplexity"] > 32).all()
    assert usage["codes_used"] > 32 and usage["perplexity"] > 32
    _, without_restarts = train_codebook(dead_after=0.0)
    assert without_restarts["perplexity"] < usage["perplexity"] - 10  # restarts are what keeps the codebook in use
