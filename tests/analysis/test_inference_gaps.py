"""Approximation and amortization gaps against closed forms: the linear-Gaussian model, a Gamma-scale model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import GaussianGuide, fit
from elbolab.analysis.gaps import inference_gaps, plot_inference_gaps
from elbolab.data import ExactPosteriorGuide, LinearGaussian
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide, FlowGuide
from elbolab.guides.per_point import PerPointGaussian, PerPointGuide


@pytest.fixture(scope="module")
def linear_gaussian():
    pyro.set_rng_seed(0)
    model = LinearGaussian.random(x_dim=16, z_dim=4, noise_scale=0.5, seed=0)
    x = model.sample(1000, torch.Generator().manual_seed(1))
    guide = GaussianGuide(16, 4, hidden=(32,))
    fit(model, guide, x, epochs=10, seed=0, progress=False)
    return model, guide, x[:40]


@pytest.fixture(scope="module")
def gaps(linear_gaussian):
    model, guide, x = linear_gaussian
    pyro.set_rng_seed(1)
    return inference_gaps(model, guide, x, steps=300, num_samples=1000)


def diagonal_gap(model: LinearGaussian) -> float:
    """KL from the best diagonal Gaussian to the Gaussian posterior N(m, P^-1): 1/2 (sum log P_ii - log det P)."""
    _, cov = model.posterior(torch.zeros(1, model.x_dim))
    precision = torch.linalg.inv(cov.double())
    return 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))


def test_full_covariance_per_point_gaussian_closes_the_whole_gap(linear_gaussian, gaps):
    model, _, x = linear_gaussian
    assert gaps["approximation_gap_full"].abs().max() < 0.01
    # Its draws are from the posterior itself: every importance weight is p(x), exactly.
    exact = model.log_likelihood(x).double().numpy()
    assert abs(gaps["log_likelihood"].to_numpy() - exact).max() < 0.01


def test_diagonal_family_approximation_gap_is_its_closed_form(linear_gaussian, gaps):
    model, _, _ = linear_gaussian
    closed_form = diagonal_gap(model)
    assert closed_form == pytest.approx(0.388, abs=0.005)
    # K = 1000 draws per point give each point's ELBO a standard error of about 0.03 nats.
    assert gaps["approximation_gap"].mean() == pytest.approx(closed_form, abs=0.03)
    assert gaps["approximation_gap"].min() > closed_form - 0.15


def test_gaps_add_up_to_the_inference_gap(gaps):
    total = gaps["log_likelihood"] - gaps["elbo_amortized"]
    assert (gaps["approximation_gap"] + gaps["amortization_gap"] - total).abs().max() < 1e-9
    # Ten epochs of training leave the encoder short of the best Gaussian of every point.
    assert (gaps["amortization_gap"] > 0).all()
    assert list(gaps.columns) == ["log_likelihood", "elbo_amortized", "elbo_optimized", "elbo_full",
                                  "approximation_gap", "amortization_gap", "approximation_gap_full"]


def test_per_point_guide_starts_as_the_amortized_guide(linear_gaussian):
    _, guide, x = linear_gaussian
    per_point = PerPointGuide(guide, x)
    z = torch.randn(x.shape[0], 4)
    with torch.no_grad():
        expected = guide.distribution(x).log_prob(z)
        got = guide.distribution_from(per_point.local).log_prob(z)
    torch.testing.assert_close(got, expected)
    assert not any(p is q for p in per_point.parameters() for q in guide.parameters())


def test_per_point_guides_refuse_another_batch(linear_gaussian):
    model, guide, x = linear_gaussian
    per_point = PerPointGuide(guide, x)
    with pytest.raises(InputError, match="built on"):
        per_point(x.flip(0))
    draws = {"z": torch.randn(8, x.shape[0], 4)}
    gaussian = PerPointGaussian.from_draws(model, x, draws=draws)
    with pytest.raises(InputError, match="built on"):
        gaussian(x[:5])


def test_the_model_and_the_guide_are_left_as_they_were(linear_gaussian):
    model, guide, x = linear_gaussian
    before = {name: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for name, p in guide.named_parameters()}
    inference_gaps(model, guide, x[:4], steps=5, num_samples=10)
    for name, p in guide.named_parameters():
        value, grad = before[name]
        assert p.requires_grad
        torch.testing.assert_close(p.detach(), value)
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad))


def test_a_parameter_the_user_froze_stays_frozen(linear_gaussian):
    model, guide, x = linear_gaussian
    frozen = next(guide.parameters())
    frozen.requires_grad_(False)
    try:
        inference_gaps(model, guide, x[:4], steps=5, num_samples=10)
        assert not frozen.requires_grad
        assert all(p.requires_grad for p in list(guide.parameters())[1:])
    finally:
        frozen.requires_grad_(True)


def test_flow_guide_optimized_per_point_beats_its_encoder(linear_gaussian):
    model, _, x = linear_gaussian
    pyro.set_rng_seed(2)
    guide = FlowGuide(16, 4, hidden=(32,), flow_depth=1)  # untrained: the encoder is far from every posterior
    table = inference_gaps(model, guide, x[:10], family="diagonal", steps=200, num_samples=500)
    assert (table["amortization_gap"] > 1.0).all()
    # One IAF layer conditioned on a free context per point: at least as good as the diagonal Gaussian.
    assert table["approximation_gap"].mean() < diagonal_gap(model) + 0.1


def gamma_scale_model(x, *, batch_size=None):
    """tau_n ~ Gamma(3, 2); x_nd ~ N(0, 1 / tau_n): a constrained latent with exact evidence."""
    n = x.shape[0] if x is not None else batch_size
    with pyro.plate("data", n):
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(3.0), torch.tensor(2.0)))
        return pyro.sample("x", dist.Normal(0.0, tau.rsqrt().unsqueeze(-1).expand(*tau.shape, 6)).to_event(1), obs=x)


def gamma_scale_evidence(x, a=3.0, b=2.0):
    d, s = x.shape[1], x.double().pow(2).sum(1)
    return (a * math.log(b) - math.lgamma(a) - 0.5 * d * math.log(2 * math.pi) + math.lgamma(a + d / 2)
            - (a + d / 2) * torch.log(b + s / 2))


def test_constrained_latents_carry_their_jacobian():
    pyro.set_rng_seed(3)
    x = torch.randn(30, 6) * torch.linspace(0.5, 2.0, 30)[:, None]
    guide = AutoAmortizedGuide(gamma_scale_model, x[:4], hidden=(16,))
    table = inference_gaps(gamma_scale_model, guide, x, steps=300, num_samples=2000)
    exact = gamma_scale_evidence(x).numpy()
    # A log-normal per point is close to the Gamma posterior: importance sampling from it is within a few
    # hundredths of a nat (a Jacobian left out would be off by E[log tau], about half a nat).
    error = table["log_likelihood"].to_numpy() - exact
    assert abs(error).max() < 0.05 and abs(error.mean()) < 0.01
    assert (table["approximation_gap"] > -0.02).all() and table["approximation_gap"].mean() < 0.1


def global_latent_model(x, *, batch_size=None):
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(shift, 1.0))
        pyro.sample("x", dist.Normal(z[:, None], 1.0).to_event(1), obs=x)


def test_refusals_name_the_problem(linear_gaussian):
    model, guide, x = linear_gaussian
    with pytest.raises(InputError, match="does not expose its family"):
        inference_gaps(model, ExactPosteriorGuide(model), x, steps=1)
    with pytest.raises(InputError, match="family must be one of"):
        inference_gaps(model, guide, x, family="flow")
    with pytest.raises(InputError, match="steps must be a positive integer"):
        inference_gaps(model, guide, x, steps=0)
    with pytest.raises(InputError, match="objective"):
        inference_gaps(model, guide, x, objective="nonsense")
    y = torch.randn(8, 3)
    auto = AutoAmortizedGuide(global_latent_model, y, hidden=(8,))
    with pytest.raises(InputError, match="global latents \\['shift'\\]"):
        inference_gaps(global_latent_model, auto, y, steps=1)


def test_plot_inference_gaps_writes_a_figure(gaps, tmp_path):
    plot_inference_gaps(gaps, tmp_path / "gaps.png", max_points=10)
    assert (tmp_path / "gaps.png").stat().st_size > 10_000
    with pytest.raises(InputError, match="inference_gaps' table"):
        plot_inference_gaps(gaps.drop(columns="approximation_gap_full"), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_a_flow_family_is_optimized_pathwise_by_default(linear_gaussian):
    # Sticking the landing scores draws with the flow's parameters detached, which needs the flow's
    # inverse; a planar flow has none, so only the pathwise default can optimize it.
    model, _, x = linear_gaussian
    pyro.set_rng_seed(0)
    planar = FlowGuide(16, 4, flow="planar", flow_depth=2, hidden=(32,))
    fit(model, planar, x, epochs=3, seed=0, progress=False)
    gaps = inference_gaps(model, planar, x[:6], steps=40, num_samples=100, progress=False)
    assert gaps.notna().all().all() and (gaps.elbo_optimized > gaps.elbo_amortized).all()
    with pytest.raises(InputError, match="site 'z'.*cannot invert"):
        inference_gaps(model, planar, x[:6], steps=2, num_samples=10, objective="elbo-stl:k=4", progress=False)
