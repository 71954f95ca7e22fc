"""Simulation-based calibration against known answers: the linear-Gaussian model's exact posterior,
scaled and shifted, and tiny hand-written models whose posteriors are known in closed form."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.analysis.calibration import Calibration, _verdict, calibration, plot_calibration
from elbolab.data import ExactPosteriorGuide, LinearGaussian
from elbolab.errors import InputError

MODEL = LinearGaussian.random(x_dim=16, z_dim=4, noise_scale=0.5, seed=0)
COLUMNS = ["z[0]", "z[1]", "z[2]", "z[3]"]
ALPHA = 0.01


def run(model, guide, *args, seed=0, **options):
    pyro.set_rng_seed(seed)
    return calibration(model, guide, *args, **{"num_simulations": 1000, "num_draws": 99, "alpha": ALPHA, **options})


def test_the_exact_posterior_is_calibrated_in_every_dimension():
    result = run(MODEL, ExactPosteriorGuide(MODEL))
    assert isinstance(result, Calibration)
    assert (result.num_simulations, result.num_draws, result.bins) == (1000, 99, 20)
    table = result.table
    assert list(table.columns) == ["site", "dim", "chi2_p", "ks_p", "mean_rank", "rank_std_ratio", "verdict"]
    assert list(table.site) == ["z"] * 4 and list(table.dim) == [0, 1, 2, 3]
    assert (table.chi2_p > ALPHA).all() and (table.ks_p > ALPHA).all()
    assert list(table.verdict) == ["calibrated"] * 4
    np.testing.assert_allclose(table.mean_rank, 0.5, atol=0.03)  # standard error 1 / sqrt(12 S) = 0.009
    np.testing.assert_allclose(table.rank_std_ratio, 1.0, atol=0.05)  # standard error 1 / sqrt(5 S) = 0.014
    assert result.failed.empty


def test_the_ranks_are_integers_from_0_to_num_draws():
    result = run(MODEL, ExactPosteriorGuide(MODEL), num_simulations=500, num_draws=49)
    ranks = result.ranks
    assert ranks.shape == (500, 4) and list(ranks.columns) == COLUMNS
    assert all(dtype == np.int64 for dtype in ranks.dtypes)
    assert ranks.min().min() >= 0 and ranks.max().max() <= 49
    assert ranks.min().min() == 0 and ranks.max().max() == 49  # the extremes occur: 1 in 50 each


def test_half_the_posterior_scale_fails_every_dimension_as_under_dispersed():
    result = run(MODEL, ExactPosteriorGuide(MODEL, scale_factor=0.5))
    assert (result.table.chi2_p < ALPHA).all() and (result.table.ks_p < ALPHA).all()
    assert list(result.table.verdict) == ["under-dispersed"] * 4
    assert (result.table.rank_std_ratio > 1.2).all()  # a U shape: about 1.33 for q at half the scale
    assert list(result.failed.index) == COLUMNS


def test_twice_the_posterior_scale_is_over_dispersed_in_every_dimension():
    result = run(MODEL, ExactPosteriorGuide(MODEL, scale_factor=2.0))
    assert list(result.table.verdict) == ["over-dispersed"] * 4
    assert (result.table.rank_std_ratio < 0.8).all()  # a hump: about 0.62
    np.testing.assert_allclose(result.table.mean_rank, 0.5, atol=0.03)


def test_the_ks_test_sees_what_two_bins_cannot():
    """A hump is symmetric: two bins hold half the ranks each and chi-square passes, KS does not."""
    result = run(MODEL, ExactPosteriorGuide(MODEL, scale_factor=2.0), bins=2)
    assert (result.table.chi2_p > ALPHA).all() and (result.table.ks_p < 1e-6).all()
    assert list(result.table.verdict) == ["over-dispersed"] * 4


@pytest.mark.parametrize(
    ("chi2_p", "ks_p", "mean_rank", "std_ratio", "verdict"),
    [
        (0.5, 0.02, 0.7, 1.3, "calibrated"),  # neither test rejects: the statistics are noise
        (0.001, 0.5, 0.5, 1.1, "under-dispersed"),  # the chi-square test alone rejects
        (0.5, 0.001, 0.4, 1.0, "biased"),  # the KS test alone rejects
        (0.0, 0.0, 0.5, 0.6, "over-dispersed"),
        (0.0, 0.0, 0.24, 0.82, "biased"),  # q one standard deviation too high
        (0.0, 0.0, 0.0, 0.0, "biased"),  # every draw above the truth: no spread, all bias
        (0.0, 0.0, 0.5, 0.0, "over-dispersed"),  # the truth always in the middle of the draws
        (0.0, 0.0, 0.52, 1.3, "under-dispersed"),
    ],
)
def test_the_verdict_rule(chi2_p, ks_p, mean_rank, std_ratio, verdict):
    assert _verdict(chi2_p, ks_p, mean_rank, std_ratio, 1000, ALPHA) == verdict


class ShiftedPosterior(ExactPosteriorGuide):
    """The exact posterior moved up by one posterior standard deviation in every dimension."""

    def forward(self, x=None, *, batch_size=None):
        mean, cov = self.model.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean + cov.diagonal().sqrt(), covariance_matrix=cov))


def test_a_posterior_shifted_by_one_standard_deviation_is_biased():
    result = run(MODEL, ShiftedPosterior(MODEL))
    assert list(result.table.verdict) == ["biased"] * 4
    # The truth falls below most draws: mean rank Phi(-1 / sqrt 2) = 0.24.
    np.testing.assert_allclose(result.table.mean_rank, 0.24, atol=0.04)


def test_chunks_of_simulations_keep_each_truth_with_its_draws():
    result = run(MODEL, ExactPosteriorGuide(MODEL), num_simulations=600, batch_size=137)
    assert result.ranks.shape == (600, 4) and list(result.table.verdict) == ["calibrated"] * 4


# A point mass far above (or below) the truth: every draw is above it, the rank is 0 (or L).
def normal_model(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def far_above(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(x + 100.0))


def far_below(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(x - 100.0))


def test_the_rank_counts_the_draws_below_the_truth():
    above = run(normal_model, far_above, num_simulations=200, num_draws=49)
    below = run(normal_model, far_below, num_simulations=200, num_draws=49)
    assert (above.ranks["z[0]"] == 0).all() and (below.ranks["z[0]"] == 49).all()
    assert above.table.verdict.iloc[0] == "biased" and above.table.mean_rank.iloc[0] == 0.0
    assert below.table.verdict.iloc[0] == "biased" and below.table.mean_rank.iloc[0] == 1.0


# A discrete latent the data reveal exactly: the guide's point mass at the truth ties with it in
# every draw, so the ranks are uniform only if ties are broken at random.
def category_model(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))
        return pyro.sample("x", dist.Normal(c.float(), 0.01), obs=x)


def category_revealed(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Categorical(probs=torch.nn.functional.one_hot(x.round().long().clamp(0, 2), 3).float()))


def coin_model(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3)))
        return pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)


def coin_posterior(x, *, batch_size=None):
    """Exact: p(c = 1 | x) = sigmoid(log(0.3 / 0.7) + 2x - 2)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(logits=torch.tensor(0.3 / 0.7).log() + 2.0 * x - 2.0))


def coin_prior(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(torch.full(x.shape, 0.3)))


def coin_over_confident(x, *, batch_size=None):
    """The exact posterior's logits, tripled: too sure of the coin."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(logits=3 * (torch.tensor(0.3 / 0.7).log() + 2.0 * x - 2.0)))


def test_ties_of_discrete_draws_with_the_truth_are_broken_at_random():
    revealed = run(category_model, category_revealed, num_simulations=1000, num_draws=49, bins=10)
    assert revealed.table.verdict.iloc[0] == "calibrated"
    assert revealed.ranks["c[0]"].min() == 0 and revealed.ranks["c[0]"].max() == 49
    exact = run(coin_model, coin_posterior, num_simulations=1000, num_draws=19, bins=10)
    assert exact.table.verdict.iloc[0] == "calibrated"
    wrong = run(coin_model, coin_over_confident, num_simulations=1000, num_draws=19, bins=10)
    assert wrong.table.verdict.iloc[0] == "under-dispersed"


def test_the_prior_as_guide_passes_as_documented():
    """SBC's blind spot: q = p(z), ignoring x, averages to the prior over the data, and passes."""
    prior = run(coin_model, coin_prior, num_simulations=1000, num_draws=19, bins=10)
    assert prior.table.verdict.iloc[0] == "calibrated"


def test_bins_that_do_not_divide_the_ranks_are_weighed_by_their_length():
    """50 rank values in 20 bins: runs of 2 and 3 values, expected counts 40 and 60 of 1000."""
    result = run(MODEL, ExactPosteriorGuide(MODEL), num_draws=49, bins=20)
    assert result.bins == 20 and list(result.table.verdict) == ["calibrated"] * 4
    assert run(MODEL, ExactPosteriorGuide(MODEL), num_draws=9, bins=20).bins == 10  # one bin per rank value


# A conditional model: the label y shifts the prior of z, and the exact posterior needs y.
def labelled_model(x, y, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else y.shape[0]):
        z = pyro.sample("z", dist.Normal(y.float(), 1.0))
        return pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def labelled_posterior(x, y, *, batch_size=None):
    """N(y, 1) prior, N(z, 0.25) likelihood: precision 5, mean (y + 4x) / 5."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((y.float() + 4 * x) / 5, 5**-0.5))


def test_per_simulation_arguments_reach_the_model_and_the_guide():
    pyro.set_rng_seed(0)
    y = torch.randint(0, 5, (1000,))
    result = run(labelled_model, labelled_posterior, y, num_draws=49)
    assert result.table.verdict.iloc[0] == "calibrated" and list(result.ranks.columns) == ["z[0]"]
    # With labels 3 .. 7 the exact posterior still passes; told y = 0, it misses the prior's shift.
    assert run(labelled_model, labelled_posterior, y + 3, num_draws=49).table.verdict.iloc[0] == "calibrated"
    blind = run(labelled_model, lambda x, y: labelled_posterior(x, 0 * y), y + 3, num_draws=49)
    assert blind.table.verdict.iloc[0] == "biased"
    with pytest.raises(InputError, match=r"args\[0\] must be a tensor with one row per simulation \(num_simulations=1000\)"):
        calibration(labelled_model, labelled_posterior, y[:10], num_simulations=1000)
    with pytest.raises(InputError, match="does not generate with x=None"):
        calibration(labelled_model, labelled_posterior, num_simulations=10)  # y left out


# A discrete site summed out by enumeration: it has no guide draws and is skipped.
def enumerated_model(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = torch.stack(torch.broadcast_tensors(z, 3.0 * c), dim=-1)
        return pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)


def enumerated_posterior(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(4 * x[:, 0] / 5, 5**-0.5))


def test_enumerated_sites_are_skipped():
    result = run(enumerated_model, enumerated_posterior, num_simulations=500, num_draws=49)
    assert list(result.ranks.columns) == ["z[0]"] and result.table.verdict.iloc[0] == "calibrated"


# Models calibration refuses, each for a reason its message names.
def global_model(x, *, batch_size=None):
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        z = pyro.sample("z", dist.Normal(shift, 1.0))
        return pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def global_guide(x, *, batch_size=None):
    pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0))


def z_guide(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x if x.dim() == 1 else x[:, 0], 1.0))


def two_observations(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("total", dist.Normal(z, 1.0), obs=None if x is None else x.sum(-1))
        return pyro.sample("x", dist.Normal(z[:, None].expand(-1, 2), 1.0).to_event(1), obs=x)


def doubled_observation(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(z, 1.0), obs=None if x is None else 2 * x)


def renamed_observation(data, *, batch_size=None):
    with pyro.plate("data", data.shape[0] if data is not None else batch_size):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


def infinite_data(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0] if x is not None else batch_size):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(z, torch.tensor(float("inf"))), obs=x)


def needs_data(x, *, batch_size=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(z, 1.0), obs=x)


@pytest.mark.parametrize(
    ("model", "guide", "message"),
    [
        (global_model, global_guide, r"latent site\(s\) 'shift' sit outside the data plate 'data'"),
        (two_observations, z_guide, r"observes several sites \('total', 'x'\)"),
        (doubled_observation, z_guide, "observed site 'x' does not observe its input x itself"),
        (renamed_observation, z_guide, "has no sample site 'x'"),
        (infinite_data, z_guide, "NaN or infinite values at site 'x'"),
        (needs_data, z_guide, r"does not generate with x=None \(model\(None, \*args, batch_size=20\)\)"),
    ],
    ids=["global-latent", "two-observed-sites", "observes-2x", "no-site-x", "infinite-data", "no-generation"],
)
def test_models_without_per_point_latents_and_one_observed_x_are_refused(model, guide, message):
    with pytest.raises(InputError, match=message):
        calibration(model, guide, num_simulations=20, num_draws=9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_draws": 0}, "num_draws must be a positive integer, got 0"),
        ({"num_draws": 9.5}, "num_draws must be a positive integer"),
        ({"num_simulations": 0}, "num_simulations must be a positive integer, got 0"),
        ({"bins": 1}, "bins must be an integer >= 2"),
        ({"alpha": 1.5}, r"alpha must be a level in \(0, 1\)"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(InputError, match=message):
        calibration(MODEL, ExactPosteriorGuide(MODEL), **options)


def test_the_figure_is_written(tmp_path):
    result = run(MODEL, ExactPosteriorGuide(MODEL, scale_factor=0.5), num_simulations=500, num_draws=49)
    path = plot_calibration(result, tmp_path / "calibration.png", title="exact posterior at half scale")
    assert path == tmp_path / "calibration.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.png"]  # no temporary left behind
    plot_calibration(result, tmp_path / "two.png", max_dimensions=2)
    assert (tmp_path / "two.png").stat().st_size > 5_000
    with pytest.raises(InputError, match="max_dimensions must be a positive integer"):
        plot_calibration(result, tmp_path / "none.png", max_dimensions=0)
