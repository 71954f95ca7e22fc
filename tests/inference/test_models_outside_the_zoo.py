"""Models written fresh, not from the built-in zoo, each against an exact or independent answer.

Conjugate models with exact posteriors as guides (every estimate exact, with zero variance), a
linear-Gaussian model with a global offset (exact whole-data evidence and posterior), Pyro's
subsampling idiom against the plain one, float64 runs, renamed plates and sites, and the
refusals the model contract promises.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab.analysis import importance_diagnostics, posterior_means, to_inference_data
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide, GaussianGuide
from elbolab.inference import fit, get_objective, importance_estimate, log_evidence, log_likelihood
from elbolab.models import Latent, LatentModel

# --- Gamma-Poisson: a positive latent rate per point, counts observed at a renamed site ------------

A, B, D = 2.0, 1.5, 4


def gamma_poisson(x, *, batch_size=None):
    with pyro.plate("batch", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(A, B))
        pyro.sample("counts", dist.Poisson(rate.unsqueeze(-1).expand(*rate.shape, D)).to_event(1), obs=x)


def gamma_poisson_posterior(x, *, batch_size=None):
    with pyro.plate("batch", x.shape[0]):
        pyro.sample("rate", dist.Gamma(A + x.sum(-1), B + D))


def gamma_poisson_evidence(x):
    """log of the negative-binomial-like marginal: b^a / Gamma(a) * Gamma(a + S) / (b + D)^(a + S) / prod x_d!."""
    s = x.sum(-1)
    return (
        A * math.log(B) - math.lgamma(A) + torch.lgamma(A + s) - (A + s) * math.log(B + D)
        - torch.lgamma(x + 1).sum(-1)
    )


@pytest.fixture
def counts():
    pyro.set_rng_seed(0)
    rates = dist.Gamma(A, B).sample((30,))
    return dist.Poisson(rates.unsqueeze(-1).expand(-1, D)).sample()


def test_gamma_poisson_with_its_exact_posterior_gives_the_exact_marginal(counts):
    estimate = importance_estimate(gamma_poisson, gamma_poisson_posterior, counts, num_samples=50)
    torch.testing.assert_close(estimate.log_likelihood, gamma_poisson_evidence(counts), atol=3e-5, rtol=0)
    torch.testing.assert_close(estimate.ess, torch.full((30,), 50.0), atol=1e-3, rtol=0)
    # Every bound is log p(x) at the exact posterior, whatever its gradient estimator.
    for name in ("elbo", "elbo-stl", "iwae", "iwae-stl", "iwae-dreg", "renyi"):
        loss = get_objective(name).loss(gamma_poisson, gamma_poisson_posterior, counts)
        assert loss == pytest.approx(-gamma_poisson_evidence(counts).sum().item(), rel=1e-5), name


def test_counts_outside_the_poisson_support_are_refused_by_row(counts):
    bad = counts.clone()
    bad[7, 1] = 0.5
    with pytest.raises(InputError, match=r"outside the support of site 'counts', non-negative integers, in 1 row \(row 7\)"):
        log_likelihood(gamma_poisson, gamma_poisson_posterior, bad, num_samples=4)


def test_an_auto_guide_follows_a_plate_named_batch_and_learns_the_posterior(counts):
    pyro.set_rng_seed(1)
    guide = AutoAmortizedGuide(gamma_poisson, counts[:4], hidden=(32,))
    assert guide.data_plate == "batch"
    fit(gamma_poisson, guide, counts, epochs=300, batch_size=10, lr=1e-2, progress=False)
    estimate = importance_estimate(gamma_poisson, guide, counts, num_samples=2000)
    # A log-normal q of a Gamma posterior: close, not exact, and the bound below the evidence.
    assert (estimate.log_likelihood - gamma_poisson_evidence(counts)).abs().max() < 0.03
    assert (estimate.elbo <= gamma_poisson_evidence(counts) + 1e-3).all()


# --- Dirichlet-multinomial: a simplex latent per point ------------------------------------------

ALPHA = torch.tensor([0.5, 1.0, 2.0])
TOTAL = 12


def dirichlet_multinomial(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        probs = pyro.sample("probs", dist.Dirichlet(ALPHA))
        pyro.sample("x", dist.Multinomial(TOTAL, probs), obs=x)


def dirichlet_posterior(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("probs", dist.Dirichlet(ALPHA + x))


def test_dirichlet_multinomial_with_its_exact_posterior_gives_the_exact_marginal():
    pyro.set_rng_seed(0)
    x = dist.Multinomial(TOTAL, dist.Dirichlet(ALPHA).sample((25,))).sample()
    exact = dist.DirichletMultinomial(ALPHA, total_count=TOTAL).log_prob(x)
    torch.testing.assert_close(log_likelihood(dirichlet_multinomial, dirichlet_posterior, x, num_samples=20), exact,
                               atol=3e-5, rtol=0)
    table = importance_diagnostics(dirichlet_multinomial, dirichlet_posterior, x, num_samples=200)
    assert (table.pareto_k == -math.inf).all()  # equal weights: q is the posterior


# --- A linear-Gaussian model with a global offset ------------------------------------------------

class OffsetLinearGaussian(nn.Module):
    """x_n = W z_n + b + noise, z_n ~ N(0, I), b ~ N(0, I) shared by every point (a global latent)."""

    def __init__(self, x_dim: int = 3, z_dim: int = 2, noise: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(x_dim, z_dim, generator=generator))
        self.x_dim, self.z_dim, self.noise = x_dim, z_dim, noise

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        b = pyro.sample("b", dist.Normal(torch.zeros(self.x_dim), 1.0).to_event(1))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim), 1.0).to_event(1))
            loc = z @ self.weight.T + b
            return pyro.sample("x", dist.Normal(loc, self.noise).to_event(1), obs=x)

    def marginal_cov(self) -> torch.Tensor:
        return self.weight @ self.weight.T + self.noise**2 * torch.eye(self.x_dim)

    def exact_evidence(self, x: torch.Tensor) -> float:
        """log p(X), all N * D values jointly Gaussian: cov = I_N (x) C + 1 1^T (x) I_D."""
        n = x.shape[0]
        cov = torch.kron(torch.eye(n), self.marginal_cov()) + torch.kron(torch.ones(n, n), torch.eye(self.x_dim))
        return dist.MultivariateNormal(torch.zeros(n * self.x_dim), cov.double()).log_prob(x.reshape(-1).double()).item()

    def offset_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(b | X) = N(m, S), S = (I + N C^-1)^-1, m = S C^-1 sum_n x_n."""
        precision_c = torch.linalg.inv(self.marginal_cov())
        cov = torch.linalg.inv(torch.eye(self.x_dim) + x.shape[0] * precision_c)
        return cov @ precision_c @ x.sum(0), cov

    def code_posterior(self, x: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_n | x_n, b): precision I + W^T W / s^2, mean its inverse times W^T (x_n - b) / s^2."""
        cov = torch.linalg.inv(torch.eye(self.z_dim) + self.weight.T @ self.weight / self.noise**2)
        return (x - b) @ self.weight @ cov / self.noise**2, cov


def exact_offset_guide(model: OffsetLinearGaussian, data: torch.Tensor):
    """The exact joint posterior p(b | X) p(z_n | x_n, b) as a plain Pyro function (two dependent sites)."""
    mean_b, cov_b = model.offset_posterior(data)

    def guide(x, *, batch_size=None):
        shift = pyro.param("shift", torch.zeros(model.x_dim))  # zero: the guide stays exact
        b = pyro.sample("b", dist.MultivariateNormal(mean_b + shift, cov_b))
        mean_z, cov_z = model.code_posterior(x, b)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean_z, cov_z))

    return guide


@pytest.fixture
def offset_data():
    pyro.clear_param_store()
    model = OffsetLinearGaussian()
    pyro.set_rng_seed(0)
    with torch.no_grad():
        x = model(batch_size=40)
    return model, x


def test_log_evidence_of_a_global_latent_model_is_the_exact_joint_evidence(offset_data):
    model, x = offset_data
    evidence = log_evidence(model, exact_offset_guide(model, x), x, num_samples=4, global_samples=8)
    exact = model.exact_evidence(x)
    assert abs(evidence.log_evidence - exact) / x.shape[0] < 0.02
    assert evidence.standard_error < 1e-3  # exact posteriors: every weight is p(X)


def test_per_point_estimates_of_a_global_latent_model_are_posterior_predictive(offset_data):
    """Each point's weight leaves out log p(b) - log q(b): its estimate is log E_q(b)[p(x_n | b)]."""
    model, x = offset_data
    mean_b, cov_b = model.offset_posterior(x)
    predictive = dist.MultivariateNormal(mean_b, model.marginal_cov() + cov_b).log_prob(x)
    estimate = importance_estimate(model, exact_offset_guide(model, x), x, num_samples=4000)
    assert estimate.global_latents == ("b",)
    torch.testing.assert_close(estimate.log_likelihood, predictive, atol=0.02, rtol=0)


@pytest.mark.slow  # two minutes on 2 cores: `make test-slow`
def test_training_counts_a_global_kl_once_per_pass_over_the_data():
    """A trained auto guide's q(b) has the exact posterior's scale: the minibatch loss estimates the whole data's."""
    model = OffsetLinearGaussian(noise=1.0, seed=3)
    model.weight *= 0.3  # a weak loading: the exact posterior of b is then close to the best factorized one
    pyro.set_rng_seed(0)
    with torch.no_grad():
        x = model(batch_size=200)
    pyro.set_rng_seed(0)
    guide = AutoAmortizedGuide(model, x[:8], hidden=(32,))
    result = fit(model, guide, x, epochs=80, batch_size=20, lr=5e-3, particles=4, progress=False)
    with torch.no_grad():
        draws = torch.stack([pyro.poutine.trace(guide).get_trace(x[:2]).nodes["b"]["value"] for _ in range(4000)])
    _, exact_cov = model.offset_posterior(x)
    # q(b) q(z | x) factorizes, so its best q(b) has the joint posterior's precision for b,
    # 1 + N / noise^2, a little narrower than the marginal p(b | X). Counting the KL of b once per
    # batch instead would give 1 + B / noise^2: three times wider here.
    factorized = torch.full((model.x_dim,), (1 + x.shape[0] / model.noise**2) ** -0.5)
    for reference in (exact_cov.diagonal().sqrt(), factorized):
        ratio = draws.std(0) / reference
        assert ((ratio > 0.8) & (ratio < 1.2)).all(), ratio
    # The history is in nats per data point of the whole-data objective: near -log p(X) / N.
    assert result.history.train_loss.iloc[-5:].mean() == pytest.approx(-model.exact_evidence(x) / 200, abs=0.1)


def test_stl_and_a_plain_function_guide_of_dependent_sites_detach_pyro_params(offset_data):
    """At the exact posterior the pathwise gradient of log w is zero; the score term, if kept, is not."""
    model, x = offset_data
    guide = exact_offset_guide(model, x)
    exact = model.exact_evidence(x)
    pyro.clear_param_store()
    loss = get_objective("elbo-stl", num_particles=3).differentiable_loss(model, guide, x)
    assert loss.item() == pytest.approx(-exact, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, pyro.param("shift").unconstrained())
    assert grad.abs().max() < 1e-3
    pyro.clear_param_store()
    loss = get_objective("elbo", num_particles=3).differentiable_loss(model, guide, x)
    (grad,) = torch.autograd.grad(loss, pyro.param("shift").unconstrained())
    assert grad.abs().max() > 1e-2  # the standard estimator's score term
    # Each particle would carry its own draw of b: a per-point logsumexp over them is no bound.
    for name in ("iwae", "iwae-stl", "iwae-dreg", "renyi"):
        with pytest.raises(InputError, match="global latent 'b'.*would not be a bound"):
            get_objective(name).differentiable_loss(model, guide, x)


def test_dreg_and_stl_with_a_multivariate_normal_guide_without_parameters():
    """A linear-Gaussian model's exact posterior, a plain-function MultivariateNormal: every bound is log p(x)."""
    model = OffsetLinearGaussian()
    b = torch.zeros(model.x_dim)

    def local_model(x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(model.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ model.weight.T, model.noise).to_event(1), obs=x)

    def posterior(x, *, batch_size=None):
        mean, cov = model.code_posterior(x, b)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, cov))

    x = dist.MultivariateNormal(torch.zeros(model.x_dim), model.marginal_cov()).sample((20,))
    exact = dist.MultivariateNormal(torch.zeros(model.x_dim), model.marginal_cov()).log_prob(x).sum().item()
    for name in ("elbo-stl", "iwae-stl", "iwae-dreg"):
        losses = [get_objective(name).loss(local_model, posterior, x) for _ in range(3)]
        assert losses == pytest.approx([-exact] * 3, rel=1e-5), name


# --- Subsampling: Pyro's idiom against the plain one ---------------------------------------------

def offset_model(subsample: bool, num_points: int):
    def model(x, *, batch_size=None):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        plate = pyro.plate("data", num_points, subsample_size=len(x)) if subsample else pyro.plate("data", len(x))
        with plate:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + b, 0.5), obs=x[:, 0])

    return model


def test_the_subsampled_idiom_trains_and_evaluates_as_the_plain_one():
    pyro.set_rng_seed(0)
    x = (torch.randn(53, 1) + 1.0)
    results = {}
    for subsample in (False, True):
        model = offset_model(subsample, 53)
        pyro.set_rng_seed(0)
        guide = AutoAmortizedGuide(model, x[:4], hidden=(16,))
        history = fit(model, guide, x, epochs=3, batch_size=10, progress=False).history  # a short last batch of 3
        estimate = importance_estimate(model, guide, x, num_samples=64)
        results[subsample] = (history.train_loss.to_numpy(), estimate.log_likelihood)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1])
    with pytest.raises(InputError, match="states 50 data points.*training data have 53"):
        fit(offset_model(True, 50), AutoAmortizedGuide(offset_model(True, 50), x[:4]), x, epochs=1, progress=False)


def test_a_model_that_subsamples_its_input_is_refused_by_fit_and_the_estimators():
    def model(x, *, batch_size=None):
        with pyro.plate("data", len(x), subsample_size=5) as index:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[index, 0])

    def guide(x, *, batch_size=None):
        with pyro.plate("data", len(x), subsample_size=5):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.randn(20, 1)
    get_objective("iwae").differentiable_loss(model, guide, x)  # Pyro's own idiom: fine for an objective
    with pytest.raises(InputError, match="subsamples the data it is given"):
        fit(model, guide, x, epochs=1, progress=False)
    with pytest.raises(InputError, match="subsamples the data it is given"):
        log_likelihood(model, guide, x, num_samples=2)


# --- float64 --------------------------------------------------------------------------------------

def test_float64_models_run_through_every_entry_point():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(0)
        x = torch.bernoulli(torch.full((40, 6), 0.3))
        model = LatentModel(6, [Latent("code", 2), Latent("gain", prior=dist.LogNormal, params=(0.0, 0.5))],
                            decoder=(16,))
        guide = AutoAmortizedGuide(model, x[:4], hidden=(16,))
        fit(model, guide, x.float(), epochs=2, batch_size=16, progress=False)  # float32 data follow the model
        for estimate in (log_likelihood(model, guide, x, num_samples=8), importance_diagnostics(model, guide, x, num_samples=8)):
            assert np.isfinite(np.asarray(estimate["log_likelihood"] if hasattr(estimate, "columns") else estimate)).all()
        assert posterior_means(guide, x)["code"].dtype == torch.float64
        idata = to_inference_data(model, guide, x[:5], num_samples=3)
        assert idata.posterior["code"].dtype == np.float64
    finally:
        torch.set_default_dtype(previous)


# --- Refusals -------------------------------------------------------------------------------------

def test_a_guide_that_samples_another_site_than_the_model_is_refused_by_name():
    model = LatentModel(6, [Latent("code", 2)], decoder=(8,))
    x = torch.bernoulli(torch.full((10, 6), 0.5))
    guide = GaussianGuide(6, 2, hidden=(8,))  # samples "z"
    message = r"the model's latent site 'code' is not sampled by the guide \(the guide samples 'z'\)"
    for entry in (
        lambda: fit(model, guide, x, epochs=1, progress=False),
        lambda: log_likelihood(model, guide, x, num_samples=2),
        lambda: importance_diagnostics(model, guide, x, num_samples=2),
        lambda: to_inference_data(model, guide, x, num_samples=2),
        lambda: get_objective("iwae").differentiable_loss(model, guide, x),
    ):
        with pytest.raises(InputError, match=message):
            entry()


def test_bad_inputs_to_the_estimators_are_named():
    model = LatentModel(6, [Latent("z", 2)], decoder=(8,))
    guide = GaussianGuide(6, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((10, 6), 0.5))
    torch.testing.assert_close(
        log_likelihood(model, guide, x.numpy(), num_samples=2).shape, torch.Size([10])
    )  # a numpy array is converted
    with pytest.raises(InputError, match="the guide fails on input of shape"):
        log_likelihood(model, guide, torch.zeros(4, 5), num_samples=2)
    nan_rows = x.clone()
    nan_rows[[2, 8]] = math.nan
    with pytest.raises(InputError, match=r"NaN or infinite values in 2 rows \(rows 2, 8\)"):
        importance_diagnostics(model, guide, nan_rows, num_samples=2)
    with pytest.raises(InputError, match=r"binary values \{0, 1\}, in 1 row \(row 0\)"):
        log_likelihood(model, guide, torch.cat([torch.full((1, 6), 0.5), x]), num_samples=2)
    with pytest.raises(InputError, match="x_example"):
        AutoAmortizedGuide(model, torch.zeros(3))
    with pytest.raises(InputError, match="unknown likelihood 'bernouli'"):
        LatentModel(6, [Latent("z", 2)], likelihood="bernouli", obs_scale=0.1)


def test_a_fit_that_skipped_steps_says_so(capsys):
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.inner = LatentModel(6, [Latent("z", 2)], decoder=(8,))

        def forward(self, x, *, batch_size=None):
            self.calls += torch.is_grad_enabled()
            return self.inner(x * math.nan if self.calls in (3, 5) else x)

    x = torch.bernoulli(torch.full((40, 6), 0.5))
    result = fit(Exploding(), GaussianGuide(6, 2, hidden=(8,)), x, epochs=2, batch_size=10, progress=None)
    assert result.skipped_steps == 2
    assert "fit: skipped 2 of 8 steps whose loss or gradient was not finite" in capsys.readouterr().err
