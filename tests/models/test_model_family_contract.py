"""The conditional, hierarchical and vector-quantized VAEs follow the model contract.

For each model and each of its guides: every latent site of the model is sampled by the guide
inside pyro.plate("data"), the model generates with x=None, one training step's gradient
reaches every parameter of model and guide, and a run folder brings back the same modules.
"""

import pandas as pd
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from elbolab.data import DataConfig
from elbolab.guides import GuideConfig
from elbolab.inference import ELBO, get_objective, log_likelihood
from elbolab.inference.fit import FitConfig
from elbolab.inference.traces import sample_sites
from elbolab.models import ModelConfig
from elbolab.runs import RunConfig, load_run, save_run

X_DIM, Y_DIM, N = 12, 3, 10

CASES = {
    "cvae-gaussian": (ModelConfig("cvae", z_dim=3, hidden=(16,)), "gaussian"),
    "cvae-mixture": (ModelConfig("cvae", z_dim=3, hidden=(16,)), "mixture"),
    "hvae-ladder": (ModelConfig("hvae", hidden=(16,), z_dims=(4, 3, 2), hidden_upper=(8,)), "ladder"),
    "hvae-bottom-up": (ModelConfig("hvae", hidden=(16,), z_dims=(4, 2)), "bottom-up"),
    "vqvae": (ModelConfig("vqvae", z_dim=3, hidden=(16,), codebook_size=6, num_codes=2), "nearest-code"),
}


def build(case):
    model_config, family = CASES[case]
    config = RunConfig(DataConfig("digits"), model_config, FitConfig(), GuideConfig(family), x_dim=X_DIM,
                       y_dim=Y_DIM if model_config.name == "cvae" else None)
    pyro.set_rng_seed(0)
    model = config.new_model()
    return config, model, config.new_guide(model)


def batch(case):
    x = torch.bernoulli(torch.full((N, X_DIM), 0.4), generator=torch.Generator().manual_seed(0))
    if case.startswith("cvae"):
        return x, F.one_hot(torch.arange(N) % Y_DIM, Y_DIM).float()
    return (x,)


@pytest.mark.parametrize("case", CASES)
def test_every_latent_is_sampled_by_the_guide_inside_the_data_plate(case):
    _, model, guide = build(case)
    args = batch(case)
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(*args)
    latents = [name for name, site in sample_sites(model_trace) if not site["is_observed"]]
    assert latents, "the model has latent sites"
    for name in [*latents, "x"]:
        assert [f.name for f in model_trace.nodes[name]["cond_indep_stack"]] == ["data"], name
    for name in latents:
        assert name in guide_trace.nodes and not guide_trace.nodes[name]["is_observed"]
        assert torch.equal(model_trace.nodes[name]["value"], guide_trace.nodes[name]["value"])
        assert [f.name for f in guide_trace.nodes[name]["cond_indep_stack"]] == ["data"]


@pytest.mark.parametrize("case", CASES)
def test_generates_with_x_none_and_reconstructs(case):
    _, model, guide = build(case)
    args = batch(case)
    if case.startswith("cvae"):
        trace = poutine.trace(model).get_trace(None, args[1], batch_size=N)
        assert model.generate(5, y=2).shape == (5, X_DIM)
        assert model.reconstruct(args[0], args[1], guide).shape == (N, X_DIM)
    else:
        trace = poutine.trace(model).get_trace(None, batch_size=N)
        assert model.generate(5).shape == (5, X_DIM)
        assert model.reconstruct(args[0], guide).shape == (N, X_DIM)
    assert trace.nodes["x"]["value"].shape == (N, X_DIM)
    assert not trace.nodes["x"]["is_observed"]


@pytest.mark.parametrize("case", CASES)
def test_one_step_gradient_reaches_every_parameter(case):
    _, model, guide = build(case)
    loss = ELBO().differentiable_loss(model, guide, *batch(case))
    loss.backward()
    named = {f"model.{k}": p for k, p in model.named_parameters()} | {f"guide.{k}": p for k, p in guide.named_parameters()}
    # A Gaussian likelihood's scale would be a parameter; Bernoulli models have none unused.
    missing = [name for name, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("case", CASES)
def test_run_folder_round_trip(case, tmp_path):
    config, model, guide = build(case)
    args = batch(case)
    ELBO().differentiable_loss(model, guide, *args)  # a VQ-VAE's guide moves the codebook when it trains
    save_run(tmp_path, config, model, guide, history=pd.DataFrame({"epoch": [1], "train_loss": [1.0]}))
    run = load_run(tmp_path)
    for before, after in ((model, run.model), (guide, run.guide)):
        for (name, value), (name_after, value_after) in zip(before.state_dict().items(), after.state_dict().items(), strict=True):
            assert name == name_after and torch.equal(value, value_after), name
    guide.eval()
    pyro.set_rng_seed(1)
    expected = log_likelihood(model, guide, *args, num_samples=20)
    pyro.set_rng_seed(1)
    assert torch.allclose(log_likelihood(run.model, run.guide, *args, num_samples=20), expected)


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("vqvae")])
@pytest.mark.parametrize("objective", ["elbo", "elbo-stl", "iwae", "iwae-stl", "iwae-dreg", "renyi"])
def test_trains_under_every_objective(case, objective):
    _, model, guide = build(case)
    loss = get_objective(objective).differentiable_loss(model, guide, *batch(case))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)
