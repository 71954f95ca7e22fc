"""The cost of K particles: one IWAE training step of elbolab against hand-vectorized PyTorch.

One training step (loss, backward, fused Adam update) of the IWAE paper's one-stochastic-layer VAE
(784-200-200-50 encoder and decoder, tanh, Bernoulli), batch 100, at K = 1, 5 and 50 particles:

- ``plain iwae``: the bound written by hand on ``[K, B, ...]`` tensors, the reference;
- ``elbolab iwae``: ``IWAE(num_particles=K).differentiable_loss`` on the same network weights;
- ``plain dreg``: the DReG estimator by hand (Tucker et al. 2019): ``log q`` under stopped
  gradients and a hook on ``z`` that multiplies the guide's path by the normalized weights;
- ``elbolab iwae-dreg``: ``IWAE(num_particles=K, gradient="dreg")``;
- ``pyro RenyiELBO``: Pyro's stock ``RenyiELBO(alpha=0, vectorize_particles=True)`` through its
  ``loss_and_grads`` (it has no ``differentiable_loss``), the anchor to beat.

Every variant has its own copy of the same initial weights and its own fused Adam; they run
interleaved in a shuffled order, so all see the same machine load. Prints the median milliseconds
per step and, for each ratio (elbolab / plain), the median over repeats of the ratio within a repeat.

    python benchmarks/iwae_step_cost.py [--data-dir ../shared/data/binarized_mnist] [--steps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.infer
import torch
import torch.nn.functional as F

from elbolab import VAE, GaussianGuide, load_dataset
from elbolab.inference.iwae import IWAE
from elbolab.inference.step import make_adam

X_DIM, HIDDEN, Z_DIM, BATCH = 784, (200, 200), 50, 100
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def plain_step(model: VAE, guide: GaussianGuide, k: int, dreg: bool) -> Callable[[torch.Tensor], None]:
    """A hand-vectorized IWAE (or DReG) step on private copies of the model's and guide's networks."""
    encoder, decoder = copy.deepcopy(guide.encoder), copy.deepcopy(model.decoder)
    optimizer = make_adam([*encoder.parameters(), *decoder.parameters()], 1e-3)

    def step(x: torch.Tensor) -> None:
        loc, scale = encoder(x)  # [B, D]
        eps = torch.randn((k, *loc.shape), device=x.device)
        z = loc + scale * eps  # [K, B, D]
        logits = decoder(z)  # [K, B, 784]
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -(0.5 * z.pow(2) + HALF_LOG_2PI).sum(-1)
        if dreg:  # log q with the guide's parameters held fixed: only the path through z remains
            log_q = -(0.5 * ((z - loc.detach()) / scale.detach()).pow(2) + scale.detach().log() + HALF_LOG_2PI).sum(-1)
        else:
            log_q = -(0.5 * eps.pow(2) + scale.log() + HALF_LOG_2PI).sum(-1)
        log_w = log_px + log_pz - log_q  # [K, B]
        if dreg:
            weights = torch.softmax(log_w, 0).detach()
            z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
            loss = -(weights * log_w).sum()
        else:
            loss = -(log_w.logsumexp(0) - math.log(k)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def elbolab_step(model: VAE, guide: GaussianGuide, k: int, gradient: str) -> Callable[[torch.Tensor], None]:
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    objective = IWAE(num_particles=k, gradient=gradient)
    optimizer = make_adam([*model.parameters(), *guide.parameters()], 1e-3)

    def step(x: torch.Tensor) -> None:
        loss = objective.differentiable_loss(model, guide, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pyro_renyi_step(model: VAE, guide: GaussianGuide, k: int) -> Callable[[torch.Tensor], None]:
    """Pyro's own importance-weighted objective, as its documentation uses it (``pyro.module``)."""
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    objective = pyro.infer.RenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    optimizer = make_adam([*model.parameters(), *guide.parameters()], 1e-3)

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        pyro.module("model", model)
        return model(x)

    def guide_fn(x: torch.Tensor) -> torch.Tensor:
        pyro.module("guide", guide)
        return guide(x)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        objective.loss_and_grads(model_fn, guide_fn, x)
        optimizer.step()

    return step


def measure(x: torch.Tensor, k: int, steps: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step of every variant at K = ``k`` (median), and each ratio's median over repeats."""
    pyro.set_rng_seed(0)
    model = VAE(X_DIM, Z_DIM, hidden=HIDDEN, activation="tanh").init_output_bias(x).to(device)
    guide = GaussianGuide(X_DIM, Z_DIM, hidden=HIDDEN, activation="tanh").to(device)
    variants = {
        "plain iwae": plain_step(model, guide, k, dreg=False),
        "elbolab iwae": elbolab_step(model, guide, k, "standard"),
        "plain dreg": plain_step(model, guide, k, dreg=True),
        "elbolab iwae-dreg": elbolab_step(model, guide, k, "dreg"),
        "pyro RenyiELBO": pyro_renyi_step(model, guide, k),
    }
    batches = [x[i * BATCH : (i + 1) * BATCH].to(device) for i in range(steps)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    with pyro.validation_enabled(False):
        for run in variants.values():  # warm-up: first-call costs, allocator, plate-nesting trace
            for batch in batches[:3]:
                run(batch)
        for _ in range(repeats):
            shuffler.shuffle(order)  # no variant always runs right after the same one
            for name in order:
                _sync(device)
                start = time.perf_counter()
                for batch in batches:
                    variants[name](batch)
                _sync(device)
                times[name].append(1000 * (time.perf_counter() - start) / steps)
    pyro.clear_param_store()
    result = {name: statistics.median(t) for name, t in times.items()}
    # Ratios within a repeat compare runs seconds apart: robust to the machine's load drifting.
    for name, reference in RATIOS.items():
        result[f"{name} / {reference}"] = statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))
    return result


RATIOS = {"elbolab iwae": "plain iwae", "elbolab iwae-dreg": "plain dreg", "pyro RenyiELBO": "plain iwae"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--particles", default="1,5,50", help="comma-separated K values")
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median is reported")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        x = load_dataset("binarized-mnist", "train", data_dir=args.data_dir).x[: args.steps * BATCH]
        source = "binarized MNIST"
    except Exception:
        x = torch.bernoulli(torch.full((args.steps * BATCH, X_DIM), 0.13))
        source = "random binary images"
    device = torch.device(args.device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"elbolab {commit}, torch {torch.__version__}, pyro {pyro.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, data: {source}")
    print(f"median ms per step over {args.repeats} interleaved repeats of {args.steps} steps, batch {BATCH}")
    header = f"{'K':>4} | {'plain iwae':>10} | {'elbolab iwae':>12} | {'ratio':>5} | {'plain dreg':>10} | " \
             f"{'elbolab dreg':>12} | {'ratio':>5} | {'pyro Renyi':>10} | {'ratio':>5}"
    print(header)
    for k in (int(v) for v in args.particles.split(",")):
        ms = measure(x, k, args.steps, args.repeats, device)
        ratios = [ms[f"{name} / {reference}"] for name, reference in RATIOS.items()]
        print(f"{k:>4} | {ms['plain iwae']:10.2f} | {ms['elbolab iwae']:12.2f} | {ratios[0]:5.2f} | "
              f"{ms['plain dreg']:10.2f} | {ms['elbolab iwae-dreg']:12.2f} | {ratios[1]:5.2f} | "
              f"{ms['pyro RenyiELBO']:10.2f} | {ratios[2]:5.2f}", flush=True)


if __name__ == "__main__":
    main()
