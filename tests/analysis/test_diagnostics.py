"""Per-point importance diagnostics against cases whose answer is known."""

import math

import numpy as np
import pyro
import pytest

from elbolab.analysis import K_HAT_BAD, K_HAT_GOOD, importance_diagnostics
from elbolab.analysis.diagnostics import _pareto_k
from elbolab.data import ExactPosteriorGuide, load_dataset
from elbolab.inference import importance_estimate


@pytest.fixture(scope="module")
def synthetic():
    data = load_dataset("synthetic-linear-gaussian", "test")
    return data.truth, data.x[:200]


def test_exact_posterior_is_trusted_everywhere(synthetic):
    model, x = synthetic
    pyro.set_rng_seed(0)
    table = importance_diagnostics(model, ExactPosteriorGuide(model), x, num_samples=500)
    assert list(table.columns) == ["log_likelihood", "elbo", "gap", "ess", "pareto_k"] and len(table) == 200
    assert (table.pareto_k < K_HAT_GOOD).mean() >= 0.95
    assert (table.ess / 500 > 0.9).all()
    np.testing.assert_allclose(table.log_likelihood, model.log_likelihood(x).numpy(), atol=1e-3)
    np.testing.assert_allclose(table.gap, 0.0, atol=1e-3)


def test_an_over_confident_guide_is_flagged_on_most_points(synthetic):
    """Scales 0.3 times the posterior's: the guide misses the posterior's tails, k-hat > 0.7."""
    model, x = synthetic
    pyro.set_rng_seed(0)
    table = importance_diagnostics(model, ExactPosteriorGuide(model, scale_factor=0.3), x, num_samples=1000)
    assert (table.pareto_k > K_HAT_BAD).mean() > 0.5
    assert (table.ess / 1000 < 0.2).mean() > 0.5
    assert (table.gap > 0).all() and (table.log_likelihood < model.log_likelihood(x).numpy() + 1e-3).mean() > 0.5


def test_columns_agree_with_the_streaming_estimate(synthetic):
    """The same draws (same seed and chunking) give the same log p(x), ELBO and ESS as importance_estimate."""
    model, x = synthetic
    guide = ExactPosteriorGuide(model, scale_factor=0.8)
    pyro.set_rng_seed(1)
    table = importance_diagnostics(model, guide, x[:50], num_samples=300, batch_size=20)
    pyro.set_rng_seed(1)
    estimate = importance_estimate(model, guide, x[:50], num_samples=300, batch_size=20)
    np.testing.assert_allclose(table.log_likelihood, estimate.log_likelihood.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table.elbo, estimate.elbo.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table.ess, estimate.ess.numpy(), rtol=1e-3)


def test_pareto_k_recovers_the_tail_of_known_weights():
    """w = U^(-xi) has a Pareto tail of shape xi: the fit finds xi for each point (row) separately."""
    rng = np.random.default_rng(0)
    shapes = np.array([0.2, 0.5, 0.8])
    log_w = -shapes[:, None] * np.log(rng.uniform(size=(3, 20000)))
    k_hat = _pareto_k(log_w)
    np.testing.assert_allclose(k_hat, shapes, atol=0.15)  # the fit's weak prior pulls toward 0.5
    assert k_hat[0] < k_hat[1] < k_hat[2]
    assert math.isinf(_pareto_k(np.full((1, 100), -3.0))[0])  # equal weights: bounded, k-hat = -inf
