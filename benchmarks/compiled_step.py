"""Milliseconds per training step: elbolab eager and compiled against plain PyTorch (eager and torch.compile) and NumPyro.

Every variant takes the same steps on the same data: gather a batch of binarized MNIST by index
from a tensor on the device, compute the objective and its gradients, and update with Adam
(torch's fused kernel on every PyTorch side). The elbolab variants run `fit`'s own step:
`fit`'s eager step function, and `CompiledStep` (``fit(..., compile=True)``), built as `fit` builds
them. The variants of a case run interleaved, ``--steps`` steps each per repeat, and the medians
over ``--repeats`` repeats are printed, with ratios against plain eager PyTorch.

Cases (``--cases``, comma-separated):

- ``vae400``: 784-400-20 Bernoulli VAE, batch 128 (compute dominates on 2 CPU cores);
- ``vae64``: 784-64-20, batch 32 (Python overhead dominates);
- ``iwae5``, ``iwae50``: the 784-400-20 VAE under IWAE with K = 5 and 50 samples, against a
  hand-vectorized plain IWAE step;
- ``hvae``: the two-stochastic-layer VAE of the IWAE paper (784-200-200-100-100-100-50);
- ``iaf``: the 784-400-20 VAE with an IAF guide of depth 4.

NumPyro's jitted ``SVI(Trace_ELBO)`` of the same VAE (``vae400``, ``vae64``) runs in a second
process, from a separate environment given with ``--numpyro-python`` (NumPyro and JAX must not
share this process with torch's threads); it is asked for its blocks of steps in turn with
the others (numpyro_step.py), so that it is interleaved too:

    python3 -m venv /tmp/numpyro-venv && /tmp/numpyro-venv/bin/pip install numpyro jax jaxlib
    python benchmarks/compiled_step.py --numpyro-python /tmp/numpyro-venv/bin/python

Compile time is reported apart (the first step of each compiled variant) and is not in the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from elbolab import VAE, GaussianGuide, load_dataset
from elbolab.contract import check_pair
from elbolab.guides import FlowGuide
from elbolab.guides.hierarchical import BottomUpGuide
from elbolab.inference import get_objective
from elbolab.inference.compiled import CompiledStep
from elbolab.inference.staging import StagedData
from elbolab.inference.step import RunningSums, collect_params, make_adam, step_function
from elbolab.models import HierarchicalVAE

X_DIM = 784
NUMPYRO_SCRIPT = Path(__file__).with_name("numpyro_step.py")


def plain_vae_step(x: torch.Tensor, hidden: int, z_dim: int, batch: int, particles: int = 1,
                   compiled: bool = False) -> Callable[[], None]:
    """A hand-written VAE (or vectorized IWAE, ``particles > 1``) step with fused Adam, as a user writes it."""
    device = x.device
    encoder = nn.Sequential(nn.Linear(X_DIM, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim)).to(device)
    decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, X_DIM)).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3, fused=True)

    def loss_of(xb: torch.Tensor) -> torch.Tensor:
        loc, raw_scale = encoder(xb).split(z_dim, dim=-1)
        scale = F.softplus(raw_scale) + 1e-4
        eps = torch.randn((particles, *loc.shape), device=device)
        z = loc + scale * eps  # [K, B, z]
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), xb.expand(particles, *xb.shape), reduction="none").sum(-1)
        log_w = log_lik + (-0.5 * z.pow(2)).sum(-1) - (-0.5 * eps.pow(2) - scale.log()).sum(-1)  # the 2 pi terms cancel
        if particles == 1:
            return -log_w.sum()
        return -(torch.logsumexp(log_w, 0) - math.log(particles)).sum()

    loss_fn = torch.compile(loss_of) if compiled else loss_of
    order = torch.randperm(x.shape[0], device=device)
    position = [0]

    def step() -> None:
        start = position[0] % (x.shape[0] - batch)
        position[0] += batch
        loss = loss_fn(x[order[start:start + batch]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def elbolab_step(x: torch.Tensor, model: nn.Module, guide: nn.Module, objective: str, batch: int,
                 compiled: bool) -> Callable[[], None]:
    """`fit`'s step for this pair, eager or compiled, built the way `fit` builds it."""
    name, _, k = objective.partition(":k=")
    loss = get_objective(name, **({"num_particles": int(k)} if k else {}))
    model.to(x.device).train()
    guide.to(x.device).train()
    first = (x[:batch],)
    params = collect_params(model, guide, loss, first)
    optimizer = make_adam(params, 1e-3)
    sums = RunningSums.zeros(x.device)
    order = torch.randperm(x.shape[0], device=x.device)
    position = [0]
    if compiled:
        contract = check_pair(model, guide, first, {})
        compiled_step = CompiledStep(model, guide, loss, params, optimizer, contract, x.shape[0], None)
    else:
        take_step = step_function(optimizer, params, None)

    data = StagedData(x, (), dynamic=False, device=x.device)

    def step() -> None:  # fit's loop body
        start = position[0] % (x.shape[0] - batch)
        position[0] += batch
        index = order[start:start + batch]
        if compiled:
            compiled_step(data, index, batch, sums)
            return
        xb, = data.rows(index)
        optimizer.zero_grad(set_to_none=True)
        value = loss.differentiable_loss(model, guide, xb)
        value.backward()
        take_step(value.detach(), batch, sums)

    return step


def cases(x: torch.Tensor) -> dict[str, dict[str, Callable[[], Callable[[], None]]]]:
    """For each case, its variants: a name -> a builder of the step function."""
    def vae(hidden: int, z: int = 20):
        return lambda: (VAE(X_DIM, z, hidden=(hidden,)), GaussianGuide(X_DIM, z, hidden=(hidden,)))

    def hvae():
        model = HierarchicalVAE(X_DIM, z_dims=(100, 50), hidden=(200, 200), hidden_upper=(100, 100), activation="tanh")
        return model, BottomUpGuide(X_DIM, z_dims=(100, 50), hidden=(200, 200), hidden_upper=(100, 100), activation="tanh")

    def iaf():
        return VAE(X_DIM, 20, hidden=(400,)), FlowGuide(X_DIM, 20, hidden=(400,), flow="iaf", flow_depth=4)

    def pair_variants(build, objective: str, batch: int):
        return {
            "elbolab eager": lambda: elbolab_step(x, *build(), objective, batch, compiled=False),
            "elbolab compiled": lambda: elbolab_step(x, *build(), objective, batch, compiled=True),
        }

    def with_plain(hidden: int, batch: int, particles: int, objective: str):
        return {
            "plain PyTorch eager": lambda: plain_vae_step(x, hidden, 20, batch, particles),
            "plain PyTorch torch.compile": lambda: plain_vae_step(x, hidden, 20, batch, particles, compiled=True),
            **pair_variants(vae(hidden), objective, batch),
        }

    return {
        "vae400": with_plain(400, 128, 1, "elbo"),
        "vae64": with_plain(64, 32, 1, "elbo"),
        "iwae5": with_plain(400, 128, 5, "iwae:k=5"),
        "iwae50": with_plain(400, 128, 50, "iwae:k=50"),
        "hvae": pair_variants(hvae, "elbo", 128),
        "iaf": pair_variants(iaf, "elbo", 128),
    }


def timer(step: Callable[[], None], device: torch.device) -> Callable[[int], float]:
    """Milliseconds per step of ``steps`` calls of ``step``."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def block(steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - start) / steps * 1e3

    return block


class NumPyro:
    """NumPyro's step in a second process (numpyro_step.py), timed there, block by block on request."""

    def __init__(self, python: str, data_dir: str) -> None:
        self.process = subprocess.Popen([python, str(NUMPYRO_SCRIPT), "--data-dir", data_dir], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.versions = json.loads(self.process.stdout.readline())["ready"]

    def timer(self, case: str) -> Callable[[int], float]:
        def block(steps: int) -> float:
            self.process.stdin.write(f"{case} {steps}\n")
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline())["ms"]

        return block

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def measure(name: str, variants: dict[str, Callable[[], Callable[[], None]]], steps: int, repeats: int,
            device: torch.device, numpyro: NumPyro | None) -> dict[str, float]:
    timers, setup = {}, {}
    for variant, build in variants.items():
        pyro.set_rng_seed(0)
        start = time.perf_counter()
        step = build()
        step()  # compiles the compiled variants
        timers[variant] = timer(step, device)
        timers[variant](3)
        setup[variant] = time.perf_counter() - start
    if numpyro is not None and name in ("vae400", "vae64"):
        timers[f"NumPyro jit ({numpyro.versions}), 2nd process"] = numpyro.timer(name)
    times: dict[str, list[float]] = {variant: [] for variant in timers}
    for _ in range(repeats):
        for variant, block in timers.items():
            times[variant].append(block(steps))
    median = {variant: statistics.median(t) for variant, t in times.items()}
    reference = "plain PyTorch eager" if "plain PyTorch eager" in median else "elbolab eager"
    print(f"{name} on {device}: ms per step, median of {repeats} interleaved repeats of {steps} steps")
    for variant, value in median.items():
        built = f"   (build + first steps {setup[variant]:.1f} s)" if "compile" in variant else ""
        print(f"  {variant:50s} {value:8.3f} ms   x{median[reference] / value:5.2f} vs {reference}{built}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--cases", default="vae400,vae64,iwae5,iwae50,hvae,iaf")
    parser.add_argument("--steps", type=int, default=100, help="steps per variant per repeat (iwae50: a fifth)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--numpyro-python", help="a Python with numpyro and jax installed (see above)")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        x = load_dataset("binarized-mnist", "train", data_dir=args.data_dir).x
        source = "binarized MNIST"
    except Exception:
        x = torch.bernoulli(torch.full((50_000, X_DIM), 0.13))
        source = "random binary images (binarized MNIST not found)"
    x = x.to(device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"elbolab {commit}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, data: {source}")
    every = cases(x)
    unknown = sorted(set(args.cases.split(",")) - set(every))
    if unknown:
        sys.exit(f"unknown case {unknown[0]}; choose from {', '.join(every)}")
    numpyro = NumPyro(args.numpyro_python, args.data_dir) if args.numpyro_python else None
    try:
        with pyro.validation_enabled(False):
            for name in args.cases.split(","):
                steps = max(args.steps // 5, 5) if name == "iwae50" else args.steps
                measure(name, every[name], steps, args.repeats, device, numpyro)
    finally:
        if numpyro is not None:
            numpyro.close()


if __name__ == "__main__":
    main()
