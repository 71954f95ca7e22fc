"""AutoAmortizedGuide on models it was not written for: constrained, multi-site and global latents."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from safetensors.torch import load_file, save_file
from torch import nn

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.inference.traces import sample_sites


class PositiveScaleModel(nn.Module):
    """x_n ~ N(mu, s_n^2 I) with a positive per-point scale s_n ~ LogNormal(0, 0.5)."""

    def __init__(self, x_dim):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(x_dim))

    def forward(self, x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
            pyro.sample("x", dist.Normal(self.mu, s.unsqueeze(-1)).to_event(1), obs=x)


class CodeAndBrightness(nn.Module):
    """A 4-dimensional Gaussian code and a positive brightness per image, Bernoulli pixels."""

    def __init__(self, x_dim):
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, x_dim))

    def forward(self, x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            brightness = pyro.sample("brightness", dist.LogNormal(0.0, 0.3))
            logits = self.decoder(z) + brightness.log().unsqueeze(-1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class GlobalOffsetModel(nn.Module):
    """A global offset w outside the plate; per-point z; x_n ~ N(A z_n + w, 0.5^2 I)."""

    def __init__(self, x_dim):
        super().__init__()
        self.loading = nn.Parameter(0.3 * torch.randn(x_dim, 2))
        self.x_dim = x_dim

    def forward(self, x, *, batch_size=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(self.x_dim), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.loading.T + w, 0.5).to_event(1), obs=x)


def synthetic_scales(n=400, d=8):
    torch.manual_seed(0)
    s = torch.distributions.LogNormal(0.0, 0.5).sample((n, 1))
    return 1.0 + s * torch.randn(n, d)


def covered(model, guide, x):
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x)
    latent = {name for name, site in sample_sites(model_trace) if not site["is_observed"]}
    provided = {name for name, _ in sample_sites(guide_trace)}
    return latent <= provided, guide_trace


@pytest.mark.parametrize("family, options", [("gaussian", {}), ("mixture", {"components": 3}),
                                              ("flow", {"flow": "iaf", "flow_depth": 2})])
def test_model_with_two_latent_sites_of_different_shapes(family, options, tmp_path):
    data = load_dataset("digits", binarize="threshold")
    x = data.x[:300]
    pyro.set_rng_seed(0)
    model = CodeAndBrightness(64)
    guide = AutoAmortizedGuide(model, x[:10], family=family, hidden=(32,), **options)
    ok, guide_trace = covered(model, guide, x[:10])
    assert ok and guide_trace.nodes["brightness"]["value"].min() > 0
    assert guide_trace.nodes["_auto_latent"]["value"].shape == (10, 5)  # 4 + 1 unconstrained dims
    before = get_objective("elbo", num_particles=10).loss(model, guide, x)
    fit(model, guide, x, epochs=15, batch_size=50, lr=3e-3, progress=False)
    after = get_objective("elbo", num_particles=10).loss(model, guide, x)
    assert after < before - 5 * x.shape[0]
    assert torch.isfinite(log_likelihood(model, guide, x[:20], num_samples=64)).all()
    get_objective("iwae", num_particles=3).differentiable_loss(model, guide, x[:50]).backward()
    for name, param in guide.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    save_file(guide.state_dict(), tmp_path / "guide.safetensors")
    loaded = AutoAmortizedGuide(model, x[:10], family=family, hidden=(32,), **options)
    loaded.load_state_dict(load_file(tmp_path / "guide.safetensors"))
    draws = []
    for g in (guide, loaded):  # the same noise through both: the same latents and densities
        pyro.set_rng_seed(4)
        trace = poutine.trace(g).get_trace(x[:10])
        trace.compute_log_prob()
        draws.append([(trace.nodes[n]["value"], trace.nodes[n]["log_prob"]) for n in ("z", "brightness")])
    torch.testing.assert_close(draws[0], draws[1])


def test_positive_latent_gets_the_jacobian_of_its_transform():
    x = synthetic_scales()
    model = PositiveScaleModel(8)
    guide = AutoAmortizedGuide(model, x[:10], hidden=(16,))
    guide_trace = poutine.trace(guide).get_trace(x[:10])
    u = guide_trace.nodes["_auto_latent"]["value"]  # [10, 1]
    s = guide_trace.nodes["s"]["value"]
    torch.testing.assert_close(s, u.squeeze(-1).exp())
    # log q(s) = log q(u) - log |ds/du| = log q(u) - u for s = exp(u)
    guide_trace.compute_log_prob()
    total = guide_trace.nodes["_auto_latent"]["log_prob"] + guide_trace.nodes["s"]["log_prob"]
    expected = guide_trace.nodes["_auto_latent"]["fn"].log_prob(u) - u.squeeze(-1)
    torch.testing.assert_close(total, expected)
    for name in ("elbo-stl", "iwae-stl", "iwae-dreg"):  # one sampled site (u); the Deltas follow from it
        loss = get_objective(name, num_particles=4).differentiable_loss(model, guide, x[:10])
        grads = torch.autograd.grad(loss, list(guide.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads) and any(g is not None for g in grads)
    before = get_objective("elbo", num_particles=10).loss(model, guide, x)
    fit(model, guide, x, epochs=30, batch_size=100, lr=1e-2, progress=False)
    assert get_objective("elbo", num_particles=10).loss(model, guide, x) < before - 0.5 * x.shape[0]
    assert torch.isfinite(log_likelihood(model, guide, x[:20], num_samples=64)).all()


def test_global_latent_gets_a_non_amortized_distribution():
    torch.manual_seed(0)
    offset = torch.linspace(-2.0, 2.0, 6)
    x = torch.randn(300, 2) @ (0.8 * torch.randn(6, 2)).T + offset + 0.5 * torch.randn(300, 6)
    model = GlobalOffsetModel(6)
    guide = AutoAmortizedGuide(model, x[:10], hidden=(16,))
    ok, guide_trace = covered(model, guide, x[:10])
    assert ok and guide_trace.nodes["w"]["value"].shape == (6,)
    assert not any(f.name == "data" for f in guide_trace.nodes["_auto_global"]["cond_indep_stack"])
    before = get_objective("elbo", num_particles=10).loss(model, guide, x)
    fit(model, guide, x, epochs=60, batch_size=100, lr=1e-2, progress=False)
    assert get_objective("elbo", num_particles=10).loss(model, guide, x) < before - 1.0 * x.shape[0]
    # The posterior of the offset concentrates near the data's mean offset.
    pyro.set_rng_seed(0)
    draws = torch.stack([poutine.trace(guide).get_trace(x[:2]).nodes["w"]["value"] for _ in range(200)])
    torch.testing.assert_close(draws.mean(0), offset, atol=0.35, rtol=0)
    assert torch.isfinite(log_likelihood(model, guide, x[:20], num_samples=64)).all()


def test_refusals():
    x = synthetic_scales(20)

    def discrete(x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def extra_plate(x, *, batch_size=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            with pyro.plate("pixels", 3, dim=-2):
                pyro.sample("h", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape[1:]).to_event(1), obs=x)

    def observed_outside_every_plate(x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(2), obs=x)

    def poisson(x, *, batch_size=None):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Poisson(3.0))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).to_event(1), obs=x)

    assert AutoAmortizedGuide(discrete, x).discrete_q.sites[0].family == "Bernoulli"  # a head of its own
    with pytest.raises(InputError, match=r"'c' is discrete \(Poisson\), and the auto guide has heads for Categorical"):
        AutoAmortizedGuide(poisson, x)
    # A latent in a plate nested in the data plate is part of each point's block (tests/guides/test_nested_plates.py).
    assert AutoAmortizedGuide(extra_plate, x).local_sites[0].shape == (3,)
    with pytest.raises(InputError, match="found no plate over the batch of 20 data points around the observed site"):
        AutoAmortizedGuide(observed_outside_every_plate, x)
    with pytest.raises(InputError, match="unknown family 'flows'.*flow"):
        AutoAmortizedGuide(PositiveScaleModel(8), x, family="flows")
    with pytest.raises(InputError, match="no option 'components'"):
        AutoAmortizedGuide(PositiveScaleModel(8), x, family="gaussian", components=3)
    guide = AutoAmortizedGuide(CodeAndBrightness(8), (x > 1).float(), hidden=(8,))
    with pytest.raises(InputError, match="elbo-analytic.*'_auto_latent'"):
        get_objective("elbo-analytic").differentiable_loss(CodeAndBrightness(8), guide, (x > 1).float())
