"""Test log-likelihood of the IWAE paper's one-stochastic-layer VAE on binarized MNIST.

Architecture of Burda et al. (2016), section 5: 784-200-200-50 encoder and 50-200-200-784
decoder, tanh, Bernoulli likelihood; batch 100, Adam 1e-3; trained on the 60,000 train+valid
images of Larochelle & Murray's fixed binarization, evaluated on the 10,000 test images with
K = 5000 importance samples.

    python benchmarks/mnist_loglik.py --data-dir ../shared/data/binarized_mnist --epochs 30
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import pyro
import torch

from elbolab import VAE, GaussianGuide, fit, importance_estimate, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/binarized_mnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--objective", default="elbo")
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-bias-init", action="store_true", help="leave the decoder's output bias at its random init")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    train = load_dataset("binarized-mnist", "train+valid", data_dir=args.data_dir)
    test = load_dataset("binarized-mnist", "test", data_dir=args.data_dir)
    pyro.set_rng_seed(args.seed)
    model = VAE(784, 50, hidden=(200, 200), activation="tanh")
    if not args.no_bias_init:
        model.init_output_bias(train.x)
    guide = GaussianGuide(784, 50, hidden=(200, 200), activation="tanh")
    start = time.perf_counter()
    result = fit(model, guide, train, objective=args.objective, particles=args.particles,
                 epochs=args.epochs, batch_size=100, lr=1e-3, seed=args.seed, device=args.device)
    train_seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    start = time.perf_counter()
    pyro.set_rng_seed(args.seed)
    estimate = importance_estimate(model, guide, test.x.to(device), num_samples=args.num_samples, progress=None)
    eval_seconds = time.perf_counter() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "objective": args.objective,
        "particles": args.particles,
        "epochs": args.epochs,
        "output_bias_init": not args.no_bias_init,
        "test_elbo": estimate.elbo.mean().item(),
        "test_log_likelihood": estimate.log_likelihood.mean().item(),
        "num_samples": args.num_samples,
        "final_train_loss": float(result.history["train_loss"].iloc[-1]),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": commit,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
