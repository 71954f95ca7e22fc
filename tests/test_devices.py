"""Every model family on every available device: training, evaluation, diagnostics, sampling, checkpoints.

Parametrized over the devices this machine has: on a CPU-only machine the CUDA cases are
skipped, and what can be checked without a GPU (no host synchronization in the training step,
checkpoints that load onto another device) is checked on the CPU.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F

from elbolab.analysis import (
    calibration,
    gradient_snr,
    importance_diagnostics,
    inference_gaps,
    to_inference_data,
)
from elbolab.analysis.latent import latent_draws
from elbolab.data import DataConfig
from elbolab.guides import GuideConfig
from elbolab.inference import fit, log_likelihood
from elbolab.inference.fit import FitConfig
from elbolab.inference.objectives import get_objective
from elbolab.inference.step import RunningSums, make_adam, step_function
from elbolab.inference.training_checkpoint import CHECKPOINT_FILE, read_checkpoint
from elbolab.models import ModelConfig
from elbolab.runs import RunConfig, load_run, save_run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DEVICE_PAIRS = [("cpu", "cpu"), pytest.param("cpu", "cuda", marks=CUDA), pytest.param("cuda", "cpu", marks=CUDA),
                pytest.param("cuda", "cuda", marks=CUDA)]

X_DIM, Y_DIM, N, BATCH = 12, 3, 48, 8

CASES = {
    "vae-gaussian": (ModelConfig("vae", z_dim=3, hidden=(16,)), GuideConfig("gaussian"), "elbo"),
    "vae-mixture": (ModelConfig("vae", z_dim=3, hidden=(16,)), GuideConfig("mixture", components=2), "iwae-dreg"),
    "vae-flow": (ModelConfig("vae", z_dim=3, hidden=(16,)), GuideConfig("flow", flow_depth=2), "renyi"),
    "cvae": (ModelConfig("cvae", z_dim=3, hidden=(16,)), GuideConfig("gaussian"), "elbo-analytic"),
    "hvae-ladder": (ModelConfig("hvae", hidden=(16,), z_dims=(4, 2), hidden_upper=(8,)), GuideConfig("ladder"), "iwae"),
    "vqvae": (ModelConfig("vqvae", z_dim=3, hidden=(16,), codebook_size=6, num_codes=2), GuideConfig("nearest-code"), "elbo"),
}


def build(case: str) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module]:
    model_config, guide_config, objective = CASES[case]
    config = RunConfig(DataConfig("digits"), model_config, FitConfig(objective=objective, epochs=2, batch_size=BATCH),
                       guide_config, x_dim=X_DIM, y_dim=Y_DIM if model_config.name == "cvae" else None)
    pyro.set_rng_seed(0)
    model = config.new_model()
    return config, model, config.new_guide(model)


def data(case: str, points: int = N) -> tuple[torch.Tensor, ...]:
    x = torch.bernoulli(torch.full((points, X_DIM), 0.4), generator=torch.Generator().manual_seed(0))
    return (x, F.one_hot(torch.arange(points) % Y_DIM, Y_DIM).float()) if case == "cvae" else (x,)


def particles(case: str) -> dict[str, int]:
    return {} if CASES[case][2] in ("elbo", "elbo-analytic") else {"particles": 2}


def train(case: str, device: str, checkpoint: Path | None = None, points: int = N):
    config, model, guide = build(case)
    x, *args = data(case, points)
    result = fit(model, guide, x, args=args, objective=CASES[case][2], epochs=2, batch_size=BATCH, device=device,
                 progress=False, checkpoint=checkpoint, **particles(case))
    return config, model, guide, result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_trains_evaluates_diagnoses_and_samples_on_the_device(case: str, device: str) -> None:
    _, model, guide, result = train(case, device)
    target = torch.device(device)
    assert {p.device.type for p in [*model.parameters(), *guide.parameters()]} == {target.type}
    assert {b.device.type for b in [*model.buffers(), *guide.buffers()]} <= {target.type}
    assert result.history["train_loss"].notna().all()
    x, *args = (t.to(device) for t in data(case))
    log_px = log_likelihood(model, guide, x, *args, num_samples=20)
    assert log_px.device.type == "cpu" and log_px.shape == (N,) and torch.isfinite(log_px).all()
    table = importance_diagnostics(model, guide, x, *args, num_samples=30)
    assert len(table) == N and table["pareto_k"].notna().all()
    draws = latent_draws(guide, x, *args, num_samples=3)
    assert all(value.device.type == target.type for value in draws.values())
    idata = to_inference_data(model, guide, x[:5], *(a[:5] for a in args), num_samples=4)
    assert "posterior" in idata.groups()
    generated = model.generate(4, y=1) if case == "cvae" else model.generate(4)
    assert generated.shape == (4, X_DIM) and generated.device.type == target.type


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["vae-gaussian", "vae-flow"])
def test_gaps_snr_and_calibration_on_the_device(case: str, device: str) -> None:
    _, model, guide, _ = train(case, device)
    x = data(case)[0].to(device)
    gaps = inference_gaps(model, guide, x[:6], steps=3, num_samples=10, progress=False)
    assert len(gaps) == 6 and gaps.notna().all().all()
    snr = gradient_snr(model, guide, x[:6], objective="iwae-dreg:k=4", num_estimates=3)
    assert set(snr.group) == {"encoder", "decoder"} and snr.snr_mean.notna().all()
    sbc = calibration(model, guide, num_simulations=20, num_draws=9, bins=5, progress=False)
    assert len(sbc.table) == 3 and sbc.table.chi2_p.between(0, 1).all()


@pytest.mark.parametrize(("train_device", "load_device"), DEVICE_PAIRS)
@pytest.mark.parametrize("case", ["vae-flow", "vqvae"])
def test_a_run_and_its_checkpoint_load_onto_another_device(tmp_path: Path, case: str, train_device: str,
                                                           load_device: str) -> None:
    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    config, model, guide, result = train(case, train_device, checkpoint)
    save_run(tmp_path / "run", config, model, guide, result.history)
    run = load_run(tmp_path / "run", device=load_device)
    for trained, loaded in ((model, run.model), (guide, run.guide)):
        for (name, value), loaded_value in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert loaded_value.device.type == torch.device(load_device).type, name
            assert torch.equal(value.cpu(), loaded_value.cpu()), name
    tensors, _ = read_checkpoint(checkpoint, load_device)
    assert {t.device.type for t in tensors.values()} == {torch.device(load_device).type}
    # Training goes on on the other device from the checkpoint.
    _, model, guide = build(case)
    x, *args = data(case)
    resumed = fit(model, guide, x, args=args, objective=CASES[case][2], epochs=3, batch_size=BATCH,
                  device=load_device, progress=False, checkpoint=checkpoint, resume=True, **particles(case))
    assert list(resumed.history["epoch"]) == [1, 2, 3]
    assert next(model.parameters()).device.type == torch.device(load_device).type


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_the_training_step_never_waits_for_the_device(case: str, device: str, monkeypatch) -> None:
    """Reads of tensor values on the host (each a sync on CUDA) happen per epoch, not per step.

    Counts every Python-level read (``.item()``, ``bool(t)``, ``.cpu()``, ...) during two
    epochs of 6 and of 12 steps: the counts must be equal, so no step reads anything.
    """
    counts: collections.Counter[str] = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            counts[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    seen = []
    for points in (6 * BATCH, 12 * BATCH):
        counts.clear()
        train(case, device, points=points)
        seen.append(dict(counts))
    assert seen[0] == seen[1]


@pytest.mark.parametrize("case", ["vae-gaussian", "vqvae"])
def test_cuda_training_runs_with_synchronizations_reported_as_errors(case: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    # fit's steps between its per-epoch reads: torch itself must not synchronize in them either.
    _, model, guide = build(case)
    x, *args = (t.cuda() for t in data(case))
    model.cuda(), guide.cuda()
    objective = get_objective(CASES[case][2])
    params = [*model.parameters(), *guide.parameters()]
    optimizer = make_adam(params, 1e-3)
    take_step = step_function(optimizer, params, clip_grad_norm=1.0)
    sums = RunningSums.zeros("cuda")
    objective.differentiable_loss(model, guide, x[:BATCH], *(a[:BATCH] for a in args)).backward()  # the validated run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pyro.validation_enabled(False):
            for order in torch.randperm(N, device="cuda").split(BATCH):
                loss = objective.differentiable_loss(model, guide, x[order], *(a[order] for a in args))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                take_step(loss.detach(), BATCH, sums)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_data_too_large_for_the_gpu_stream_from_pinned_memory_with_the_same_result(monkeypatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    resident = train("cvae", "cuda")[3].history
    monkeypatch.setattr("elbolab.inference.staging.DEVICE_DATA_FRACTION", 0.0)  # nothing fits: stream every batch
    streamed = train("cvae", "cuda")[3].history
    torch.testing.assert_close(torch.tensor(streamed["train_loss"].to_numpy()), torch.tensor(resident["train_loss"].to_numpy()))


@CUDA
def test_a_compiled_fit_on_cuda_follows_the_eager_one_and_its_estimate_too():
    # CUDA graphs of the compiled step (Inductor's triton.cudagraphs), with the state marked static.
    from elbolab import VAE, GaussianGuide, load_dataset
    from elbolab.inference import importance_estimate

    data = load_dataset("digits", "train", binarize="dynamic")
    results = []
    for compile in (False, True):
        pyro.set_rng_seed(0)
        model, guide = VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))
        result = fit(model, guide, data, epochs=3, batch_size=200, device="cuda", progress=False, compile=compile)
        assert result.compiled == compile
        torch.manual_seed(1)
        x = data.fixed_binarization(0).x[:300].cuda()
        estimate = importance_estimate(model, guide, x, num_samples=50, compile=compile)
        results.append((result.history["train_loss"].tolist(), estimate.log_likelihood.mean().item()))
    (eager_curve, eager_ll), (compiled_curve, compiled_ll) = results
    assert compiled_curve == pytest.approx(eager_curve, rel=1e-3)
    assert compiled_ll == pytest.approx(eager_ll, rel=1e-3)
