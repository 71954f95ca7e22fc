"""Latent-space tools against a linear decoder, where every decoded image has a closed form."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from elbolab import VAE, GaussianGuide, InputError, MixtureGuide, fit, load_dataset
from elbolab.analysis import (
    active_units,
    interpolate,
    kl_per_dimension,
    latent_arithmetic,
    latent_projection,
    posterior_means,
    slerp,
    traverse,
    unit_activity,
)
from elbolab.data import ExactPosteriorGuide, LinearGaussian


@pytest.fixture(scope="module")
def linear():
    """p(x | z) = N(W z + b, sigma^2): decoded means are W z + b, exactly."""
    model = LinearGaussian.random(x_dim=12, z_dim=3, seed=2)
    x = model.sample(6, generator=torch.Generator().manual_seed(0))
    return model, ExactPosteriorGuide(model), x


def decode(model, z):
    return z @ model.weight.T + model.bias


def test_posterior_means_are_exact_where_the_guide_has_a_mean(linear):
    model, guide, x = linear
    np.testing.assert_allclose(posterior_means(guide, x)["z"], model.posterior(x)[0], atol=1e-6)


def test_posterior_means_average_draws_where_the_distribution_has_no_mean():
    """A transformed Normal has no closed-form mean in torch: 2 * loc is recovered from draws."""
    loc = torch.tensor([[1.0, -2.0], [0.5, 3.0]])

    def guide(x, *, batch_size=None):
        base = dist.Normal(loc, 0.3)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 2.0)]).to_event(1))

    means = posterior_means(guide, torch.zeros(2, 4), num_samples=4000)["z"]
    np.testing.assert_allclose(means, 2 * loc, atol=0.05)  # standard error 0.6 / sqrt(4000) = 0.01


def test_linear_interpolation_decodes_the_straight_path(linear):
    model, guide, x = linear
    m = model.posterior(x)[0]
    path = interpolate(model, guide, x[0], x[1], steps=5)
    t = torch.linspace(0, 1, 5)[:, None]
    np.testing.assert_allclose(path, decode(model, (1 - t) * m[0] + t * m[1]), atol=1e-5)
    batched = interpolate(model, guide, x[[0, 2]], x[[1, 3]], steps=5)  # pairs (0, 1) and (2, 3)
    assert batched.shape == (2, 5, 12)
    np.testing.assert_allclose(batched[0], path, atol=1e-5)


def test_spherical_interpolation_follows_the_great_circle(linear):
    model, guide, x = linear
    m = model.posterior(x)[0]
    path = interpolate(model, guide, x[0], x[1], steps=7, method="spherical")
    expected = slerp(m[:1], m[1:2], torch.linspace(0, 1, 7))[0]
    np.testing.assert_allclose(path, decode(model, expected), atol=1e-5)
    np.testing.assert_allclose(path[[0, -1]], decode(model, m[:2]), atol=1e-5)  # endpoints are the means


def test_slerp_keeps_the_norm_and_turns_at_a_constant_rate():
    a, b = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    t = torch.linspace(0, 1, 5)
    path = slerp(a, b, t)[0]
    np.testing.assert_allclose(path.norm(dim=-1), 3.0, atol=1e-5)
    angles = torch.atan2(path[:, 1], path[:, 0])
    np.testing.assert_allclose(angles, t * math.pi / 2, atol=1e-5)
    np.testing.assert_allclose(slerp(a, 2 * a, t)[0], (1 - t)[:, None] * a + t[:, None] * 2 * a, atol=1e-6)  # parallel: linear


def test_traversal_moves_one_dimension_at_a_time(linear):
    model, guide, x = linear
    m = model.posterior(x[:1])[0][0]
    values = torch.tensor([-2.0, 0.0, 2.0])
    images = traverse(model, guide, x[0], dims=[0, 2], values=values)
    assert images.shape == (2, 3, 12)
    for row, d in enumerate([0, 2]):
        for column, value in enumerate(values):
            z = m.clone()
            z[d] = value
            np.testing.assert_allclose(images[row, column], decode(model, z), atol=1e-5)
    with pytest.raises(InputError, match="has 3 dimensions; no dimension 3"):
        traverse(model, guide, x[0], dims=[3])
    with pytest.raises(InputError, match="no latent site 'w'"):
        traverse(model, guide, x[0], site="w")


def test_latent_arithmetic_decodes_a_minus_b_plus_c(linear):
    model, guide, x = linear
    m = model.posterior(x)[0]
    np.testing.assert_allclose(latent_arithmetic(model, guide, x[0], x[1], x[2]), decode(model, m[0] - m[1] + m[2]), atol=1e-5)


def test_projection_keeps_two_dimensions_and_finds_a_plane_in_more():
    points = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    basis, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(1)))

    def guide_in(dims):
        def guide(x, *, batch_size=None):
            loc = x if dims == 2 else x @ basis.T  # the 2-D points embedded in a plane of R^5
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, 0.1).to_event(1))
        return guide

    coords, labels = latent_projection(guide_in(2), points)
    np.testing.assert_allclose(coords, points.numpy(), atol=1e-6)
    assert labels == ("z[0]", "z[1]")
    coords, labels = latent_projection(guide_in(5), points)
    distances = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distances(coords), distances(points.numpy().astype(float)), atol=1e-4)  # an isometry
    shares = [float(label.split("(")[1].split("%")[0]) for label in labels]
    assert labels[0].startswith("PC 1") and sum(shares) == pytest.approx(100, abs=1)  # the plane holds all variance


def test_kl_per_dimension_sums_to_the_closed_form_kl():
    torch.manual_seed(0)
    model, guide = VAE(64, 4, hidden=(16,)), GaussianGuide(64, 4, hidden=(16,))
    x = torch.bernoulli(torch.full((50, 64), 0.3))
    table = kl_per_dimension(model, guide, x)
    assert list(table.columns) == ["site", "dim", "kl"] and len(table) == 4
    loc, scale = guide.encode(x)
    per_dim = 0.5 * (loc**2 + scale**2 - 1) - scale.log()
    np.testing.assert_allclose(table.kl, per_dim.mean(0).detach(), rtol=1e-5)
    full = kl_divergence(dist.Normal(loc, scale).to_event(1), dist.Normal(0.0, torch.ones(4)).to_event(1))
    np.testing.assert_allclose(table.kl.sum(), full.mean().item(), rtol=1e-5)
    with pytest.raises(InputError, match="guide of 'z' is DiagonalGaussianMixture"):
        kl_per_dimension(model, MixtureGuide(64, 4, components=2, hidden=(16,)), x)


def test_a_global_latent_is_left_out_of_the_per_point_tools():
    def guide(x, *, batch_size=None):
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.ones(x.shape[0], 2), 1.0).to_event(1))

    means = posterior_means(guide, torch.zeros(3, 4))
    assert list(means) == ["z"]
    torch.testing.assert_close(means["z"], torch.ones(3, 2))
    with pytest.raises(InputError, match="NaN or infinite values in 1 row"):
        posterior_means(guide, torch.tensor([[0.0, 1.0], [math.nan, 0.0]]))


def test_unit_activity_counts_informative_dimensions():
    def guide(x, *, batch_size=None):
        loc = torch.zeros(x.shape[0], 3)
        loc[:, 0] = 2 * x[:, 0]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    table = unit_activity(guide, torch.randn(2000, 1, generator=torch.Generator().manual_seed(0)))
    assert table.activity[0] == pytest.approx(4.0, rel=0.1)
    assert (table.activity[1:].abs() < 0.01).all()


def test_a_large_beta_collapses_units_that_beta_one_keeps_active():
    """beta-VAE on digits: with beta = 1 most of 8 units are active; with beta = 8 the KL price
    shuts most of them (posterior collapse), and the KL per dimension shows which."""
    train = load_dataset("digits", "train", binarize="dynamic")
    test = load_dataset("digits", "test", binarize="dynamic").fixed_binarization(0).x
    results = {}
    for beta in (1.0, 8.0):
        pyro.set_rng_seed(0)
        model, guide = VAE(64, 8, hidden=(128,)).init_output_bias(train.x), GaussianGuide(64, 8, hidden=(128,))
        fit(model, guide, train, epochs=40, beta=beta, lr=3e-3, progress=False)
        results[beta] = (active_units(guide, test), kl_per_dimension(model, guide, test))
    (active_1, kl_1), (active_8, kl_8) = results[1.0], results[8.0]
    assert active_1 >= 6 and active_8 <= 3, (active_1, active_8)
    assert kl_1.kl.sum() > 2 * kl_8.kl.sum()
    assert (kl_8.kl < 0.05).sum() >= 5  # collapsed units carry (almost) no KL
