"""Training throughput of elbolab's `fit` against a hand-written plain-PyTorch loop, in one process.

The same VAE (784-400-20, ReLU, Bernoulli likelihood, diagonal-Gaussian encoder with a softplus
scale), batch 128, Adam 1e-3, one epoch over the same data with the same shuffling, run
interleaved so that both see the same machine load. Prints steps per second of each (median over
repeats) and their ratio, on CPU and on CUDA when present.

    python benchmarks/train_throughput.py [--data-dir ../shared/data/binarized_mnist] [--repeats 7]

Data: the binarized MNIST training set when found, else random binary images of the same shape
(the throughput does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import pyro
import pyro.infer
import torch
import torch.nn.functional as F
from torch import nn

from elbolab import VAE, GaussianGuide, fit, load_dataset

X_DIM, HIDDEN, Z_DIM, BATCH = 784, 400, 20, 128


def plain_pytorch_epoch(x: torch.Tensor, analytic_kl: bool, device: torch.device, fused: bool = False):
    """A plain-PyTorch VAE and one training epoch of it, written as a user would.

    ``fused=True`` gives it the fused Adam that elbolab's ``fit`` uses, so that the ratio
    isolates what a Pyro program costs over hand-written tensor code.
    """
    encoder = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * Z_DIM)).to(device)
    decoder = nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, X_DIM)).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3, fused=fused or None)

    def epoch() -> None:
        total = torch.zeros((), device=device)
        for index in torch.randperm(x.shape[0], device=device).split(BATCH):
            batch = x[index]
            loc, raw_scale = encoder(batch).split(Z_DIM, dim=-1)
            scale = F.softplus(raw_scale) + 1e-4
            eps = torch.randn_like(loc)
            z = loc + scale * eps
            reconstruction = F.binary_cross_entropy_with_logits(decoder(z), batch, reduction="sum")
            if analytic_kl:
                kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - 2 * scale.log()).sum()
            else:  # log q(z|x) - log p(z) at the sampled z
                kl = (-0.5 * eps.pow(2) - scale.log() + 0.5 * z.pow(2)).sum()
            loss = reconstruction + kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        total.item()

    return epoch


def elbolab_epoch(x: torch.Tensor, objective, device: torch.device):
    model, guide = VAE(X_DIM, Z_DIM, hidden=(HIDDEN,)), GaussianGuide(X_DIM, Z_DIM, hidden=(HIDDEN,))

    def epoch() -> None:
        fit(model, guide, x, objective=objective, epochs=1, batch_size=BATCH, lr=1e-3, device=device, progress=False)

    return epoch


def measure(device: torch.device, x: torch.Tensor, repeats: int) -> list[str]:
    x = x.to(device)
    steps = math.ceil(x.shape[0] / BATCH)
    variants = {
        "plain PyTorch, MC KL, default Adam": plain_pytorch_epoch(x, False, device),
        "plain PyTorch, MC KL, fused Adam": plain_pytorch_epoch(x, False, device, fused=True),
        "elbolab fit, elbo": elbolab_epoch(x, "elbo", device),
        "plain PyTorch, analytic KL, default Adam": plain_pytorch_epoch(x, True, device),
        "plain PyTorch, analytic KL, fused Adam": plain_pytorch_epoch(x, True, device, fused=True),
        "elbolab fit, elbo-analytic": elbolab_epoch(x, "elbo-analytic", device),
        "elbolab fit, Pyro's TraceMeanField_ELBO": elbolab_epoch(x, pyro.infer.TraceMeanField_ELBO(), device),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(steps / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = [f"device {device}: {steps} steps per epoch, median of {repeats} interleaved epochs (steps/s)"]
    for name, value in median.items():
        lines.append(f"  {name:44s} {value:8.1f}")
    for name in [n for n in median if n.startswith("elbolab")]:
        kl = "analytic KL" if ("analytic" in name or "TraceMeanField" in name) else "MC KL"
        default = median[f"plain PyTorch, {kl}, default Adam"]
        fused = median[f"plain PyTorch, {kl}, fused Adam"]
        lines.append(f"  ratio {name:38s} {value_ratio(median[name], default)} vs plain with default Adam, "
                     f"{value_ratio(median[name], fused)} vs plain with fused Adam")
    return lines


def value_ratio(value: float, reference: float) -> str:
    return f"{value / reference:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--points", type=int, default=50_000, help="images per epoch")
    args = parser.parse_args()
    try:
        x = load_dataset("binarized-mnist", "train", data_dir=args.data_dir).x[: args.points]
        source = "binarized MNIST"
    except Exception:
        x = torch.bernoulli(torch.full((args.points, X_DIM), 0.13))
        source = "random binary images"
    pyro.set_rng_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"elbolab {commit}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, data: {source}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print("\n".join(measure(device, x, args.repeats)))


if __name__ == "__main__":
    main()
