"""Gradient SNR against K of a trained binarized-MNIST VAE: Rainforth et al. (2018)'s measurement.

Loads a run folder (``elbolab fit``), takes ``--points`` images of its training split, and
measures with :func:`elbolab.analysis.snr_against_k` the signal-to-noise ratio |mean| / std of
the encoder's and the decoder's gradients (mean over parameter elements, ``--estimates``
independent estimates each) under ``iwae``, ``iwae-dreg`` and ``iwae-stl`` at every K of
``--ks``. Prints the table and, per objective and group, the slope of log SNR against log K
(Rainforth et al.: -1/2 for IWAE's encoder, +1/2 for its decoder), and writes the figure.

    python benchmarks/mnist_gradient_snr.py runs/mnist-vae --out docs/figures/mnist_snr_against_k.png
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from elbolab.analysis import plot_snr_against_k, snr_against_k
from elbolab.runs import load_run


def _ks(text: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in text.split(","))
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: positive integers, comma-separated")
    return ks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of elbolab fit")
    parser.add_argument("--points", type=int, default=100, help="training images whose gradient is measured (default 100)")
    parser.add_argument("--ks", type=_ks, default=(1, 4, 16, 64, 256), help="particle counts (default 1,4,16,64,256)")
    parser.add_argument("--estimates", type=int, default=100, help="independent gradient estimates per K (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("snr_against_k.png"), help="the figure (default snr_against_k.png)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    run = load_run(args.run)
    data = run.config.data.load(run.config.data.train_split).fixed_binarization(run.config.fit.seed)
    x = data.x[: args.points]
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    table = snr_against_k(run.model, run.guide, x, ks=args.ks, num_estimates=args.estimates)
    seconds = time.perf_counter() - start
    print(f"{args.run}: {run.config.model.name} with a {run.config.guide.family} guide, {len(x)} training points, "
          f"{args.estimates} estimates per K; commit {commit}, torch {torch.__version__}, {platform.machine()}, "
          f"{seconds:.0f} s")
    wide = table.pivot_table(index=["group", "objective"], columns="k", values="snr_mean")
    print(wide.to_string(float_format=lambda v: f"{v:.3g}"))
    print("slope of log SNR against log K (Rainforth et al.: iwae encoder -0.5, decoder +0.5):")
    for (group, objective), rows in table.groupby(["group", "objective"], sort=False):
        slope = np.polyfit(np.log(rows.k.to_numpy(float)), np.log(rows.snr_mean.to_numpy(float)), 1)[0]
        print(f"  {group:8s} {objective:10s} {slope:+.2f}")
    plot_snr_against_k(table, args.out, title=f"gradient SNR against K: binarized MNIST, trained {run.config.guide.family} VAE")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
