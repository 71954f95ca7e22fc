"""Gradient signal-to-noise ratios against known answers: a closed form, stored estimates, Rainforth et al.'s rates.

Rainforth et al. (2018) show that the IWAE encoder gradient's SNR falls as K^(-1/2) with the
number of particles K and the decoder's rises as K^(+1/2); DReG (Tucker et al. 2019) keeps the
encoder's up. Those rates are checked on the linear-Gaussian model, with an amortized Gaussian
guide set a small step away from the exact posterior.
"""

import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab import fit
from elbolab.analysis.snr import SNRMonitor, gradient_snr, plot_snr_against_k, snr_against_k
from elbolab.data import ExactPosteriorGuide, LinearGaussian
from elbolab.errors import InputError
from elbolab.inference import get_objective

KS = (1, 4, 16, 64)


class AmortizedGaussianGuide(nn.Module):
    """q(z | x) = N(A x + c, L L^T), L lower-triangular with a positive (exponentiated) diagonal.

    ``raw_tril``'s strict upper triangle is masked out: its gradient is zero in every estimate.
    Built at the exact posterior of ``model`` (mean ``(x - b) W Sigma / sigma^2``, covariance
    Sigma), then ``shift`` moves c along a fixed direction and ``log_scale_shift`` widens L.
    """

    def __init__(self, model, shift: float = 0.0, log_scale_shift: float = 0.0) -> None:
        super().__init__()
        _, cov = model.posterior(torch.zeros(1, model.x_dim))
        weight = cov @ model.weight.detach().T / model.noise_scale**2
        tril = torch.linalg.cholesky(cov)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(-(weight @ model.bias.detach()) + shift * torch.linspace(1.0, -1.0, model.z_dim))
        self.raw_tril = nn.Parameter(torch.tril(tril, -1) + torch.diag(tril.diagonal().log() + log_scale_shift))

    def forward(self, x):
        scale_tril = torch.tril(self.raw_tril, -1) + torch.diag_embed(self.raw_tril.diagonal().exp())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ self.weight.T + self.bias, scale_tril=scale_tril))


class LearnedLinearGaussian(nn.Module):
    """The linear-Gaussian model with its loadings and bias as parameters (a decoder to measure)."""

    def __init__(self, truth: LinearGaussian, bias_shift: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(truth.weight.clone())
        self.bias = nn.Parameter(truth.bias + bias_shift)
        self.noise_scale, self.x_dim, self.z_dim = truth.noise_scale, truth.x_dim, truth.z_dim
        self.register_buffer("calls", torch.zeros(()))  # changed by every run: gradient_snr must put it back

    def forward(self, x):
        self.calls += 1
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.weight.new_zeros(self.z_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ self.weight.T + self.bias, self.noise_scale).to_event(1), obs=x)

    posterior = LinearGaussian.posterior


def truth() -> LinearGaussian:
    return LinearGaussian.random(x_dim=16, z_dim=4, noise_scale=0.5, seed=0)


@pytest.fixture(scope="module")
def encoder_rates():
    """IWAE's encoder SNR for K = 1, 4, 16, 64 (300 estimates each) and DReG's at K = 64 (100).

    128 points: the SNR of the gradient of their sum grows as sqrt(N), which lifts IWAE's K = 64
    value (about 0.09) well above the floor that |mean| of M estimates of a zero-mean gradient
    sits at, sqrt(2 / (pi M)) = 0.046 for M = 300 (a floor that would flatten the slope). Over
    seeds 0..9 this setting gave slopes -0.39 to -0.45 and a K = 64 DReG / IWAE ratio near 300.
    """
    model = truth()
    x = model.sample(128, torch.Generator().manual_seed(1))
    guide = AmortizedGaussianGuide(model, shift=0.1, log_scale_shift=0.05)
    pyro.set_rng_seed(0)
    table = snr_against_k(model, guide, x, objectives=("iwae",), ks=KS, num_estimates=300, progress=False)
    dreg = gradient_snr(model, guide, x, objective="iwae-dreg:k=64", num_estimates=100)
    return table, dreg


def test_the_iwae_encoder_snr_falls_as_one_over_root_k(encoder_rates):
    table, _ = encoder_rates
    assert list(table.columns) == ["objective", "k", "group", "snr_mean", "snr_median"]
    assert (table.group == "encoder").all() and list(table.k) == list(KS)  # LinearGaussian's parameters are buffers
    snr = table.snr_mean.to_numpy()
    assert (np.diff(snr) < 0).all(), snr
    slope = np.polyfit(np.log(KS), np.log(snr), 1)[0]
    assert -0.65 < slope < -0.3, slope
    assert (np.diff(table.snr_median.to_numpy()) < 0).all()


def test_dreg_keeps_the_encoder_snr_that_iwae_loses(encoder_rates):
    table, dreg = encoder_rates
    iwae_64 = table.snr_mean.iloc[-1]
    dreg_64 = dreg.loc[dreg.parameter == "(all)", "snr_mean"].item()
    assert dreg_64 >= 10 * iwae_64, (dreg_64, iwae_64)


def test_the_iwae_decoder_snr_rises_as_root_k():
    model = LearnedLinearGaussian(truth(), bias_shift=0.2)
    x = truth().sample(16, torch.Generator().manual_seed(1))
    guide = AmortizedGaussianGuide(model, shift=0.1, log_scale_shift=0.05)
    table = snr_against_k(model, guide, x, objectives=("iwae",), ks=KS, num_estimates=100, progress=False)
    assert list(table.group.unique()) == ["encoder", "decoder"]
    decoder = table[table.group == "decoder"].snr_mean.to_numpy()
    assert (np.diff(decoder) > 0).all(), decoder
    slope = np.polyfit(np.log(KS), np.log(decoder), 1)[0]
    assert 0.3 < slope < 0.7, slope  # measured 0.49


class ToyModel(nn.Module):
    """z_n ~ N(m, 1), x_n ~ N(z_n, 1), with the prior mean m a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.prior_loc = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.prior_loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])


class ToyGuide(nn.Module):
    """q(z_n) = N(loc_n, 1), one location per point, and a parameter the guide never uses."""

    def __init__(self, loc) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(loc))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc, 1.0))


def test_the_snr_of_a_gradient_with_a_known_mean_and_std():
    """With z_n = loc_n + eps_n, the ELBO loss's gradient is 2 loc_n + 2 eps_n - m - x_n for loc_n
    (mean 2 loc_n - m - x_n, std 2) and -sum_n (loc_n + eps_n - m) for m (std sqrt(N)).

    At x = 0, m = 0 the SNRs are |loc_n| = 1, 2, 3, 4 and |sum_n loc_n| / 2 = 1. With M = 3000 the
    estimate of an SNR s has a standard error of about sqrt((1 + s^2 / 2) / M): 0.022 at s = 1,
    0.067 at s = 4, so a 12% tolerance is 5 or more standard errors for each.
    """
    loc = [1.0, -2.0, 3.0, -4.0]
    table = gradient_snr(ToyModel(), ToyGuide(loc), torch.zeros(4, 1),
                         objective="elbo", num_estimates=3000)
    rows = table.set_index(["group", "parameter"])
    assert list(rows.index) == [("encoder", "loc"), ("encoder", "unused"), ("encoder", "(all)"),
                                ("decoder", "prior_loc"), ("decoder", "(all)")]
    expected = np.abs(loc)
    assert rows.loc[("encoder", "loc"), "snr_mean"] == pytest.approx(expected.mean(), rel=0.08)
    assert rows.loc[("encoder", "loc"), "snr_median"] == pytest.approx(np.median(expected), rel=0.12)
    assert rows.loc[("decoder", "prior_loc"), "snr_mean"] == pytest.approx(abs(sum(loc)) / 2, rel=0.12)
    # The unused parameter's three elements are zero in every estimate: counted, and left out of the aggregate.
    assert rows.loc[("encoder", "unused"), ["elements", "zero_elements"]].tolist() == [3, 3]
    assert math.isnan(rows.loc[("encoder", "unused"), "snr_mean"])
    assert rows.loc[("encoder", "(all)"), ["elements", "zero_elements"]].tolist() == [7, 3]
    assert rows.loc[("encoder", "(all)"), "snr_mean"] == pytest.approx(rows.loc[("encoder", "loc"), "snr_mean"])


def test_the_table_is_the_snr_of_the_same_estimates_computed_directly():
    """Same seed, same draws: gradient_snr's Welford sums equal |mean| / std (ddof 1) of the stored estimates."""
    model = truth()
    x = model.sample(5, torch.Generator().manual_seed(1))
    guide = AmortizedGaussianGuide(model, shift=0.3, log_scale_shift=0.1)
    objective = get_objective("iwae", num_particles=8)
    objective.differentiable_loss(model, guide, x)  # the contract's and plate nesting's traces, drawn once, before
    pyro.set_rng_seed(3)
    table = gradient_snr(model, guide, x, objective=objective, num_estimates=5)
    pyro.set_rng_seed(3)
    params = [guide.weight, guide.bias, guide.raw_tril]
    estimates = [torch.autograd.grad(objective.differentiable_loss(model, guide, x), params) for _ in range(5)]
    ratios = []
    for name, stacked in zip(["weight", "bias", "raw_tril"], zip(*estimates, strict=True), strict=True):
        g = torch.stack(stacked).double().reshape(5, -1).numpy()
        mean, std = g.mean(0), g.std(0, ddof=1)
        kept = ~((mean == 0) & (std == 0))
        ratio = np.abs(mean[kept]) / std[kept]
        ratios.append(ratio)
        row = table[table.parameter == name].iloc[0]
        assert row.elements == g.shape[1] and row.zero_elements == (~kept).sum()
        assert row.snr_mean == pytest.approx(ratio.mean(), rel=1e-9)
        assert row.snr_median == pytest.approx(np.median(ratio), rel=1e-9)
    assert table[table.parameter == "raw_tril"].zero_elements.item() == 6  # the masked upper triangle
    every = table[table.parameter == "(all)"].iloc[0]
    assert (every.group, every.elements, every.zero_elements) == ("encoder", 84, 6)
    assert every.snr_mean == pytest.approx(np.concatenate(ratios).mean(), rel=1e-9)
    assert every.snr_median == pytest.approx(np.median(np.concatenate(ratios)), rel=1e-9)


def test_the_pair_is_left_as_it_was():
    """Modes, .grad and buffers (here a call counter the model's forward increments) are as before."""
    model = LearnedLinearGaussian(truth())
    x = truth().sample(4, torch.Generator().manual_seed(1))
    guide = AmortizedGaussianGuide(model, shift=0.1)
    guide.eval()
    guide.bias.grad = torch.full_like(guide.bias, 7.0)
    gradient_snr(model, guide, x, objective="iwae-dreg:k=4", num_estimates=3)
    assert model.training and not guide.training
    assert torch.equal(guide.bias.grad, torch.full_like(guide.bias, 7.0))
    assert guide.weight.grad is None and model.weight.grad is None
    assert model.calls.item() == 0


def test_a_parameter_of_the_model_that_the_guide_holds_is_counted_once_in_the_decoder():
    model = LearnedLinearGaussian(truth())
    x = truth().sample(4, torch.Generator().manual_seed(1))
    table = gradient_snr(model, ExactPosteriorGuide(model), x, objective="iwae:k=4", num_estimates=3)
    assert table[["group", "parameter", "elements"]].values.tolist() == [
        ["decoder", "weight", 64], ["decoder", "bias", 16], ["decoder", "(all)", 80]]


def test_the_monitor_measures_at_the_chosen_epochs_and_leaves_training_bitwise_alike():
    data = truth().sample(24, torch.Generator().manual_seed(2))
    options = {"epochs": 3, "batch_size": 8, "objective": "iwae:k=4", "seed": 5, "progress": False}

    def train(monitor):
        model = LearnedLinearGaussian(truth(), bias_shift=0.2)
        guide = AmortizedGaussianGuide(model, shift=0.1)
        result = fit(model, guide, data, monitor=monitor, **options)
        return result, [p.detach().clone() for p in [*model.parameters(), *guide.parameters()]]

    monitor = SNRMonitor(data[:4], epochs=[1, 2, 10], objectives=("iwae", "iwae-dreg"), ks=(1, 4), num_estimates=4)
    watched, watched_params = train(monitor)
    plain, plain_params = train(None)
    columns = [c for c in plain.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(watched.history[columns], plain.history[columns])
    assert all(torch.equal(a, b) for a, b in zip(watched_params, plain_params, strict=True))
    table = monitor.table
    assert list(table.columns) == ["epoch", "objective", "k", "group", "snr_mean", "snr_median"]
    assert sorted(set(table.epoch)) == [1, 2] and len(table) == 2 * 2 * 2 * 2  # epochs x objectives x ks x groups
    assert np.isfinite(table.snr_mean).all() and (table.snr_mean > 0).all()
    monitor.close()
    assert SNRMonitor(data, epochs=[1]).table.empty


def test_the_plot_is_written(encoder_rates, tmp_path):
    table, _ = encoder_rates
    both = pd.concat([table, table.assign(group="decoder", snr_mean=table.snr_mean * np.sqrt(table.k))])
    for name, frame in [("encoder.png", table), ("both.png", both.assign(objective="iwae-dreg"))]:
        path = plot_snr_against_k(frame, tmp_path / name, title="linear Gaussian")
        assert path == tmp_path / name
        content = path.read_bytes()
        assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000


def plain_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])


def plain_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, g, x: gradient_snr(m, g, x, num_estimates=1), "num_estimates"),
        (lambda m, g, x: gradient_snr(m, g, x, num_estimates=2.5), "num_estimates"),
        (lambda m, g, x: gradient_snr(m, g, x, objective="iwea"), "unknown objective 'iwea'"),
        (lambda m, g, x: gradient_snr(m, g, x, objective=object()), "differentiable_loss"),
        (lambda m, g, x: gradient_snr(m, g, x, objective="pyro:RenyiELBO:k=2"), "back-propagates itself"),
        (lambda m, g, x: gradient_snr(m, g, x.numpy()), "tensor"),
        (lambda m, g, x: gradient_snr(plain_model, plain_guide, x), "neither the model nor the guide has parameters"),
        (lambda m, g, x: snr_against_k(m, g, x, ks=()), "ks"),
        (lambda m, g, x: snr_against_k(m, g, x, ks=(0, 4)), "positive integers"),
        (lambda m, g, x: snr_against_k(m, g, x, objectives=()), "at least one objective"),
        (lambda m, g, x: snr_against_k(m, g, x, objectives=("iwae:k=4",)), "names its own k"),
        (lambda m, g, x: snr_against_k(m, g, x, objectives=("reconstruction",)), "reconstruction"),
        (lambda m, g, x: SNRMonitor(x, epochs=[]), "epochs"),
        (lambda m, g, x: SNRMonitor(x, epochs=[0, 2]), "positive integers"),
        (lambda m, g, x: SNRMonitor(x, epochs=[1], num_estimates=1), "num_estimates"),
        (lambda m, g, x: plot_snr_against_k(pd.DataFrame({"k": [1]}), "never.png"), "lacks the columns"),
        (lambda m, g, x: plot_snr_against_k(
            pd.DataFrame({"objective": "iwae", "k": [1, 1], "group": "encoder", "snr_mean": 1.0, "epoch": [1, 2]}),
            "never.png"), "epochs"),
    ],
)
def test_bad_inputs_are_refused_by_name(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plot that was not refused would land here
    model = truth()
    x = model.sample(3, torch.Generator().manual_seed(1))
    with pytest.raises(InputError, match=message):
        call(model, AmortizedGaussianGuide(model), x)
    assert not list(tmp_path.iterdir())
