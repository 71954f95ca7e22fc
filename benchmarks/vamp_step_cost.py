"""The cost of a VampPrior: one IWAE training step with the standard prior and with K pseudo-inputs.

The VampPrior runs the encoder on its K pseudo-inputs at every step, to score z under
(1/K) sum_k q(z | u_k). This measures what that costs on the IWAE paper's one-layer model
(784-200-200-50, tanh), K = 5 particles, batch 100, Adam, eager, in one process: blocks of
steps of each variant interleaved, the median per step printed with the ratio to the standard prior.

    python benchmarks/vamp_step_cost.py --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from elbolab.guides import GaussianGuide
from elbolab.inference import get_objective
from elbolab.models import VAE


def pair(prior: str, pseudo_inputs: int) -> tuple[VAE, GaussianGuide, torch.optim.Optimizer]:
    model = VAE(784, 50, hidden=(200, 200), activation="tanh", prior=prior, pseudo_inputs=pseudo_inputs)
    guide = GaussianGuide(784, 50, hidden=(200, 200), activation="tanh")
    if model.prior is not None:
        model.prior.share_encoder(guide)
    return model, guide, torch.optim.Adam([*model.parameters(), *guide.parameters()], 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks of each variant")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(100, 784).bernoulli()
    objective = get_objective("iwae", num_particles=5)
    variants = {"standard": pair("standard", 500), "vamp, K = 100": pair("vamp", 100), "vamp, K = 500": pair("vamp", 500)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with pyro.validation_enabled(False):
        for _ in range(args.repeats):
            for name, (model, guide, optimizer) in variants.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    optimizer.zero_grad()
                    objective.differentiable_loss(model, guide, x).backward()
                    optimizer.step()
                seconds[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(seconds["standard"])
    for name, values in seconds.items():
        print(f"{name}: {1000 * statistics.median(values):.1f} ms per step ({statistics.median(values) / base:.2f}x)")


if __name__ == "__main__":
    main()
