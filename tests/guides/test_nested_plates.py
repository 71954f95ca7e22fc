"""Latents in a plate nested in the data plate: T sub-latents per point, each with its own observation.

    h_nt ~ N(0, I_k),   x_nt | h_nt ~ N(W h_nt + b, s^2 I_D),   t = 1..T,
    log p(x_n) = sum_t log N(x_nt; b, W W^T + s^2 I)

With orthonormal columns times scales in W the posterior of each h_nt is a diagonal Gaussian.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from elbolab.contract import pair_contract
from elbolab.guides import AutoAmortizedGuide
from elbolab.inference import OBJECTIVES, fit, get_objective, log_likelihood

T, K, D, S = 3, 2, 4, 0.5
_generator = torch.Generator().manual_seed(0)
SCALES = torch.tensor([2.0, 1.0])
W = torch.linalg.qr(torch.randn(D, K, generator=_generator)).Q * SCALES
B = torch.randn(D, generator=_generator)
MARGINAL = dist.MultivariateNormal(B, W @ W.T + S**2 * torch.eye(D))


def model(x):
    with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("parts", T, dim=-1):
        h = pyro.sample("h", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(h @ W.T + B, S).to_event(1), obs=x)


def transposed(x):
    """The same model with the data plate at dim -1 and the parts at -2: x is [N, D, T], observed as [T, N, D]."""
    with pyro.plate("data", x.shape[0], dim=-1), pyro.plate("parts", T, dim=-2):
        h = pyro.sample("h", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(h @ W.T + B, S).to_event(1), obs=x.permute(2, 0, 1))


def exact_guide(x):
    variances = 1 / (1 + SCALES**2 / S**2)
    means = variances * ((x - B) @ W) / S**2  # [N, T, K]
    with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("parts", T, dim=-1):
        pyro.sample("h", dist.Normal(means, variances.sqrt()).to_event(1))


def exact(x):
    return MARGINAL.log_prob(x).sum(-1)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return MARGINAL.sample((400, T))


# elbo-analytic is left out: its Monte Carlo term E_q[log p(x | h)] has variance even for the exact guide.
@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"reconstruction", "elbo-analytic"}))
def test_every_objective_keeps_the_nested_latents_in_their_points_weight(x, name):
    assert pair_contract(model, exact_guide, (x[:10],)).local_latents == ("h",)
    loss = get_objective(name, num_particles=3).differentiable_loss(model, exact_guide, x[:50])
    assert loss.item() == pytest.approx(-exact(x[:50]).sum().item(), rel=1e-5)
    assert (log_likelihood(model, exact_guide, x[:50], num_samples=4) - exact(x[:50])).abs().max() < 1e-3


def test_the_auto_guide_covers_the_nested_latents_as_part_of_each_points_block(x):
    pyro.set_rng_seed(0)
    guide = AutoAmortizedGuide(model, x[:10], hidden=(64,))
    assert guide.local_sites[0].shape == (T, K)  # one point's block: T sub-latents of width K
    fit(model, guide, x[:300], epochs=60, lr=1e-2, objective="iwae-dreg:k=8", progress=False)
    estimate = log_likelihood(model, guide, x[300:], num_samples=1000)
    assert (estimate - exact(x[300:])).abs().mean() < 0.05


def test_the_auto_guide_lays_out_a_point_block_as_the_model_does(x):
    # Data plate at dim -1, parts at -2: the guide's h is [T, N, K] like the model's, and exact for the exact u.
    data = x[:8].permute(0, 2, 1)  # [N, D, T]
    guide = AutoAmortizedGuide(transposed, data)
    trace = poutine.trace(guide).get_trace(data)
    model_trace = poutine.trace(poutine.replay(transposed, trace)).get_trace(data)
    assert trace.nodes["h"]["value"].shape == (*model_trace.nodes["h"]["fn"].batch_shape, K) == (T, 8, K)
    u = trace.nodes["_auto_latent"]["value"]
    assert torch.equal(trace.nodes["h"]["value"].permute(1, 0, 2).reshape(8, -1), u)  # real support: h is u
    assert torch.isfinite(log_likelihood(transposed, guide, data, num_samples=4)).all()
