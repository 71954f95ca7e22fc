"""Discrete latents summed out: a mixture of probabilistic PCA models, whose evidence is a Gaussian mixture.

    c ~ Categorical(pi),  z ~ N(0, I_d),  x | z, c ~ N(W_c z + mu_c, s^2 I_D)
    p(x) = sum_c pi_c N(x; mu_c, W_c W_c^T + s^2 I)

With orthonormal columns times scales in W_c, the posterior p(z | x, c) is a diagonal Gaussian,
so p(z | x) = sum_c p(c | x) p(z | x, c) is a MixtureOfDiagNormals: an exact guide for z. With c
enumerated every log weight log sum_c p(x, z, c) - log q(z | x) is then log p(x) exactly.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from torch import nn

from elbolab.errors import InputError
from elbolab.inference import (
    OBJECTIVES,
    get_objective,
    importance_estimate,
    log_evidence,
    log_likelihood,
)

C, D_LATENT, D_DATA = 3, 2, 4


class MixtureOfPPCA(nn.Module):
    def __init__(self, seed: int = 0, enumerate: str | None = "parallel") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.pi = torch.tensor([0.2, 0.5, 0.3])
        self.scales = torch.tensor([[1.5, 0.7], [2.0, 1.0], [0.8, 1.2]])
        columns = torch.linalg.qr(torch.randn(C, D_DATA, D_LATENT, generator=generator)).Q
        self.W = columns * self.scales[:, None, :]
        self.mu = 2 * torch.randn(C, D_DATA, generator=generator)
        self.s = 0.5
        self.enumerate = enumerate

    def forward(self, x):
        infer = {"enumerate": self.enumerate} if self.enumerate else {}
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(self.pi), infer=infer)
            z = pyro.sample("z", dist.Normal(torch.zeros(D_LATENT), 1.0).to_event(1))
            loc = (self.W[c] @ z.unsqueeze(-1)).squeeze(-1) + self.mu[c]
            pyro.sample("x", dist.Normal(loc, self.s).to_event(1), obs=x)

    def components(self):
        return dist.MultivariateNormal(self.mu, self.W @ self.W.transpose(-1, -2) + self.s**2 * torch.eye(D_DATA))

    def log_evidence(self, x):
        return (self.components().log_prob(x[:, None, :]) + self.pi.log()).logsumexp(-1)

    def sample(self, n, generator_seed=1):
        torch.manual_seed(generator_seed)
        c = dist.Categorical(self.pi).sample((n,))
        return self.components().sample((n,))[torch.arange(n), c]


class ExactGuide(nn.Module):
    """q(z | x) = p(z | x), the mixture over c of the diagonal Gaussians p(z | x, c)."""

    def __init__(self, model: MixtureOfPPCA) -> None:
        super().__init__()
        self.m = model

    def forward(self, x):
        m = self.m
        log_joint = m.components().log_prob(x[:, None, :]) + m.pi.log()
        variances = 1 / (1 + m.scales**2 / m.s**2)
        means = variances * torch.einsum("cDd,ncD->ncd", m.W, x[:, None, :] - m.mu) / m.s**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MixtureOfDiagNormals(means, variances.sqrt().expand_as(means), log_joint))


@pytest.fixture(scope="module")
def pair():
    model = MixtureOfPPCA()
    return model, ExactGuide(model), model.sample(40)


def test_log_likelihood_sums_out_the_component_exactly(pair):
    model, guide, x = pair
    pyro.set_rng_seed(0)
    estimate = importance_estimate(model, guide, x, num_samples=20)
    exact = model.log_evidence(x)
    assert (estimate.log_likelihood - exact).abs().max() < 0.01
    assert (estimate.elbo - exact).abs().max() < 0.01  # zero-variance weights: the ELBO is log p(x) too
    assert torch.allclose(estimate.ess, torch.full_like(estimate.ess, 20.0), rtol=1e-3)


@pytest.mark.slow  # an Inductor compile, about 10 s; the compiled step's enumeration is in test_compiled.py's breadth
def test_the_compiled_estimate_sums_out_the_component_too(pair):
    model, guide, x = pair
    assert log_likelihood(model, guide, x, num_samples=5, compile=True).sub(model.log_evidence(x)).abs().max() < 0.01


def test_reconstruction_is_the_likelihood_given_z_with_the_component_summed_out(pair):
    # log p(x | z) = log p(x, z) - log p(z), with p(z) = N(0, I) here whatever c is.
    model, guide, x = pair
    pyro.set_rng_seed(0)
    estimate = importance_estimate(model, guide, x, num_samples=1)
    with pyro.poutine.trace() as tracer:
        pyro.set_rng_seed(0)
        with pyro.plate("particles", 1, dim=-2):
            guide(x)
    z = tracer.trace.nodes["z"]["value"][0]
    prior = dist.Normal(torch.zeros(D_LATENT), 1.0).to_event(1).log_prob(z)
    # log p(x | z) = log p(x) + log p(z | x) - log p(z), and log p(z | x) = log q(z | x) for the exact guide.
    log_q = tracer.trace.nodes["z"]["fn"].log_prob(tracer.trace.nodes["z"]["value"])[0]
    assert torch.allclose(estimate.reconstruction, model.log_evidence(x) + log_q - prior, atol=1e-3)


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"reconstruction", "elbo-analytic"}))
def test_every_objective_equals_the_evidence_with_zero_variance(pair, name):
    model, guide, x = pair
    objective = get_objective(name, num_particles=3)
    exact = -model.log_evidence(x).sum()
    losses = torch.stack([objective.differentiable_loss(model, guide, x).detach() for _ in range(3)])
    assert torch.allclose(losses, exact.expand(3), rtol=1e-5)


def test_the_analytic_kl_is_refused_for_a_mixture_prior(pair):
    model, guide, x = pair
    with pytest.raises(InputError, match="'c' .*enumerated.*mixture.*use 'elbo'"):
        get_objective("elbo-analytic").differentiable_loss(model, guide, x)


def test_a_sampled_component_is_the_bias_enumeration_removes(pair):
    # Without the marker the model samples c from its prior: a valid bound, nats below log p(x).
    model, guide, x = pair
    unmarked = MixtureOfPPCA(enumerate=None)
    with pytest.raises(InputError, match="latent site 'c' is not sampled by the guide"):
        log_likelihood(unmarked, guide, x, num_samples=5)
    wrapped = config_enumerate(unmarked)  # Pyro's marker, on a module wrapped in a function
    assert (log_likelihood(wrapped, guide, x, num_samples=5) - model.log_evidence(x)).abs().max() < 0.01


def test_log_evidence_and_subsampled_training_scale_keep_the_sum_exact(pair):
    model, guide, x = pair
    evidence = log_evidence(model, guide, x, num_samples=4)
    assert evidence.log_evidence == pytest.approx(model.log_evidence(x).sum().item(), abs=1e-2)
    from elbolab.contract import DataPlateScale, pair_contract

    contract = pair_contract(model, guide, (x[:10],))
    assert contract.enumerated == ("c",) and contract.local_latents == ("z",)
    # Under a minibatch's scale N / B every objective is N / B times the batch's (the scale is applied
    # after the sum over c, not inside it).
    for name in ("elbo", "iwae"):
        with DataPlateScale(contract.plates, 4.0, torch.arange(10)):
            loss = get_objective(name, num_particles=2).differentiable_loss(model, guide, x[:10])
        assert loss.item() == pytest.approx(-4.0 * model.log_evidence(x[:10]).sum().item(), rel=1e-5)


def _with_site(c_site):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            c_site(x)
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0).to_event(1), obs=x)

    return model


def guide_z(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))


def _sequential(x):
    pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "sequential"})


@pytest.mark.parametrize(
    ("program", "message"),
    [
        (_sequential, r"'c' is marked infer=\{'enumerate': 'sequential'\}.*mark it so"),
        (lambda x: pyro.sample("c", dist.Poisson(2.0), infer={"enumerate": "parallel"}), "'c' \\(Poisson\\).*no finite support"),
    ],
)
def test_sites_that_cannot_be_summed_out_are_refused_by_name(program, message):
    x = torch.randn(6, 3)
    with pytest.raises(InputError, match=message):
        log_likelihood(_with_site(program), guide_z, x, num_samples=2)


def test_a_global_or_nested_enumerated_site_is_refused_by_name():
    x = torch.randn(6, 3)

    def global_c(x):
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(c, 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def nested_c(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("parts", 3, dim=-1):
                c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def no_guide(x):
        pass

    with pytest.raises(InputError, match="'c' is marked for enumeration but sits outside the data plate 'data'"):
        log_likelihood(global_c, no_guide, x, num_samples=2)
    with pytest.raises(InputError, match=r"'c' is marked for enumeration inside plates \['data', 'parts'\]"):
        log_likelihood(nested_c, no_guide, x, num_samples=2)
