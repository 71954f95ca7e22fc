"""Run by tests/inference/test_distributed.py under torchrun: short fits, each rank's parameters saved.

    torchrun --nproc-per-node=2 tests/inference/distributed_fit.py CASE[,CASE...] OUT [--epochs N] [--resume]

For each case, in turn in the same processes (as ``compare`` trains its runs), each rank writes
OUT/CASE/rank{R}.safetensors (its parameters after training, by name), and rank 0 writes
OUT/CASE/history.csv. Having left the process group, each rank writes OUT/threads-rank{R}.txt,
the names of its threads still running (Linux). :func:`run` also builds the single-process run
the test compares with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from safetensors.torch import save_file

from elbolab.guides import GaussianGuide
from elbolab.inference import fit
from elbolab.inference.distributed import environment_rank, leave_process_group
from elbolab.models import VAE, Autoencoder


def training_data() -> torch.Tensor:
    # 203 points: the last batch of 32 has 11, which two ranks split 6 and 5.
    generator = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((203, 12), 0.3), generator=generator)


def param_model(x: torch.Tensor) -> None:
    logits = pyro.param("logits", torch.zeros(x.shape[1]))
    scale = pyro.param("scale", torch.ones(()), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Bernoulli(logits=logits * scale).to_event(1), obs=x)


def run(case: str, epochs: int, checkpoint: Path | None = None, resume: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """Fit ``case`` and return its trained parameters by name, and the history."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = training_data()
    options = dict(epochs=epochs, batch_size=32, lr=0.01, device="cpu", seed=3, progress=False,
                   checkpoint=checkpoint, resume=resume)
    if case == "autoencoder":
        model = Autoencoder(12, 3, hidden=(16,))
        result = fit(model, None, x, objective="reconstruction", **options)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, result.history
    if case == "pyro-param":
        result = fit(param_model, None, x, objective="reconstruction", **options)
        store = pyro.get_param_store()
        return {k: store.get_param(k).detach().clone() for k in store.keys()}, result.history
    model, guide = VAE(12, 2, hidden=(16,)), GaussianGuide(12, 2, hidden=(16,))
    result = fit(model, guide, x, objective="elbo", **options)
    state = {f"model.{k}": v for k, v in model.state_dict().items()} | {f"guide.{k}": v for k, v in guide.state_dict().items()}
    return {k: v.detach().clone() for k, v in state.items()}, result.history


def thread_names() -> list[str] | None:
    """The names of this process's threads, as the kernel has them; ``None`` without ``/proc``."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(names)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    rank = environment_rank()
    try:
        for case in args.cases.split(","):
            folder = args.out / case
            folder.mkdir(parents=True, exist_ok=True)
            params, history = run(case, args.epochs, folder / "checkpoint.safetensors", args.resume)
            save_file({k: v.contiguous() for k, v in params.items()}, str(folder / f"rank{rank}.safetensors"))
            if rank == 0:
                history.to_csv(folder / "history.csv", index=False)
    finally:
        leave_process_group()  # as elbolab's CLI does: gloo's threads must not outlive the interpreter
    names = thread_names()
    if names is not None:
        (args.out / f"threads-rank{rank}.txt").write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
