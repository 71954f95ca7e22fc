"""Score-function gradients for discrete sites the guide samples: unbiased, and VIMCO's variance below the plain one's.

A point x, a cluster c ~ Uniform{0, 1, 2} with x | c ~ N(mu_c, 1), and a guide q(c) = softmax(logits):
the exact gradient of E[L] is computable by summing over every value of the K particles.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from elbolab.errors import InputError
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.inference.iwae import IWAE

MU = torch.tensor([-2.0, 0.5, 2.0])
C = 3


def model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.ones(C) / C))
        pyro.sample("x", dist.Normal(MU[c].unsqueeze(-1), 1.0).to_event(1), obs=x)


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=self.logits.expand(x.shape[0], C)))


X = torch.tensor([[0.8]])


def log_joint(c):
    return dist.Normal(MU[c], 1.0).log_prob(X[0, 0]) - math.log(C)


def exact_gradient(guide, k):
    """d E[L_K] / d logits, summing over all C^K values of the particles."""
    combos = torch.tensor(list(itertools.product(range(C), repeat=k)))  # [C^K, K]
    log_q = guide.logits.log_softmax(-1)
    log_w = log_joint(combos) - log_q[combos]
    bound = log_w.logsumexp(-1) - math.log(k)
    expectation = (log_q[combos].sum(-1).exp() * bound).sum()
    return torch.autograd.grad(expectation, guide.logits)[0]


def estimates(objective, guide, repeats):
    grads = []
    for _ in range(repeats):
        loss = objective.differentiable_loss(model, guide, X)
        grads.append(-torch.autograd.grad(loss, guide.logits)[0])
    return torch.stack(grads)


def test_vimco_is_unbiased_and_less_noisy_than_the_plain_score_function_at_k_10():
    pyro.set_rng_seed(0)
    guide, k, repeats = Guide(), 10, 400
    exact = exact_gradient(guide, k)
    vimco = estimates(IWAE(num_particles=k, discrete="vimco"), guide, repeats)
    score = estimates(IWAE(num_particles=k, discrete="score"), guide, repeats)
    for grads in (vimco, score):
        standard_error = grads.std(0) / math.sqrt(repeats)
        assert ((grads.mean(0) - exact).abs() < 4 * standard_error + 1e-6).all()
    assert vimco.var(0).sum() < 0.01 * score.var(0).sum()  # measured: 0.0136 against 23.6, 1/1700


def test_the_elbos_score_function_gradient_is_unbiased():
    pyro.set_rng_seed(1)
    guide, repeats = Guide(), 1000
    log_q = guide.logits.log_softmax(-1)
    values = torch.arange(C)
    exact_elbo = (log_q.exp() * (log_joint(values) - log_q)).sum()
    exact = torch.autograd.grad(exact_elbo, guide.logits)[0]
    grads = estimates(get_objective("elbo", discrete="score"), guide, repeats)
    assert ((grads.mean(0) - exact).abs() < 4 * grads.std(0) / math.sqrt(repeats)).all()
    loss = get_objective("elbo").differentiable_loss(model, guide, X)  # the value is the ELBO's, baseline or not
    assert torch.isfinite(loss)


def test_fit_trains_a_discrete_guide_under_elbo_and_iwae():
    torch.manual_seed(0)
    c = torch.randint(0, C, (300,))
    x = (MU[c] + 0.3 * torch.randn(300)).unsqueeze(-1)

    class Amortized(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, C))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Categorical(logits=self.net(x)))

    exact = (dist.Normal(MU, 1.0).log_prob(x) - math.log(C)).logsumexp(-1)
    for objective in ("elbo", "iwae:k=5"):
        pyro.set_rng_seed(0)
        guide = Amortized()
        result = fit(model, guide, x, objective=objective, epochs=20, lr=1e-2, progress=False)
        # The guide learns p(c | x): the ELBO's gap closes to within a tenth of a nat per point.
        assert result.history.train_loss.iloc[-1] < -exact.mean().item() + 0.1, objective
        assert (log_likelihood(model, guide, x, num_samples=1000) - exact).abs().mean() < 0.02


@pytest.mark.parametrize(
    ("spec", "message"),
    [("elbo-analytic", "elbo-analytic differentiates .* use 'elbo'"), ("elbo-stl", "elbo-stl differentiates"),
     ("iwae-dreg", "iwae with dreg gradients"), ("renyi", "the Renyi bound")],
)
def test_objectives_without_a_score_function_refuse_discrete_guide_sites(spec, message):
    with pytest.raises(InputError, match=message):
        get_objective(spec).differentiable_loss(model, Guide(), X)
    with pytest.raises(InputError, match="VIMCO's leave-one-out baselines need two or more particles"):
        IWAE(num_particles=1).differentiable_loss(model, Guide(), X)


def test_the_auto_guide_encodes_a_sampled_discrete_latent_and_the_estimate_is_exact():
    # c ~ Uniform{0..3}, z | c ~ N(mu_c, 1), x | z ~ N(z, 0.5): p(x) = sum_c N(x; mu_c, sqrt(1.25)) / 4.
    from elbolab.guides import AutoAmortizedGuide

    means = torch.tensor([-4.0, -1.0, 2.0, 5.0])

    def mixed(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(torch.ones(4) / 4))
            z = pyro.sample("z", dist.Normal(means[c], 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 0.5).to_event(1), obs=x)

    torch.manual_seed(0)
    c = torch.randint(0, 4, (400,))
    x = (means[c] + math.sqrt(1.25) * torch.randn(400)).unsqueeze(-1)
    exact = (dist.Normal(means, math.sqrt(1.25)).log_prob(x) - math.log(4)).logsumexp(-1)
    # Under iwae (VIMCO); the ELBO's single-sample score function locks q(c | x) onto a wrong cluster for
    # some x here (a mode-seeking local optimum: once q(c | x) is one-hot, the others are never sampled).
    pyro.set_rng_seed(0)
    guide = AutoAmortizedGuide(mixed, x[:10], hidden=(32,))
    assert [site.family for site in guide.discrete_q.sites] == ["Categorical"]
    fit(mixed, guide, x, objective="iwae:k=8", epochs=40, lr=1e-2, progress=False)
    assert (log_likelihood(mixed, guide, x, num_samples=2000) - exact).abs().mean() < 0.05


def test_the_concrete_relaxation_trains_one_hot_latents_and_refuses_integer_ones():
    # A sigmoid-belief-like model: d ~ OneHot(uniform over 3), x ~ N(d @ MU, 1); the guide is relaxed with the prior.
    def one_hot_model(x):
        with pyro.plate("data", x.shape[0]):
            d = pyro.sample("d", dist.OneHotCategorical(torch.ones(C) / C))
            pyro.sample("x", dist.Normal((d @ MU).unsqueeze(-1), 1.0).to_event(1), obs=x)

    class OneHotGuide(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, C))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("d", dist.OneHotCategorical(logits=self.net(x)))

    torch.manual_seed(0)
    x = (MU[torch.randint(0, C, (300,))] + torch.randn(300)).unsqueeze(-1)
    exact = (dist.Normal(MU, 1.0).log_prob(x) - math.log(C)).logsumexp(-1)
    pyro.set_rng_seed(0)
    guide = OneHotGuide()
    result = fit(one_hot_model, guide, x, objective="elbo:discrete=relaxed:temperature=0.5", epochs=30, lr=1e-2, progress=False)
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    # Scored with the discrete model, the trained guide is a good proposal.
    assert (log_likelihood(one_hot_model, guide, x, num_samples=2000) - exact).abs().mean() < 0.03
    with pytest.raises(InputError, match="site 'c' is Categorical, whose integer values a model indexes with"):
        get_objective("elbo", discrete="relaxed").differentiable_loss(model, Guide(), X)


# (With a baseline it holds once b(x) has learned the scaled signal, not at its initialisation.)
@pytest.mark.parametrize("spec", ["elbo:discrete=score", "iwae:k=4", "iwae:k=4:discrete=score"])
def test_a_minibatch_scale_multiplies_the_score_function_gradient_once(spec):
    # Under fit's data-plate scale N / B the loss, and so its whole gradient, is N / B times the batch's.
    from elbolab.contract import DataPlateScale, pair_contract
    from elbolab.inference.objectives import parse_objective_spec

    x = torch.tensor([[0.8], [-1.5], [2.2]])
    contract = pair_contract(model, Guide(), (x,))
    grads = []
    for scale in (1.0, 4.0):
        guide = Guide()
        name, options = parse_objective_spec(spec)
        objective = get_objective(name, **options)
        pyro.set_rng_seed(5)
        torch.manual_seed(5)  # the baseline network's initialisation
        with DataPlateScale(contract.plates, scale, torch.arange(3)):
            loss = objective.differentiable_loss(model, guide, x)
        grads.append(torch.autograd.grad(loss, guide.logits)[0])
    assert torch.allclose(grads[1], 4.0 * grads[0], rtol=1e-4, atol=1e-6)
