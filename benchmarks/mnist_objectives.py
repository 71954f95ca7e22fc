"""ELBO against IWAE with K = 5 and 50 on binarized MNIST, next to the IWAE paper's figures.

Runs ``elbolab compare`` with the one-stochastic-layer architecture of Burda et al. (2016),
section 5 (784-200-200-50 encoder and 50-200-200-784 decoder, tanh, Bernoulli), batch 100,
Adam 1e-3, trained on the 60,000 train+valid images of the fixed binarization for the same number
of epochs under every objective, evaluated on the 10,000 test images with K = 5000 importance
samples. Prints the test log-likelihoods next to the paper's (its appendix, fixed binarization,
3,280 epochs: VAE -88.71, IWAE k=5 -87.63, k=50 -87.10) and exits 1 when an IWAE does not
beat the ELBO, the paper's ordering.

    python benchmarks/mnist_objectives.py --data-dir ../shared/data/binarized_mnist --epochs 20 --out runs/mnist-objectives
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from elbolab.cli import main as elbolab_main

PAPER = {"elbo": -88.71, "iwae:k=5": -87.63, "iwae:k=50": -87.10}  # Burda et al. 2016, appendix C


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every objective (the paper: 3,280)")
    parser.add_argument("--objectives", default=",".join(PAPER), help="default elbo,iwae:k=5,iwae:k=50")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples of the test log-likelihood")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist-objectives"))
    args = parser.parse_args()
    # The commit of the code that runs, read before a long run during which the tree may change.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    start = time.perf_counter()
    status = elbolab_main([
        "compare", "--data", "binarized-mnist", "--data-dir", args.data_dir, "--train-split", "train+valid",
        "--z-dim", "50", "--hidden", "200,200", "--activation", "tanh", "--batch-size", "100", "--lr", "1e-3",
        "--epochs", str(args.epochs), "--objectives", args.objectives, "--seeds", args.seeds,
        "--num-samples", str(args.num_samples), "--device", args.device, "--out", str(args.out), "--overwrite",
    ])
    if status:
        return status
    seconds = time.perf_counter() - start
    table = pd.read_csv(args.out / "comparison.csv")
    summary = table.groupby("objective", sort=False)[["test_elbo", "test_log_likelihood", "train_seconds"]].mean()
    print(f"\nelbolab {commit}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.epochs} epochs, seeds {args.seeds}, {seconds / 60:.1f} min in all")
    print(f"| objective | test ELBO | test log p(x), K = {args.num_samples} | paper, 3,280 epochs | train s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for objective, row in summary.iterrows():
        paper = f"{PAPER[objective]:.2f}" if objective in PAPER else "-"
        print(f"| {objective} | {row.test_elbo:.2f} | {row.test_log_likelihood:.2f} | {paper} | {row.train_seconds:.0f} |")
    log_lik = summary["test_log_likelihood"]
    iwaes = [name for name in log_lik.index if name.startswith("iwae")]
    if "elbo" not in log_lik.index or not iwaes:
        return 0
    beaten = all(log_lik[name] > log_lik["elbo"] for name in iwaes)
    print(f"paper's ordering (every IWAE above the ELBO on test log p(x)): {'reproduced' if beaten else 'NOT reproduced'}")
    return 0 if beaten else 1


if __name__ == "__main__":
    sys.exit(main())
