"""LatentModel's inputs: simplex (Dirichlet) latents, and the refusal of likelihoods, params and priors it cannot use."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.models import Latent, LatentModel, Likelihood


def test_a_misspelt_likelihood_is_refused_with_the_closest_name_not_made_a_gaussian():
    with pytest.raises(InputError, match=r"^unknown likelihood 'bernouli'; did you mean 'bernoulli'\? valid names: "
                                         r"bernoulli, continuous-bernoulli, gaussian$"):
        LatentModel(4, [Latent("z", 2)], likelihood="bernouli", obs_scale=0.1)
    with pytest.raises(InputError, match="unknown likelihood 'poisson'"):
        Likelihood(4, "poisson")


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_obs_scale_with_a_likelihood_other_than_gaussian_is_refused_by_name(likelihood):
    with pytest.raises(InputError, match=rf"obs_scale is an option of the gaussian likelihood; the {likelihood} likelihood has no scale"):
        Likelihood(4, likelihood, obs_scale=0.1)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_a_non_positive_or_non_finite_obs_scale_is_refused(scale):
    with pytest.raises(InputError, match=r"^obs_scale must be a finite number > 0, got"):
        Likelihood(4, "gaussian", obs_scale=scale)


def test_a_fixed_obs_scale_is_the_gaussian_scale():
    out, x = torch.randn(3, 4), torch.randn(3, 4)
    expected = torch.distributions.Normal(out, 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(Likelihood(4, "gaussian", obs_scale=0.3)(out).log_prob(x), expected)


def test_params_that_do_not_match_the_prior_arguments_are_refused_naming_the_latent_and_arguments():
    with pytest.raises(InputError, match=r"latent 'mix' has a Dirichlet prior, which takes 1 parameter \(concentration\); params has 2"):
        LatentModel(4, [Latent("mix", 5, prior=dist.Dirichlet, params=(1.0, 2.0))])
    with pytest.raises(InputError, match=r"latent 'rate' has a Gamma prior, which takes 2 parameters \(concentration, rate\); params has 1"):
        LatentModel(4, [Latent("rate", 3, prior=dist.Gamma, params=(2.0,))])
    with pytest.raises(InputError, match=r"latent 't' has a StudentT prior, which takes 1 to 3 parameters \(df, loc, scale\)"):
        LatentModel(4, [Latent("t", 3, prior=dist.StudentT, params=())])
    with pytest.raises(InputError, match=r"latent 'mix' needs params for its Dirichlet prior: \(concentration\)"):
        LatentModel(4, [Latent("mix", 5, prior=dist.Dirichlet)])
    with pytest.raises(InputError, match=r"parameter 'concentration' of latent 'mix' \(Dirichlet prior\) must be positive numbers, got -1.0"):
        LatentModel(4, [Latent("mix", 5, prior=dist.Dirichlet, params=(-1.0,))])
    with pytest.raises(InputError, match=r"latent 'mix': the Dirichlet prior's argument 'concentration' has 1 event dim"):
        LatentModel(4, [Latent("mix", prior=dist.Dirichlet, params=(1.0,))])
    with pytest.raises(InputError, match=r"latent 'mix': its Dirichlet prior has batch shape \(\) and event shape \(3,\)"):
        LatentModel(4, [Latent("mix", 5, prior=dist.Dirichlet, params=((1.0, 2.0, 3.0),))])
    with pytest.raises(InputError, match=r"latent 'b' is given 'a'.*params=\(0.0, 2.0\) cannot be set with given"):
        LatentModel(4, [Latent("a", 2), Latent("b", 2, params=(0.0, 2.0), given="a")])


@pytest.mark.parametrize(
    ("prior", "params", "support"),
    [(dist.Bernoulli, (0.5,), r" \(support: binary values \{0, 1\}\)"), (dist.Poisson, (3.0,), r" \(support: non-negative integers\)"),
     (dist.Categorical, ((0.5, 0.5),), ""), (dist.OneHotCategorical, ((0.5, 0.5),), r" \(support: one-hot vectors\)")],
)
def test_a_discrete_prior_is_refused_by_name(prior, params, support):
    message = rf"latent 'c' has a discrete {prior.__name__} prior{support}; LatentModel builds continuous latents"
    with pytest.raises(InputError, match=message):
        LatentModel(4, [Latent("c", 2, prior=prior, params=params)])
    with pytest.raises(InputError, match=rf"latent 'c' has a discrete {prior.__name__} prior"):
        LatentModel(4, [Latent("z", 2), Latent("c", 2, prior=prior, given="z")])


def test_a_dirichlet_latent_has_event_shape_k_and_a_length_k_concentration():
    model = LatentModel(6, [Latent("mix", 5, prior=dist.Dirichlet, params=(0.7,))], decoder=(8,))
    assert model.prior_mix_0.shape == (5,)
    x = (torch.rand(7, 6) > 0.5).float()
    trace = poutine.trace(model).get_trace(x)
    site = trace.nodes["mix"]
    assert site["fn"].batch_shape == (7,) and site["fn"].event_shape == (5,)
    value = site["value"]
    assert value.shape == (7, 5) and (value > 0).all()
    torch.testing.assert_close(value.sum(-1), torch.ones(7))
    trace.compute_log_prob()
    torch.testing.assert_close(site["log_prob"], torch.distributions.Dirichlet(torch.full((5,), 0.7)).log_prob(value))


def test_a_batch_of_simplexes_with_asymmetric_concentrations():
    concentration = torch.tensor([0.5, 1.0, 4.0])
    model = LatentModel(6, [Latent("mix", (2, 3), prior=dist.Dirichlet, params=(concentration.tolist(),))], decoder=(8,))
    trace = poutine.trace(model).get_trace(torch.zeros(4, 6))
    site = trace.nodes["mix"]
    assert site["fn"].batch_shape == (4,) and site["fn"].event_shape == (2, 3)
    trace.compute_log_prob()
    expected = torch.distributions.Dirichlet(concentration).log_prob(site["value"]).sum(-1)
    torch.testing.assert_close(site["log_prob"], expected)


class FirstWeightAsPixelProbability(nn.Module):
    """Decoder: every one of D pixels is on with probability z_0, the first weight of a point of the 2-simplex."""

    def __init__(self, x_dim: int) -> None:
        super().__init__()
        self.x_dim = x_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.logit(z[..., :1]).expand(*z.shape[:-1], self.x_dim)


def test_log_p_x_of_a_dirichlet_latent_is_the_beta_binomial_evidence():
    """With z ~ Dirichlet(a, b) and D pixels ~ Bernoulli(z_0), p(x) = B(a + s, b + D - s) / B(a, b), s = sum(x).

    The posterior is Dirichlet(a + s, b + D - s): a guide that samples it makes every importance
    weight equal to p(x), so the estimate is exact whatever the number of samples.
    """
    a, b, d = 2.0, 3.0, 6
    model = LatentModel(d, [Latent("mix", 2, prior=dist.Dirichlet, params=((a, b),))], decoder=FirstWeightAsPixelProbability(d))
    x = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]], dtype=torch.float32)

    def exact_posterior(x):
        s = x.sum(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("mix", dist.Dirichlet(torch.stack([a + s, b + d - s], dim=-1)))

    s = x.sum(-1).double()
    log_beta = lambda p, q: torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)  # noqa: E731
    exact = log_beta(a + s, b + d - s) - log_beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    estimate = log_likelihood(model, exact_posterior, x, num_samples=50)
    torch.testing.assert_close(estimate.double(), exact, atol=2e-4, rtol=0)
    assert not math.isclose(exact[0].item(), exact[1].item(), abs_tol=0.1)  # the data points differ: the test can fail


def test_a_dirichlet_given_another_latent_gets_k_positive_concentrations_from_a_network():
    model = LatentModel(6, [Latent("code", 3), Latent("mix", 4, prior=dist.Dirichlet, given="code")], decoder=(8,))
    trace = poutine.trace(model).get_trace(torch.zeros(5, 6))
    prior, code, mix = trace.nodes["mix"]["fn"], trace.nodes["code"]["value"], trace.nodes["mix"]["value"]
    assert prior.batch_shape == (5,) and prior.event_shape == (4,) and mix.shape == (5, 4)
    torch.testing.assert_close(prior.concentration, model.conditionals["mix"](code).exp())
    grads = torch.autograd.grad(prior.log_prob(mix).sum(), list(model.conditionals.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_the_auto_guide_trains_simplex_latents_on_data_drawn_from_the_model():
    latents = [Latent("mix", 4, prior=dist.Dirichlet, params=(0.5,)), Latent("code", 2, given="mix")]
    truth = LatentModel(12, latents, decoder=(16,))
    with torch.no_grad():
        x = truth(None, batch_size=400)
    model = LatentModel(12, latents, decoder=(16,))
    guide = AutoAmortizedGuide(model, x[:10], hidden=(32,))
    assert [(site.name, tuple(site.shape), site.size) for site in guide.local_sites] == [("mix", (4,), 3), ("code", (2,), 2)]
    elbo = get_objective("elbo", num_particles=20)
    before = elbo.loss(model, guide, x) / len(x)
    history = fit(model, guide, x, epochs=4, batch_size=50, lr=1e-2, progress=False).history
    after = elbo.loss(model, guide, x) / len(x)
    assert after < before - 1.0, (before, after)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    mix = poutine.trace(guide).get_trace(x[:20]).nodes["mix"]["value"]
    assert mix.shape == (20, 4) and (mix >= 0).all()
    torch.testing.assert_close(mix.sum(-1), torch.ones(20))
    assert torch.isfinite(log_likelihood(model, guide, x[:10], num_samples=50)).all()
