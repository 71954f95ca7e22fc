"""Importance-sampled log p(x) against the exact evidence of linear-Gaussian models."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.data import ExactPosteriorGuide, load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import evaluate, fit, importance_estimate, log_likelihood


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic-linear-gaussian", "test")


def test_exact_posterior_guide_recovers_exact_evidence(synthetic):
    model, x = synthetic.truth, synthetic.x
    estimate = importance_estimate(model, ExactPosteriorGuide(model), x, num_samples=64)
    exact = model.log_likelihood(x)
    assert (estimate.log_likelihood - exact).abs().max() < 0.01
    # Every weight is p(x): the ELBO is tight and the effective sample size is K.
    assert (estimate.elbo - exact).abs().max() < 0.01
    assert torch.allclose(estimate.ess, torch.full_like(estimate.ess, 64.0), rtol=1e-3)


def test_trained_gaussian_guide_is_within_a_tenth_of_a_nat(synthetic):
    model = synthetic.truth
    train = load_dataset("synthetic-linear-gaussian", "train")
    guide = GaussianGuide(16, 4, hidden=(64,))
    fit(model, guide, train, epochs=60, batch_size=100, lr=3e-3, progress=False)
    x = synthetic.x[:300]
    estimate = importance_estimate(model, guide, x, num_samples=5000)
    exact = model.log_likelihood(x)
    gap = (estimate.log_likelihood - exact).mean().abs().item()
    assert gap < 0.1
    # A diagonal guide cannot match the correlated posterior: its ELBO is strictly looser.
    assert (exact - estimate.elbo).mean() > 0.02
    # ... and the K-sample bound sits between the ELBO and log p(x).
    assert estimate.elbo.mean() < estimate.log_likelihood.mean() < exact.mean() + 0.02


def test_estimate_does_not_depend_on_chunking(synthetic, monkeypatch):
    model, x = synthetic.truth, synthetic.x[:50]
    guide = ExactPosteriorGuide(model, scale_factor=0.8)
    torch.manual_seed(0)
    whole = log_likelihood(model, guide, x, num_samples=4000)
    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", 16 * 7 * 10)  # 7 points, 10 samples a chunk
    torch.manual_seed(1)
    chunked = log_likelihood(model, guide, x, num_samples=4000, batch_size=7)
    exact = model.log_likelihood(x)
    assert chunked.shape == (50,)
    assert (whole - exact).abs().mean() < 0.02
    assert (chunked - exact).abs().mean() < 0.02


def test_iwae_bound_tightens_with_more_samples(synthetic):
    model, x = synthetic.truth, synthetic.x[:200]
    guide = ExactPosteriorGuide(model, scale_factor=0.6)
    exact = model.log_likelihood(x).mean()
    bounds = [log_likelihood(model, guide, x, num_samples=k).mean() for k in (1, 10, 1000)]
    assert bounds[0] < bounds[1] < bounds[2] < exact + 0.01


def test_plain_pyro_functions_with_a_global_latent():
    """Per point, a global latent's terms enter once: with q(mu) = p(mu), log p(x_n) = log N(x_n; 0, 2)."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    x = torch.linspace(-2, 2, 9)
    estimate = log_likelihood(model, guide, x, num_samples=20000)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x)
    assert torch.allclose(estimate, exact, atol=0.02)


def test_model_without_data_plate_is_refused():
    def model(x):
        pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(2), obs=x)

    with pytest.raises(InputError, match="found no plate over the batch of 3 data points around the observed site"):
        log_likelihood(model, lambda x: None, torch.zeros(3, 2), num_samples=2)


def test_bad_num_samples_is_an_input_error(synthetic):
    with pytest.raises(InputError, match="num_samples"):
        log_likelihood(synthetic.truth, ExactPosteriorGuide(synthetic.truth), synthetic.x, num_samples=0)


def test_gpu_chunks_are_sized_from_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    assert evaluate.chunk_elements(torch.device("cuda")) == int(0.25 * 80 * 2**30 / 16)
    # Little free memory never shrinks chunks below the CPU's size; the CPU keeps its fixed size.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert evaluate.chunk_elements(torch.device("cuda")) == evaluate.CHUNK_ELEMENTS
    assert evaluate.chunk_elements(torch.device("cpu")) == evaluate.CHUNK_ELEMENTS


def test_a_chunk_that_runs_out_of_memory_is_halved_and_the_estimate_kept(synthetic, monkeypatch):
    model, x = synthetic.truth, synthetic.x[:20]
    guide = ExactPosteriorGuide(model)
    sizes = []
    run_traced = evaluate.run_traced

    def small_device(model, guide, args, kwargs, k, nesting, **options):
        sizes.append(k)
        if k > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_traced(model, guide, args, kwargs, k, nesting, **options)

    monkeypatch.setattr(evaluate, "run_traced", small_device)
    estimate = importance_estimate(model, guide, x, num_samples=1000)
    assert sizes[:4] == [1000, 500, 250, 125] and max(sizes[4:]) <= 100 and sum(s for s in sizes if s <= 100) == 1000
    assert (estimate.log_likelihood - model.log_likelihood(x)).abs().max() < 0.01
    assert torch.allclose(estimate.ess, torch.full_like(estimate.ess, 1000.0), rtol=1e-3)

    def out_of_memory_always(*args, **options):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(evaluate, "run_traced", out_of_memory_always)
    with pytest.raises(torch.OutOfMemoryError):
        importance_estimate(model, guide, x, num_samples=8)
