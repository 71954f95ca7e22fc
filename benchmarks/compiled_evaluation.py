"""Seconds for an importance-sampled log p(x), eager against compiled (``importance_estimate(..., compile=True)``).

The IWAE paper's one-layer model (784-400-20 VAE here, as in ``mnist_loglik.py``), trained one
epoch on binarized MNIST, then ``--points`` test images with ``--samples`` importance samples
each, eagerly and compiled, interleaved over ``--repeats`` repeats (the compiled pair's graphs
are traced and compiled in a first, untimed call and reused: its one-off cost is printed apart).
The estimates themselves must agree (the same draws): the script prints both.

    python benchmarks/compiled_evaluation.py [--points 1000] [--samples 5000] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import pyro
import torch

from elbolab import VAE, GaussianGuide, fit, load_dataset
from elbolab.inference import importance_estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    train = load_dataset("binarized-mnist", "train", data_dir=args.data_dir)
    test = load_dataset("binarized-mnist", "test", data_dir=args.data_dir).x[: args.points].to(device)
    pyro.set_rng_seed(0)
    model, guide = VAE(784, 20, hidden=(400,)), GaussianGuide(784, 20, hidden=(400,))
    fit(model, guide, train, epochs=1, device=device, progress=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"elbolab {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}: "
          f"{args.points} test points x {args.samples} samples")

    def estimate(compile: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = importance_estimate(model, guide, test, num_samples=args.samples, compile=compile).log_likelihood.mean().item()
        return time.perf_counter() - start, value

    first, _ = estimate(True)
    print(f"  compiled, first call (trace + compile + the estimate): {first:.1f} s")
    times: dict[bool, list[float]] = {False: [], True: []}
    values = {}
    for _ in range(args.repeats):
        for compile in (False, True):
            seconds, values[compile] = estimate(compile)
            times[compile].append(seconds)
    eager, compiled = statistics.median(times[False]), statistics.median(times[True])
    print(f"  eager     {eager:8.2f} s   log p(x) {values[False]:.4f}")
    print(f"  compiled  {compiled:8.2f} s   log p(x) {values[True]:.4f}   x{eager / compiled:.2f}")


if __name__ == "__main__":
    main()
