"""Flow guides: invertibility and log-det-Jacobians against autograd, contract, training, round trips."""

import pyro
import pytest
import torch
from pyro import poutine
from safetensors.torch import load_file, save_file
from torch import nn

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import FLOWS, FlowGuide, GaussianGuide
from elbolab.inference import fit, get_objective, log_likelihood
from elbolab.models import VAE

INVERTIBLE = ["iaf", "spline", "affine-coupling"]


def perturbed(guide: FlowGuide, std: float = 0.3) -> FlowGuide:
    """Move every flow away from its identity initialisation, so that the checks mean something."""
    with torch.no_grad():
        for layer in guide.layers:
            last = [m for m in layer.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.normal_(0.0, std)
            last.bias.normal_(0.0, std)
    return guide


def flow_and_base(flow: str, seed: int = 0):
    torch.manual_seed(seed)
    guide = perturbed(FlowGuide(6, 3, flow=flow, flow_depth=3, hidden=(8,))).double()
    x = torch.rand(1, 6, dtype=torch.float64)
    q = guide.distribution(x)
    return guide, x, q


@pytest.mark.parametrize("flow", FLOWS)
def test_log_density_matches_the_autograd_jacobian_of_the_whole_flow(flow):
    """log q(f(z0)) = log N(z0) - log |det df/dz0|, with the Jacobian from autograd (permutations included)."""
    guide, x, q = flow_and_base(flow)
    z0 = q.base_dist.sample()  # [1, 3]

    def push(v):
        for transform in guide.distribution(x).transforms:
            v = transform(v)
        return v

    jacobian = torch.autograd.functional.jacobian(lambda v: push(v.unsqueeze(0)).squeeze(0), z0.squeeze(0))
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(jacobian).logabsdet
    transforms = q.transforms
    value, log_det = z0, torch.zeros(1, dtype=torch.float64)
    for transform in transforms:
        nxt = transform(value)
        log_det = log_det + transform.log_abs_det_jacobian(value, nxt)
        value = nxt
    torch.testing.assert_close(q.base_dist.log_prob(z0) - log_det, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(q.log_prob(value), expected, atol=1e-4, rtol=0)  # through the cache
    assert (jacobian - torch.eye(3, dtype=torch.float64)).abs().max() > 0.05  # not the identity


@pytest.mark.parametrize("flow", INVERTIBLE)
def test_invertible_flows_invert_and_evaluate_unseen_points(flow):
    guide, x, _ = flow_and_base(flow)
    z = torch.randn(5, 1, 3, dtype=torch.float64)
    fresh = guide.distribution(x)  # no cached values: inverse transforms run
    z0 = z
    for transform in reversed(fresh.transforms):
        z0 = transform.inv(z0)
    for transform in guide.distribution(x).transforms:
        z0 = transform(z0)
    torch.testing.assert_close(z0, z, atol=1e-4, rtol=0)
    assert torch.isfinite(guide.distribution(x).log_prob(z)).all()


@pytest.mark.parametrize("flow", FLOWS)
def test_flows_start_at_or_near_the_identity(flow):
    torch.manual_seed(0)
    guide = FlowGuide(6, 3, flow=flow, flow_depth=4, hidden=(8,))
    x = torch.rand(20, 6)
    q = guide.distribution(x)
    z0 = q.base_dist.sample()
    z = z0
    for transform in q.transforms:
        z = transform(z)
    torch.testing.assert_close(z, z0, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.log_prob(z), q.base_dist.log_prob(z0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("flow", FLOWS)
def test_every_objective_trains_every_parameter_and_the_guide_round_trips(flow, tmp_path):
    digits = load_dataset("digits", binarize="threshold")
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 4, hidden=(32,)), FlowGuide(64, 4, flow=flow, flow_depth=2, hidden=(32,))
    x = digits.x[:64]
    guide_trace = poutine.trace(guide).get_trace(x)
    assert {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"} - {"data"} == {"z"}
    fit(model, guide, x, objective="iwae", particles=3, epochs=3, batch_size=32, progress=False)
    get_objective("iwae", num_particles=3).differentiable_loss(model, guide, x).backward()
    for name, param in guide.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert torch.isfinite(log_likelihood(model, guide, x[:8], num_samples=50)).all()
    save_file(guide.state_dict(), tmp_path / "guide.safetensors")
    loaded = FlowGuide(64, 4, flow=flow, flow_depth=2, hidden=(32,))
    loaded.load_state_dict(load_file(tmp_path / "guide.safetensors"))
    draws = []
    for g in (guide, loaded):  # the same noise through both: same samples, same densities
        pyro.set_rng_seed(3)
        q = g.distribution(x)
        z = q.rsample()
        draws.append((z, q.log_prob(z)))
    torch.testing.assert_close(draws[0], draws[1])
    if flow in INVERTIBLE:
        assert torch.isfinite(get_objective("iwae-dreg", num_particles=3).differentiable_loss(model, guide, x))
    else:
        with pytest.raises(InputError, match="invert"):
            get_objective("iwae-dreg", num_particles=3).differentiable_loss(model, guide, x)


def test_a_flow_closes_half_the_gap_of_a_diagonal_gaussian_on_a_correlated_posterior():
    """synthetic-linear-gaussian: log p(x) exact; its posterior is a correlated Gaussian."""
    data = load_dataset("synthetic-linear-gaussian", "train")
    model, x = data.truth, data.x[:2000]
    elbos = {}
    for name, guide in (("gaussian", GaussianGuide(x.shape[1], model.z_dim, hidden=(32,))),
                        ("flow", FlowGuide(x.shape[1], model.z_dim, flow="iaf", flow_depth=2, hidden=(32,)))):
        pyro.set_rng_seed(0)
        fit(model, guide, x, epochs=60, batch_size=200, lr=3e-3, progress=False)
        pyro.set_rng_seed(1)
        elbos[name] = -get_objective("elbo", num_particles=50).loss(model, guide, x) / x.shape[0]
    evidence = model.log_likelihood(x).mean().item()
    gap_gaussian, gap_flow = evidence - elbos["gaussian"], evidence - elbos["flow"]
    assert gap_flow < 0.5 * gap_gaussian, (gap_gaussian, gap_flow)


def test_refusals():
    with pytest.raises(InputError, match="unknown flow 'iaff'.*iaf"):
        FlowGuide(6, 3, flow="iaff")
    with pytest.raises(InputError, match="depth"):
        FlowGuide(6, 3, flow_depth=0)
    with pytest.raises(InputError, match="z_dim"):
        FlowGuide(6, 1, flow="iaf")
