"""InferenceData export against the linear-Gaussian model, whose posterior and predictive are known."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab import InputError
from elbolab.analysis import (
    diagnostics,
    importance_diagnostics,
    load_inference_data,
    plot_khat,
    plot_ppc_statistics,
    save_inference_data,
    to_inference_data,
)
from elbolab.data import ExactPosteriorGuide, LinearGaussian

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import arviz


@pytest.fixture(scope="module")
def exported():
    model = LinearGaussian.random(x_dim=10, z_dim=3, seed=1)
    x = model.sample(40, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    idata = to_inference_data(
        model, ExactPosteriorGuide(model), x, num_samples=2000, prior_samples=500, labels=torch.arange(40) % 3,
        statistics={"mean_value": lambda v: v.mean(-1)}, objective="iwae", attrs={"run": "runs/test"},
    )
    return model, x, idata


def test_groups_dims_and_attributes(exported):
    _, x, idata = exported
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                   "observed_data", "constant_data", "prior", "prior_predictive"}
    assert idata.posterior["z"].dims == ("chain", "draw", "obs", "z_dim")
    assert idata.posterior["z"].shape == (1, 2000, 40, 3)
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "obs", "x_dim")
    assert idata.posterior_predictive["mean_value"].dims == ("chain", "draw", "obs")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "obs")
    assert idata.sample_stats["log_weight"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["x"].dims == ("obs", "x_dim")
    assert idata.constant_data["label"].values.tolist() == [i % 3 for i in range(40)]
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    attrs = idata.posterior.attrs
    assert (attrs["model"], attrs["guide"], attrs["objective"], attrs["run"]) == (
        "LinearGaussian", "ExactPosteriorGuide", "iwae", "runs/test")
    assert attrs["elbolab_version"] and attrs["num_samples"] == 2000


def test_posterior_draws_match_the_exact_posterior(exported):
    model, x, idata = exported
    mean, cov = model.posterior(x)
    draws = idata.posterior["z"].values[0]  # [S, N, k]
    standard_error = np.sqrt(np.diag(cov.numpy())) / math.sqrt(2000)
    assert (np.abs(draws.mean(0) - mean.numpy()) < 5 * standard_error).all()
    np.testing.assert_allclose(np.cov(draws[:, 0].T), cov.numpy(), atol=0.1 * cov.abs().max().item())


def test_weights_and_pointwise_likelihood_are_the_model_densities(exported):
    model, x, idata = exported
    # The exact posterior as guide: every weight p(x, z) / q(z | x) is p(x), the evidence.
    log_weight = idata.sample_stats["log_weight"].values[0]
    np.testing.assert_allclose(log_weight, model.log_likelihood(x).numpy()[None].repeat(2000, 0), atol=2e-4)
    z = torch.as_tensor(idata.posterior["z"].values[0, :5])  # first draws: log p(x_n | z_s) by hand
    by_hand = dist.Normal(z @ model.weight.T + model.bias, model.noise_scale).log_prob(x).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0, :5], by_hand.numpy(), rtol=1e-5)


def test_posterior_predictive_has_the_predictive_mean_and_spread(exported):
    """x_rep = W z + b + sigma eps with z ~ p(z | x): mean W mu + b, variance diag(W Sigma W^T) + sigma^2."""
    model, x, idata = exported
    mean, cov = model.posterior(x)
    replicas = idata.posterior_predictive["x"].values[0]  # [S, N, D]
    variance = torch.diag(model.weight @ cov @ model.weight.T) + model.noise_scale**2
    expected = (mean @ model.weight.T + model.bias).numpy()
    assert (np.abs(replicas.mean(0) - expected) < 5 * np.sqrt(variance.numpy() / 2000)).all()
    np.testing.assert_allclose(replicas.var(0).mean(0), variance.numpy(), rtol=0.1)
    np.testing.assert_allclose(idata.posterior_predictive["mean_value"].values, replicas.mean(-1)[None], atol=1e-6)


def test_prior_draws_are_standard_normal(exported):
    _, _, idata = exported
    prior = idata.prior["z"].values.reshape(-1, 3)
    np.testing.assert_allclose(prior.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(prior.std(0), 1.0, atol=0.02)
    assert idata.prior_predictive["x"].shape == (1, 500, 40, 10)


def test_netcdf_round_trip_and_arviz_functions(exported, tmp_path):
    _, _, idata = exported
    path = save_inference_data(idata, tmp_path / "inference_data.nc")
    loaded = load_inference_data(path)
    assert set(loaded.groups()) == set(idata.groups())
    for group in idata.groups():
        assert loaded[group].identical(idata[group]), group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one chain: ArviZ warns that r-hat needs two
        summary = arviz.summary(loaded, var_names=["z"], kind="stats")
        ess = arviz.ess(loaded, var_names=["z"])
    assert len(summary) == 40 * 3 and {"mean", "sd"} <= set(summary.columns)
    # Independent draws: the effective sample size is about the number of draws.
    assert 1500 < float(ess["z"].median()) < 2600
    plot_ppc_statistics(loaded, tmp_path / "ppc.png", ["mean_value"])
    assert (tmp_path / "ppc.png").stat().st_size > 10_000


def test_plot_khat_draws_arviz_plot_of_the_table(tmp_path):
    model = LinearGaussian.random(x_dim=10, z_dim=3, seed=1)
    x = model.sample(60, generator=torch.Generator().manual_seed(0))
    table = importance_diagnostics(model, ExactPosteriorGuide(model, scale_factor=0.5), x, num_samples=300)
    plot_khat(table.pareto_k, tmp_path / "khat.png")
    assert (tmp_path / "khat.png").stat().st_size > 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = arviz.plot_khat(table.pareto_k.to_numpy(), show_hlines=True)
    assert len(axes.collections) >= 1


def test_refusals(tmp_path):
    model = LinearGaussian.random(x_dim=10, z_dim=3, seed=1)
    x = model.sample(5)
    with pytest.raises(InputError, match="num_samples must be a positive integer"):
        to_inference_data(model, ExactPosteriorGuide(model), x, num_samples=0)
    with pytest.raises(InputError, match="labels hold 4 entries for 5 data points"):
        to_inference_data(model, ExactPosteriorGuide(model), x, labels=torch.zeros(4))

    def global_model(x=None, *, batch_size=None):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.zeros(10) * scale.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def global_guide(x=None, *, batch_size=None):
        pyro.sample("scale", dist.LogNormal(0.0, 0.1))

    idata = to_inference_data(global_model, global_guide, x, num_samples=3)
    assert idata.sample_stats.attrs["global_latents"] == "scale"  # per-point groups are conditional on its draws
    assert "posterior" not in idata.groups()  # the guide has no per-point latent, and globals are not exported
    # log p(x_n | scale) is a standard normal density whatever the draw: zeros * scale = 0.
    expected = dist.Normal(0.0, 1.0).log_prob(x).sum(-1).numpy()
    np.testing.assert_allclose(idata.log_likelihood["x"].values[0], np.broadcast_to(expected, (3, 5)), rtol=1e-5)
    (tmp_path / "bad.nc").write_bytes(b"not netcdf at all")
    with pytest.raises(InputError, match="bad.nc: not a readable InferenceData"):
        load_inference_data(tmp_path / "bad.nc")


def _posterior_mean_guide(model):
    """A guide that puts all of q(z | x) on the exact posterior mean: draws that no RNG changes."""

    def guide(x=None, *, batch_size=None):
        mean, _ = model.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(mean, event_dim=1))

    return guide


def test_chunking_does_not_change_the_export(monkeypatch):
    """Chunks of 3 points (the last of 1) give the arrays of one chunk, point by point and draw by draw."""
    from elbolab.inference import evaluate

    model = LinearGaussian.random(x_dim=10, z_dim=3, seed=1)
    x = model.sample(13, generator=torch.Generator().manual_seed(0))
    guide = _posterior_mean_guide(model)
    whole = to_inference_data(model, guide, x, num_samples=5)
    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", 3 * 5 * 10)  # 3 points of 5 draws of 10 values
    calls = []
    run_traced = diagnostics.run_traced
    monkeypatch.setattr(diagnostics, "run_traced", lambda *a, **o: calls.append(a[2][0].shape[0]) or run_traced(*a, **o))
    chunked = to_inference_data(model, guide, x, num_samples=5)
    assert calls == [3, 3, 3, 3, 1]
    for group, name in [("posterior", "z"), ("log_likelihood", "x"), ("sample_stats", "log_weight"),
                        ("observed_data", "x")]:
        np.testing.assert_array_equal(chunked[group][name].values, whole[group][name].values, err_msg=group)
    assert chunked.posterior["z"].shape == (1, 5, 13, 3)

    # With random draws, every chunk still pairs each point with its own draws and densities.
    pyro.set_rng_seed(0)
    random = to_inference_data(model, ExactPosteriorGuide(model), x, num_samples=5)
    z = torch.as_tensor(random.posterior["z"].values[0])  # [S, N, k]
    by_hand = dist.Normal(z @ model.weight.T + model.bias, model.noise_scale).log_prob(x).sum(-1)
    np.testing.assert_allclose(random.log_likelihood["x"].values[0], by_hand.numpy(), rtol=1e-5)
    np.testing.assert_allclose(random.sample_stats["log_weight"].values[0],
                               model.log_likelihood(x).numpy()[None].repeat(5, 0), atol=2e-4)


def test_a_chunk_that_runs_out_of_memory_is_halved(monkeypatch):
    model = LinearGaussian.random(x_dim=10, z_dim=3, seed=1)
    x = model.sample(10, generator=torch.Generator().manual_seed(0))
    guide = _posterior_mean_guide(model)
    whole = to_inference_data(model, guide, x, num_samples=4)
    sizes = []
    run_traced = diagnostics.run_traced

    def small_device(model, guide, args, kwargs, k, nesting, **options):
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_traced(model, guide, args, kwargs, k, nesting, **options)

    monkeypatch.setattr(diagnostics, "run_traced", small_device)
    halved = to_inference_data(model, guide, x, num_samples=4)
    assert sizes == [10, 5, 2, 2, 2, 2, 2]  # all 4 draws of a point stay in one chunk
    np.testing.assert_array_equal(halved.log_likelihood["x"].values, whole.log_likelihood["x"].values)
    np.testing.assert_array_equal(halved.posterior["z"].values, whole.posterior["z"].values)
