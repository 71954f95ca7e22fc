"""Gaussian, mixture and flow guides on binarized MNIST under the same model, objective and budget.

The one-stochastic-layer model of Burda et al. (2016) (784-200-200-50 decoder, tanh, Bernoulli;
the guides' encoders 784-200-200), trained under ``elbo`` for the same number of epochs with the
same seed, batch 100, Adam 1e-3, on the 60,000 train+valid images of the fixed binarization, with
three guides: ``GaussianGuide``, ``MixtureGuide`` (5 components) and ``FlowGuide`` (IAF, depth 4).
Each is evaluated on the 10,000 test images: test ELBO (one sample per point, averaged over
``--elbo-samples``) and log p(x) with K = 5000 importance samples. Exits 1 when the flow guide's
test ELBO is not above the Gaussian guide's.

    python benchmarks/mnist_guides.py --data-dir ../shared/data/binarized_mnist --epochs 10
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from elbolab import (
    VAE,
    FlowGuide,
    GaussianGuide,
    MixtureGuide,
    fit,
    importance_estimate,
    load_dataset,
)

GUIDES = {
    "gaussian": lambda: GaussianGuide(784, 50, hidden=(200, 200), activation="tanh"),
    "mixture (5 components)": lambda: MixtureGuide(784, 50, components=5, hidden=(200, 200), activation="tanh"),
    "flow (IAF, depth 4)": lambda: FlowGuide(784, 50, flow="iaf", flow_depth=4, hidden=(200, 200), activation="tanh"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples of the test log-likelihood")
    parser.add_argument("--test-points", type=int, default=10_000, help="evaluate on the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    train = load_dataset("binarized-mnist", "train+valid", data_dir=args.data_dir)
    test_x = load_dataset("binarized-mnist", "test", data_dir=args.data_dir).x[: args.test_points]
    rows = {}
    for name, make_guide in GUIDES.items():
        pyro.set_rng_seed(args.seed)
        model = VAE(784, 50, hidden=(200, 200), activation="tanh").init_output_bias(train.x)
        guide = make_guide()
        start = time.perf_counter()
        fit(model, guide, train, objective="elbo", epochs=args.epochs, batch_size=100, lr=1e-3,
            seed=args.seed, device=args.device, progress=False)
        train_seconds = time.perf_counter() - start
        device = next(model.parameters()).device
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        estimate = importance_estimate(model, guide, test_x.to(device), num_samples=args.num_samples, progress=False)
        rows[name] = (estimate.elbo.mean().item(), estimate.log_likelihood.mean().item(), train_seconds,
                      time.perf_counter() - start)
        print(f"{name}: test ELBO {rows[name][0]:.2f}, test log p(x) {rows[name][1]:.2f}, "
              f"{train_seconds:.0f} s training", flush=True)
    print(f"\nelbolab {commit}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.epochs} epochs of elbo, seed {args.seed}, {len(test_x)} test images")
    print(f"| guide | test ELBO | test log p(x), K = {args.num_samples} | gap | train s | eval s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (elbo, log_lik, train_s, eval_s) in rows.items():
        print(f"| {name} | {elbo:.2f} | {log_lik:.2f} | {log_lik - elbo:.2f} | {train_s:.0f} | {eval_s:.0f} |")
    flow_better = rows["flow (IAF, depth 4)"][0] > rows["gaussian"][0]
    print(f"flow guide's test ELBO above the Gaussian guide's: {'yes' if flow_better else 'NO'}")
    return 0 if flow_better else 1


if __name__ == "__main__":
    sys.exit(main())
