"""The compiled training step: the same loss, gradients, sums and buffer updates as the eager step, for the same noise.

Most cases check the traced graph itself (``mode="trace"``: the graph run operation by
operation), which is where a wrong number would come from; the Inductor cases check the
compiled graph on a few of them and through ``fit``.
"""

import copy

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from elbolab.families import FAMILIES, build_model, build_model_guide
from elbolab.guides import GuideConfig
from elbolab.inference import fit, get_objective
from elbolab.inference.objectives import no_guide
from elbolab.inference.compiled import CompiledStep, NotTraceable
from elbolab.inference.step import RunningSums, collect_params, make_adam, step_function
from elbolab.models import ModelConfig, VAE
from elbolab.guides import GaussianGuide
from elbolab.contract import check_pair

OPTIONS = {"vae": {"z_dim": 3}, "cvae": {"z_dim": 3}, "hvae": {"z_dims": (4, 3)}, "autoencoder": {"z_dim": 3},
           "vqvae": {"codebook_size": 6, "num_codes": 2, "z_dim": 3}}
OBJECTIVE_SPECS = {
    "elbo": {}, "elbo-analytic": {}, "elbo-stl": {}, "iwae": {"num_particles": 3}, "iwae-stl": {"num_particles": 3},
    "iwae-dreg": {"num_particles": 3}, "renyi": {"num_particles": 3, "alpha": 0.5}, "reconstruction": {},
}


def _cases():
    for name, family in FAMILIES.items():
        objectives = family.objectives or [o for o in OBJECTIVE_SPECS if o != "reconstruction"]
        for guide in family.guides:
            for objective in objectives:
                if guide in ("mixture", "flow", "bottom-up") and objective == "elbo-analytic":
                    continue  # no closed-form KL for them: refused by the objective, not the trace
                if name != "vae" and guide != family.guides[0] and objective not in ("elbo", "iwae-dreg"):
                    continue  # every objective on the VAE, two on the other guides of other families
                yield name, guide, objective


def _pair(name, guide_family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, hidden=(8,), **OPTIONS[name]), 12, y_dim=3)
    guide = build_model_guide(GuideConfig(None if guide_family == "none" else guide_family, components=2, flow_depth=2), model)
    return model, guide


def _batch(name, points=5):
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((points, 12), 0.4), generator=generator)
    if name == "cvae":
        return x, nn.functional.one_hot(torch.arange(points) % 3, 3).float()
    return (x,)


def _eager_step(model, guide, objective, batch, clip, seed):
    """The eager step of fit (its step function): gradients, sums and the parameters after the update."""
    torch.manual_seed(3)  # collect_params's first run starts the VQ-VAE's codebook from random outputs
    params = collect_params(model, guide, objective, batch)
    optimizer = make_adam(params, 1e-3)
    sums = RunningSums.zeros("cpu")
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    loss = objective.differentiable_loss(model, guide, *batch)
    loss.backward()
    step_function(optimizer, params, clip)(loss.detach(), batch[0].shape[0], sums)
    return [p.grad for p in params], sums, params


def _compiled_step(model, guide, objective, batch, clip, mode="trace", num_points=100):
    torch.manual_seed(3)
    params = collect_params(model, guide, objective, batch)
    optimizer = make_adam(params, 1e-3)
    contract = check_pair(model, guide, batch, {})
    step = CompiledStep(model, guide, objective, params, optimizer, contract, num_points, clip, mode=mode)
    sums = RunningSums.zeros("cpu")
    return step, sums, params


@pytest.mark.parametrize(("name", "guide_family", "objective_name"), list(_cases()))
def test_the_traced_step_gives_the_eager_step_s_loss_and_gradients_for_the_same_noise(name, guide_family, objective_name):
    model, guide = _pair(name, guide_family)
    guide = guide if guide is not None else no_guide
    twin_model, twin_guide = copy.deepcopy((model, guide))  # together: a ladder guide shares the model's networks
    batch = _batch(name)
    objective = get_objective(objective_name, **OBJECTIVE_SPECS[objective_name])
    clip = 0.5
    held = [*model.parameters(), *model.buffers(), *(guide.parameters() if isinstance(guide, nn.Module) else ())]
    with pyro.validation_enabled(False):
        step, sums, params = _compiled_step(model, guide, objective, batch, clip)
        eager_objective = get_objective(objective_name, **OBJECTIVE_SPECS[objective_name])
        eager_grads, eager_sums, eager_params = _eager_step(twin_model, twin_guide, eager_objective, batch, clip, seed=7)
        torch.manual_seed(7)
        step(batch, torch.arange(batch[0].shape[0]), batch[0].shape[0], sums)
    assert torch.allclose(sums.tally, eager_sums.tally, rtol=1e-5, atol=1e-5)
    for p, e, param in zip([p.grad for p in params], eager_grads, params, strict=True):
        assert (p is None) == (e is None)
        if p is not None:
            assert torch.allclose(p, e, rtol=1e-4, atol=1e-6), param.shape
    # The step's update: the same parameters after fused Adam, and the same buffers (VQ-VAE's EMA codebook).
    for p, e in zip(params, eager_params, strict=True):
        assert torch.allclose(p, e, rtol=1e-4, atol=1e-6)
    for (label, b), (_, e) in zip(list(model.named_buffers()), list(twin_model.named_buffers()), strict=True):
        assert torch.allclose(b.float(), e.float(), rtol=1e-4, atol=1e-6), label
    # The modules hold their own tensors again (tracing swaps stand-ins in), which the optimizer updates.
    now = [*model.parameters(), *model.buffers(), *(guide.parameters() if isinstance(guide, nn.Module) else ())]
    assert all(a is b for a, b in zip(now, held, strict=True))
