"""The GPU goals of data-parallel / CUDA training, measured: epoch time and log-likelihood time.

On binarized MNIST with the IWAE paper's one-stochastic-layer model (Burda et al. 2016:
784-200-200-50, tanh, Bernoulli likelihood, diagonal-Gaussian encoder):

1. seconds per training epoch of ``fit`` over the 50,000 training images, at each batch size
   (median over the epochs after the first, from ``fit``'s own history: setup excluded);
2. seconds of ``log_likelihood`` with 5,000 importance samples over the 10,000 test images,
   with evaluation chunks sized from the GPU's free memory and, for comparison, with the fixed
   CPU-sized chunks (the lever it replaces).

    python benchmarks/gpu_goals.py [--device cuda] [--data-dir ../shared/data/binarized_mnist]

Goals on an H100 or H200: an epoch in under 1 s and log p(x) in under 10 s; the throughput ratio
against plain PyTorch at batch 128 is benchmarks/train_throughput.py's. On a CPU the same script
runs (use --points, --test-points and --num-samples to keep it short).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import pyro
import torch

from elbolab import VAE, GaussianGuide, fit, load_dataset
from elbolab.inference import evaluate, log_likelihood, resolve_device

X_DIM, HIDDEN, Z_DIM = 784, (200, 200), 50


def load(data_dir: str, split: str, points: int) -> tuple[torch.Tensor, str]:
    try:
        return load_dataset("binarized-mnist", split, data_dir=data_dir).x[:points], "binarized MNIST"
    except Exception:  # the timings do not depend on the pixel values
        return torch.bernoulli(torch.full((points, X_DIM), 0.13)), "random binary images"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--batch-sizes", default="128,1000", help="comma-separated (default 128,1000)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per batch size; the first is not counted (default 4)")
    parser.add_argument("--points", type=int, default=50_000, help="training images (default 50,000)")
    parser.add_argument("--test-points", type=int, default=10_000, help="test images (default 10,000)")
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples per test image (default 5000)")
    parser.add_argument("--compile", action="store_true", help="compiled training step and estimate (fit and log_likelihood compile=True)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    train, source = load(args.data_dir, "train", args.points)
    test, _ = load(args.data_dir, "test", args.test_points)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"elbolab {commit}, torch {torch.__version__}, {device} ({name}), data: {source}")

    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        pyro.set_rng_seed(0)
        model = VAE(X_DIM, Z_DIM, hidden=HIDDEN, activation="tanh")
        guide = GaussianGuide(X_DIM, Z_DIM, hidden=HIDDEN, activation="tanh")
        history = fit(model, guide, train, epochs=args.epochs, batch_size=batch_size, device=device, progress=False,
                      compile=args.compile).history
        seconds = history["seconds"].iloc[1:] if len(history) > 1 else history["seconds"]
        print(f"  fit, batch {batch_size:5d}: {statistics.median(seconds):7.3f} s per epoch of {len(train)} images "
              f"(median of {len(seconds)}; epoch 1 took {history['seconds'].iloc[0]:.3f} s), "
              f"final training loss {history['train_loss'].iloc[-1]:.2f}")

    x = test.to(device)
    levers = [("chunks sized from free GPU memory", evaluate.GPU_MEMORY_FRACTION), ("fixed CPU-sized chunks", 0.0)]
    for label, fraction in levers if device.type == "cuda" else levers[1:]:
        evaluate.GPU_MEMORY_FRACTION = fraction
        # Warm-up; compiled, on the timed call's chunk shapes, whose graphs the timed call then reuses.
        warm = (x, args.num_samples) if args.compile else (x[:10], 10)
        log_likelihood(model, guide, warm[0], num_samples=warm[1], compile=args.compile)
        synchronize(device)
        start = time.perf_counter()
        log_px = log_likelihood(model, guide, x, num_samples=args.num_samples, compile=args.compile)
        synchronize(device)
        print(f"  log_likelihood, {args.num_samples} samples x {len(x)} images, {label}: "
              f"{time.perf_counter() - start:7.2f} s (mean log p(x) {log_px.mean():.2f})")


if __name__ == "__main__":
    main()
