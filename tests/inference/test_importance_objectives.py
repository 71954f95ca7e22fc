"""IWAE, Renyi, STL and DReG objectives against exact answers on linear-Gaussian models."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab.data import ExactPosteriorGuide, LinearGaussian, load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import fit, get_objective

ALL = [("elbo", {}), ("elbo-analytic", {}), ("elbo-stl", {}), ("iwae", {}), ("iwae-stl", {}),
       ("iwae-dreg", {}), ("renyi", {"alpha": 0.5}), ("renyi", {"alpha": -2.0}), ("renyi", {"alpha": -math.inf})]


@pytest.fixture(scope="module")
def synthetic():
    data = load_dataset("synthetic-linear-gaussian", "test")
    return data.truth, data.x[:40]


class LinearGaussianPosterior(nn.Module):
    """q(z | x) = N(A (x - b) , L L^T) with learnable A and L, initialised at the exact posterior."""

    def __init__(self, model: LinearGaussian):
        super().__init__()
        precision = torch.eye(model.z_dim) + model.weight.T @ model.weight / model.noise_scale**2
        cov = torch.linalg.inv(precision)
        self.bias = model.bias
        self.gain = nn.Parameter((model.weight @ cov / model.noise_scale**2).T.clone())
        self.scale_tril = nn.Parameter(torch.linalg.cholesky(cov).clone())

    def forward(self, x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal((x - self.bias) @ self.gain.T, scale_tril=self.scale_tril))


@pytest.mark.parametrize("name, options", ALL)
def test_exact_posterior_gives_log_evidence_with_zero_variance(synthetic, name, options):
    model, x = synthetic
    if name == "elbo-analytic":
        pytest.skip("no closed-form KL between a MultivariateNormal guide and a diagonal prior")
    objective = get_objective(name, num_particles=7, **options)
    with torch.no_grad():
        losses = torch.stack([objective.differentiable_loss(model, ExactPosteriorGuide(model), x) for _ in range(3)])
    assert torch.allclose(losses, -model.log_likelihood(x).sum().expand(3), rtol=1e-5)


@pytest.mark.parametrize("name", ["elbo-stl", "iwae-stl", "iwae-dreg"])
def test_stl_and_dreg_gradients_vanish_at_the_exact_posterior(synthetic, name):
    """With q = p(z|x), log p(x, z) - log q(z|x) is constant in z: these estimators have zero variance."""
    model, x = synthetic
    # float64, so that "zero" is not blurred by float32 rounding of large log densities.
    model = LinearGaussian(model.weight, model.bias, model.noise_scale).double()
    x = x.double()
    guide = LinearGaussianPosterior(model).double()
    loss = get_objective(name, num_particles=5).differentiable_loss(model, guide, x)
    grads = torch.autograd.grad(loss, list(guide.parameters()))
    assert max(g.abs().max() for g in grads) < 1e-8
    # ...whereas the standard estimator's gradient is noise around zero, not zero.
    loss = get_objective(name.replace("-stl", "").replace("-dreg", ""), num_particles=5).differentiable_loss(model, guide, x)
    assert max(g.abs().max() for g in torch.autograd.grad(loss, list(guide.parameters()))) > 0.1


def test_iwae_rises_with_k_and_stays_below_the_evidence(synthetic):
    model, x = synthetic
    guide = ExactPosteriorGuide(model, scale_factor=0.6)
    exact = model.log_likelihood(x).sum()
    with torch.no_grad():
        bounds = {k: -torch.stack([get_objective("iwae", num_particles=k).differentiable_loss(model, guide, x)
                                   for _ in range(20)]).mean() for k in (1, 5, 50)}
    assert bounds[1] < bounds[5] < bounds[50] < exact


def test_renyi_decreases_with_alpha_on_the_same_samples(synthetic):
    model, x = synthetic
    guide = ExactPosteriorGuide(model, scale_factor=0.6)
    values = []
    for alpha in (-math.inf, -3.0, -0.5, 0.0, 0.5, 2.0, 5.0):
        torch.manual_seed(0)
        with torch.no_grad():
            values.append(-get_objective("renyi", alpha=alpha, num_particles=10).differentiable_loss(model, guide, x).item())
    assert values == sorted(values, reverse=True)
    torch.manual_seed(0)
    iwae = -get_objective("iwae", num_particles=10).differentiable_loss(model, guide, x).item()
    assert iwae == pytest.approx(values[3], rel=1e-6)


@pytest.mark.parametrize("name", ["iwae", "renyi", "iwae-dreg"])
def test_subsampled_plate_is_scaled_outside_the_logsumexp(synthetic, name):
    model, x = synthetic
    subset = torch.tensor([3, 7, 11, 20])

    def subsampled_model(x):
        with pyro.plate("data", x.shape[0], subsample=subset) as index:
            z = pyro.sample("z", dist.Normal(torch.zeros(model.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ model.weight.T + model.bias, model.noise_scale).to_event(1), obs=x[index])

    class SubsampledGuide(nn.Module):
        def forward(self, x):
            mean, cov = model.posterior(x[subset])
            with pyro.plate("data", x.shape[0], subsample=subset):
                pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov) * 0.7))

    class SubsetGuide(nn.Module):
        def forward(self, x):
            mean, cov = model.posterior(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov) * 0.7))

    objective = get_objective(name, num_particles=6, max_plate_nesting=1)  # no RNG spent finding it
    torch.manual_seed(0)
    subsampled = objective.differentiable_loss(subsampled_model, SubsampledGuide(), x)
    torch.manual_seed(0)
    full = objective.differentiable_loss(model, SubsetGuide(), x[subset])
    assert subsampled.item() == pytest.approx(full.item() * x.shape[0] / len(subset), rel=1e-5)


def test_global_latents_are_refused_by_importance_weighted_bounds():
    """Each particle draws its own global: a per-point logsumexp over them rises above log p(X)."""
    x = torch.linspace(-2, 2, 6)

    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + shift, 1.0), obs=x)

    class Guide(nn.Module):
        def forward(self, x):
            pyro.sample("shift", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    for name in ("iwae", "iwae-stl", "iwae-dreg", "renyi"):
        with pytest.raises(InputError, match="global latent 'shift'.*would not be a bound on log p\\(X\\)"):
            get_objective(name, num_particles=4).differentiable_loss(model, Guide(), x)
    # The ELBO counts the global once: with q(shift) = p(shift) it is an ELBO of the whole data.
    loss = get_objective("elbo", num_particles=4).differentiable_loss(model, Guide(), x)
    assert torch.isfinite(loss)


def test_dreg_gives_the_model_the_iwae_gradient_and_the_guide_a_better_one():
    pyro.set_rng_seed(0)
    data = load_dataset("digits", "train", binarize="threshold").x[:16]
    from elbolab.models import VAE

    model, guide = VAE(64, 4, hidden=(16,)), GaussianGuide(64, 4, hidden=(16,))
    fit(model, guide, data, epochs=30, batch_size=16, progress=False)

    def grads(name, seed):
        torch.manual_seed(seed)
        loss = get_objective(name, num_particles=64).differentiable_loss(model, guide, data)
        return torch.autograd.grad(loss, [*model.parameters(), *guide.parameters()])

    n_model = len(list(model.parameters()))
    iwae, dreg = grads("iwae", 1), grads("iwae-dreg", 1)
    # Same samples: the model's gradient is the same estimator, sum_k wbar_k grad log w_k.
    for a, b in zip(iwae[:n_model], dreg[:n_model], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)

    def guide_snr(name):
        draws = torch.stack([torch.cat([g.flatten() for g in grads(name, s)[n_model:]]) for s in range(60)])
        return (draws.mean(0).abs() / draws.std(0).clamp_min(1e-12)).median()

    # Tucker et al.'s central claim: at large K, DReG's guide gradient has a higher signal-to-noise ratio.
    assert guide_snr("iwae-dreg") > 2 * guide_snr("iwae")


def test_refusals():
    with pytest.raises(InputError, match="alpha = 1"):
        get_objective("renyi", alpha=1.0)
    with pytest.raises(InputError, match="num_particles"):
        get_objective("iwae", num_particles=0)
    with pytest.raises(InputError, match="analytic KL"):
        get_objective("elbo", analytic_kl=True, stick_the_landing=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    class DiscreteGuide(nn.Module):
        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Bernoulli(0.5))

    with pytest.raises(InputError, match="the guide's site 'z' has no reparameterized sampler"):
        get_objective("iwae-dreg").differentiable_loss(model, DiscreteGuide(), torch.zeros(3))
    data = load_dataset("digits", "train", binarize="dynamic")
    from elbolab.models import VAE

    with pytest.raises(InputError, match="beta"):
        fit(VAE(64, 2), GaussianGuide(64, 2), data, objective="iwae", epochs=1, beta=0.5, progress=False)


def test_detached_normal_sites_match_a_rerun_of_the_guide(synthetic, monkeypatch):
    """The fast path of detached_guide_trace (Normal sites detached in place) equals re-running the guide."""
    from pyro import poutine

    from elbolab.inference import traces

    model, x = synthetic
    pyro.set_rng_seed(0)
    guide = GaussianGuide(x.shape[1], model.z_dim, hidden=(8,))
    guide_trace = poutine.trace(guide).get_trace(x)
    fast = traces.detached_guide_trace(guide, guide_trace, (x,), {})
    monkeypatch.setattr(traces, "_detached_distribution", lambda fn: None)
    rerun = traces.detached_guide_trace(guide, guide_trace, (x,), {})
    fast_log_q, rerun_log_q = (traces.site_log_prob(t.nodes["z"]) for t in (fast, rerun))
    torch.testing.assert_close(fast_log_q, rerun_log_q)
    params = list(guide.parameters())
    fast_grads = torch.autograd.grad(fast_log_q.sum(), params, retain_graph=True)
    rerun_grads = torch.autograd.grad(rerun_log_q.sum(), params)
    for fast_grad, rerun_grad in zip(fast_grads, rerun_grads, strict=True):
        torch.testing.assert_close(fast_grad, rerun_grad)
    # Only the path through z remains: d log q / d z = -(z - loc) / scale^2, pushed through z = loc + scale eps.
    assert any(g.abs().sum() > 0 for g in fast_grads)
