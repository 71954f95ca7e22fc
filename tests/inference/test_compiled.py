"""The compiled training step: the same loss, gradients, sums and buffer updates as the eager step, for the same noise.

Most cases check the traced graph itself (``mode="trace"``: the graph run operation by
operation), which is where a wrong number would come from; the Inductor cases check the
compiled graph on a few of them and through ``fit``.
"""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from elbolab.contract import check_pair
from elbolab.errors import InputError
from elbolab.families import FAMILIES, build_model, build_model_guide
from elbolab.guides import GaussianGuide, GuideConfig
from elbolab.inference import FitConfig, fit, get_objective, importance_estimate
from elbolab.inference.compiled import CompiledStep, _scale_explicitly
from elbolab.inference.fit import _compiled_step as _compiled_step_of_fit
from elbolab.inference.objectives import no_guide
from elbolab.inference.staging import StagedData
from elbolab.inference.step import RunningSums, collect_params, make_adam, step_function
from elbolab.models import VAE, VQVAE, ModelConfig

OPTIONS = {"vae": {"z_dim": 3}, "cvae": {"z_dim": 3}, "hvae": {"z_dims": (4, 3)}, "autoencoder": {"z_dim": 3},
           "vqvae": {"codebook_size": 6, "num_codes": 2, "z_dim": 3}, "gmvae": {"clusters": 3, "z_dim": 2},
           "ssvae": {"z_dim": 2, "labels_per_class": 1},
           # The prior and the networks of issue 20: a VampPrior, and convolutions on 3 x 4 "images".
           "vae+vamp": {"z_dim": 3, "prior": "vamp", "pseudo_inputs": 4},
           "vae+conv": {"z_dim": 3, "arch": "conv", "channels": (2, 3), "gated": True, "residual_blocks": 1},
           "hvae+conv": {"z_dims": (4, 3), "arch": "conv", "channels": (2,)},
           "vqvae+conv": {"codebook_size": 6, "z_dim": 3, "arch": "conv", "channels": (2,)}}
# (model, guide, objective) beyond one case per family and objective; two in the default run.
VARIANTS = [pytest.param("vae+vamp", "gaussian", "elbo", marks=pytest.mark.slow), ("vae+vamp", "gaussian", "iwae-dreg"),
            ("vae+conv", "gaussian", "iwae"), pytest.param("vae+conv", "flow", "elbo", marks=pytest.mark.slow),
            pytest.param("hvae+conv", "ladder", "iwae", marks=pytest.mark.slow),
            pytest.param("vqvae+conv", "nearest-code", "elbo", marks=pytest.mark.slow)]
# Families with discrete latents: the objectives a trace covers for them (the others refuse their sites by name).
DISCRETE_OBJECTIVES = {"gmvae": ("elbo", "iwae"), "ssvae": ("iwae",)}
OBJECTIVE_SPECS = {
    "elbo": {}, "elbo-analytic": {}, "elbo-stl": {}, "iwae": {"num_particles": 3}, "iwae-stl": {"num_particles": 3},
    "iwae-dreg": {"num_particles": 3}, "renyi": {"num_particles": 3, "alpha": 0.5}, "reconstruction": {},
}


def _cases():
    for name, family in FAMILIES.items():
        objectives = family.objectives or [o for o in OBJECTIVE_SPECS if o != "reconstruction"]
        if name in DISCRETE_OBJECTIVES:  # enumerated (gmvae) or sampled (ssvae) sites, on the default guide
            yield from ((name, family.guides[0], objective) for objective in DISCRETE_OBJECTIVES[name])
            continue
        for guide in family.guides:
            for objective in objectives:
                if guide in ("mixture", "flow", "bottom-up") and objective == "elbo-analytic":
                    continue  # no closed-form KL for them: refused by the objective, not the trace
                if name != "vae" and guide != family.guides[0] and objective not in ("elbo", "iwae-dreg"):
                    continue  # every objective on the VAE, two on the other guides of other families
                yield name, guide, objective
    yield from VARIANTS


def _pair(name, guide_family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name.split("+")[0], hidden=(8,), **OPTIONS[name]), 12, y_dim=3, image_shape=(3, 4))
    guide = build_model_guide(GuideConfig(None if guide_family == "none" else guide_family, components=2, flow_depth=2), model)
    return model, guide


def _batch(name, points=5):
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((points, 12), 0.4), generator=generator)
    if name == "cvae":
        return x, nn.functional.one_hot(torch.arange(points) % 3, 3).float()
    if name == "ssvae":  # labels for some points, -1 for the others
        return x, torch.tensor([0, -1, 2, -1, 1][:points])
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
    return optimizer, sums, params


def _compiled_step(model, guide, objective, batch, clip, mode="trace", num_points=100):
    torch.manual_seed(3)
    params = collect_params(model, guide, objective, batch)
    optimizer = make_adam(params, 1e-3)
    contract = check_pair(model, guide, batch, {})
    step = CompiledStep(model, guide, objective, params, optimizer, contract, num_points, clip, mode=mode)
    sums = RunningSums.zeros("cpu")
    return step, sums, params


@pytest.mark.parametrize(("name", "guide_family", "objective_name"), list(_cases()))
def test_the_traced_step_gives_the_eager_step_s_loss_gradients_and_update_for_the_same_noise(name, guide_family, objective_name):
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
        eager_optimizer, eager_sums, eager_params = _eager_step(twin_model, twin_guide, eager_objective, batch, clip, seed=7)
        torch.manual_seed(7)
        rows = StagedData(batch[0], batch[1:], dynamic=False, device=torch.device("cpu"))
        step(rows, torch.arange(batch[0].shape[0]), batch[0].shape[0], sums)
    assert torch.allclose(sums.tally, eager_sums.tally, rtol=1e-5, atol=1e-5)
    # Adam's state after one step: its moments are the (clipped) gradient and its square, scaled; a
    # parameter without a gradient has none, in both.
    for p, e in zip(params, eager_params, strict=True):
        ours, theirs = step.optimizer.state.get(p, {}), eager_optimizer.state.get(e, {})
        assert ours.keys() == theirs.keys(), p.shape
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-9), (name, p.shape)
    # The step's update: the same parameters after fused Adam, and the same buffers (VQ-VAE's EMA codebook).
    for p, e in zip(params, eager_params, strict=True):
        assert torch.allclose(p, e, rtol=1e-4, atol=1e-6)
    for (label, b), (_, e) in zip(list(model.named_buffers()), list(twin_model.named_buffers()), strict=True):
        assert torch.allclose(b.float(), e.float(), rtol=1e-4, atol=1e-6), label
    # The modules hold their own tensors again (tracing swaps stand-ins in), which the optimizer updates.
    now = [*model.parameters(), *model.buffers(), *(guide.parameters() if isinstance(guide, nn.Module) else ())]
    assert all(a is b for a, b in zip(now, held, strict=True))


# Through fit, with Inductor.


def small_vae(seed=0):
    pyro.set_rng_seed(seed)
    return VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))


def small_vqvae(seed=0):
    pyro.set_rng_seed(seed)
    model = VQVAE(64, codebook_size=16, code_dim=4, num_codes=2, hidden=(32,))
    return model, build_model_guide(GuideConfig(), model)


def _weights(model, guide):
    return [t.clone() for t in (*model.state_dict().values(), *guide.state_dict().values())]


@pytest.mark.parametrize(
    ("build", "options"),
    [(small_vae, {"objective": "elbo", "warmup": 2, "clip_grad_norm": 5.0}),
     # Slow (cold Inductor compiles); its EMA update's add(alpha) is also checked by test_scaled_sums_...
     pytest.param(small_vqvae, {"objective": "elbo"}, marks=pytest.mark.slow)],
    ids=["vae-warmup-clipped", "vqvae"],
)
def test_a_compiled_fit_follows_the_eager_one_and_resumes_bitwise(digits, tmp_path, build, options):
    # A batch size that leaves a short last batch: it gets its own compiled step.
    model, guide = build()
    eager = fit(model, guide, digits, epochs=4, batch_size=200, progress=False, **options)
    eager_weights = _weights(model, guide)
    model, guide = build()
    whole = fit(model, guide, digits, epochs=4, batch_size=200, progress=False, compile=True, **options)
    assert whole.compiled and whole.compile_seconds > 0
    # The same noise (ATen's random kernels under Inductor): the same run up to rounding.
    assert whole.history["train_loss"].tolist() == pytest.approx(eager.history["train_loss"].tolist(), rel=1e-4)
    assert whole.history["beta"].equals(eager.history["beta"])
    for compiled_weight, eager_weight in zip(_weights(model, guide), eager_weights, strict=True):
        assert torch.allclose(compiled_weight.float(), eager_weight.float(), rtol=1e-3, atol=1e-4)
    expected = _weights(model, guide)

    checkpoint = tmp_path / "checkpoint.safetensors"
    model, guide = build()
    fit(model, guide, digits, epochs=2, batch_size=200, progress=False, checkpoint=checkpoint, compile=True, **options)
    model, guide = build()
    resumed = fit(model, guide, digits, epochs=4, batch_size=200, progress=False, checkpoint=checkpoint, resume=True,
                  compile=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model, guide), expected, strict=True))
    assert resumed.history["train_loss"].equals(whole.history["train_loss"])


class BranchingVAE(VAE):
    """A VAE whose program branches in Python on the data: no static graph can hold it."""

    def forward(self, x=None, *, batch_size=None):
        if x is not None and x.sum() < 0:  # never true, but the trace cannot know
            x = -x
        return super().forward(x, batch_size=batch_size)


def test_a_step_that_cannot_be_traced_trains_eagerly_and_says_why_and_where(digits, capsys):
    pyro.set_rng_seed(0)
    model, guide = BranchingVAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))
    compiled = fit(model, guide, digits, epochs=2, batch_size=200, progress=None, compile=True)
    message = capsys.readouterr().err
    assert not compiled.compiled
    assert "training eagerly, not compiled" in message and "reads a tensor's value on the host" in message
    assert "test_compiled.py" in message and "x.sum() < 0" in message
    pyro.set_rng_seed(0)
    model, guide = BranchingVAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))
    eager = fit(model, guide, digits, epochs=2, batch_size=200, progress=False)
    # The failed trace drew no noise and moved nothing: the run is the eager run, bit for bit.
    assert compiled.history["train_loss"].equals(eager.history["train_loss"])


def test_parameters_outside_the_modules_train_eagerly_with_the_reason(digits, capsys):
    def model(x):
        loc = pyro.param("loc", torch.zeros(64))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(logits=loc).to_event(1), obs=x)

    result = fit(model, None, digits, objective="reconstruction", epochs=1, batch_size=200, progress=None, compile=True)
    assert not result.compiled
    assert "outside the model's and guide's modules" in capsys.readouterr().err


def test_compile_is_refused_under_data_parallel_training():
    with pytest.raises(InputError, match="compile is not available under torchrun"):
        _compiled_step_of_fit(FitConfig(compile=True), object(), None, None, None, [], None, None, None, False)


def test_scaled_sums_keep_their_scale_under_inductor():
    # torch 2.13's Inductor runs add(x, a @ b, alpha=c) as addmm(x, a, b) without c (the VQ-VAE's EMA
    # update has this form); the traced graph spells the scale out before compiling.
    torch.manual_seed(0)
    x, a, b = torch.randn(4, 3), torch.randn(4, 50), torch.randn(50, 3)

    def scaled(x, a, b):
        return [torch.add(x, a @ b, alpha=0.01), torch.addmm(x, a, b, alpha=0.5, beta=0.3).relu()]

    graph = make_fx(scaled)(x, a, b)
    _scale_explicitly(graph)
    for compiled, eager in zip(torch.compile(graph, dynamic=False)(x, a, b), scaled(x, a, b), strict=True):
        assert torch.allclose(compiled, eager, atol=1e-5)


# Compiled evaluation.


def test_a_compiled_estimate_draws_what_the_eager_one_draws_and_reuses_its_graphs():
    from elbolab.inference import evaluate

    model, guide = _pair("cvae", "gaussian")
    model.eval(), guide.eval()
    x, labels = _batch("cvae", points=40)
    estimates, tracers = [], []
    for compile in (False, True, True):
        torch.manual_seed(5)
        estimates.append(importance_estimate(model, guide, x, labels, num_samples=30, batch_size=16, compile=compile))
        tracers.append(evaluate._TRACERS.get((id(model), id(guide)), (None, None, None))[2])
    assert tracers[1] is tracers[2] is not None
    assert len(tracers[2].graphs) == 2  # chunks of 16 points and the last 8, traced once for both estimates
    for name in ("log_likelihood", "elbo", "reconstruction", "ess"):
        for compiled in estimates[1:]:
            assert torch.allclose(getattr(compiled, name), getattr(estimates[0], name), rtol=1e-5, atol=1e-5), name


def test_an_estimate_that_cannot_be_traced_runs_eagerly_and_says_why(capsys):
    pyro.set_rng_seed(0)
    model, guide = BranchingVAE(12, 3, hidden=(8,)).eval(), GaussianGuide(12, 3, hidden=(8,)).eval()
    x = _batch("vae")[0]
    torch.manual_seed(5)
    compiled = importance_estimate(model, guide, x, num_samples=20, compile=True)
    assert "evaluating eagerly, not compiled" in capsys.readouterr().err
    torch.manual_seed(5)
    eager = importance_estimate(model, guide, x, num_samples=20)
    assert torch.equal(compiled.log_likelihood, eager.log_likelihood)


def test_a_graph_too_large_to_compile_in_reasonable_time_trains_eagerly_with_the_reason(digits, capsys, monkeypatch):
    # A flow's inverse under DReG unrolls into thousands of operations (9,300 at z_dim 20, 350 s to
    # compile); a small VAE's step (about 200) stands in for it under a lowered limit.
    from elbolab.inference import compiled

    monkeypatch.setattr(compiled, "MAX_GRAPH_NODES", 100)
    model, guide = small_vae()
    result = fit(model, guide, digits, epochs=1, batch_size=400, progress=None, compile=True)
    assert not result.compiled
    assert "operations, which Inductor would take minutes to compile (more than 100" in capsys.readouterr().err
