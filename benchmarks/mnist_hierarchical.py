"""Two stochastic layers against one on binarized MNIST, under the same objective and budget.

Trains, with ``elbolab fit`` and ``iwae`` (K = 5) for the same number of epochs, the IWAE paper's
two architectures (Burda et al. 2016, section 5; tanh, Bernoulli, batch 100, Adam 1e-3, on the
60,000 train+valid images of the fixed binarization):

- one stochastic layer: 784-200-200-50 encoder and decoder (``--model vae``);
- two stochastic layers: x -> 200-200 -> z1 = 100 -> 100-100 -> z2 = 50 (``--model hvae``),
  with the paper's bottom-up guide and with the ladder guide (top-down inference).

Each run is evaluated on the 10,000 test images with K = 5000 importance samples (``elbolab
evaluate``). Prints a markdown table for benchmarks/RESULTS.md.

    python benchmarks/mnist_hierarchical.py --data-dir ../shared/data/binarized_mnist --epochs 20 --out runs/mnist-hierarchical
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from elbolab.cli import main as elbolab_main

ARCHITECTURE = ["--hidden", "200,200", "--activation", "tanh", "--batch-size", "100", "--lr", "1e-3"]
RUNS = {
    "one layer (vae, z = 50)": ["--model", "vae", "--z-dim", "50"],
    "two layers, bottom-up guide (hvae, z = 100, 50)": ["--model", "hvae", "--z-dims", "100,50", "--hidden-upper", "100,100", "--guide", "bottom-up"],
    "two layers, ladder guide (hvae, z = 100, 50)": ["--model", "hvae", "--z-dims", "100,50", "--hidden-upper", "100,100", "--guide", "ladder"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every model")
    parser.add_argument("--objective", default="iwae", help="default iwae")
    parser.add_argument("--particles", type=int, default=5, help="K of the training objective (default 5)")
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples of the test log-likelihood")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/mnist-hierarchical"))
    args = parser.parse_args()
    # The commit of the code that runs, read before a long run during which the tree may change.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    rows = []
    start = time.perf_counter()
    for label, options in RUNS.items():
        folder = args.out / options[1] / (options[-1] if "--guide" in options else "gaussian")
        status = elbolab_main([
            "fit", "--data", "binarized-mnist", "--data-dir", args.data_dir, "--train-split", "train+valid",
            *ARCHITECTURE, *options, "--objective", args.objective, "--particles", str(args.particles),
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device,
            "--out", str(folder), "--overwrite",
        ])
        status = status or elbolab_main(["evaluate", str(folder), "--num-samples", str(args.num_samples),
                                         "--device", args.device, "--quiet"])
        if status:
            return status
        metrics = json.loads((folder / "metrics.json").read_text())
        history = pd.read_csv(folder / "history.csv")
        rows.append({"model": label, "test_elbo": metrics["test_elbo"], "test_log_likelihood": metrics["test_log_likelihood"],
                     "train_seconds": history["seconds"].sum()})
    minutes = (time.perf_counter() - start) / 60
    print(f"\nelbolab {commit}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.objective} K = {args.particles}, {args.epochs} epochs, seed {args.seed}, {minutes:.1f} min in all")
    print(f"| model | test ELBO | test log p(x), K = {args.num_samples} | training |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['test_elbo']:.2f} | {row['test_log_likelihood']:.2f} | {row['train_seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
