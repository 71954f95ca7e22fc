"""The ``elbolab`` command: fit, evaluate, diagnose and sample from latent-variable models.

    elbolab fit --data digits --binarize dynamic --objective elbo --epochs 50 --out runs/digits
    elbolab evaluate runs/digits --num-samples 5000
    elbolab sample runs/digits --n 64
    elbolab diagnose runs/digits

Options come from flags or a TOML file (``--config``) with ``[data]``, ``[model]`` and ``[fit]``
tables, filling the same dataclasses; flags override the file. A user's mistake ends with one
line on stderr and exit status 2; no run folder is left half-written.
"""

from __future__ import annotations

__all__ = ["build_parser", "main"]

import argparse
import dataclasses
import math
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch

from elbolab.version import __version__
from elbolab.analysis import (
    K_HAT_BAD,
    K_HAT_GOOD,
    compare_runs,
    diagnose,
    plot_comparison_curves,
    plot_comparison_summary,
    plot_history,
    plot_image_grid,
    plot_reconstructions,
    summarize,
    to_markdown,
)
from elbolab.data import DATASETS, Dataset
from elbolab.errors import InputError
from elbolab.guides import FLOWS, GUIDE_FAMILIES, NearestCodeGuide
from elbolab.inference import FitConfig, fit, importance_estimate, resolve_device
from elbolab.runs import RunConfig, load_run, save_run
from elbolab.runs.folder import (
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    build_run_guide,
    build_run_model,
    unfinished_run,
)
from elbolab.inference.distributed import (
    environment_rank,
    environment_world_size,
    launch,
    leave_process_group,
)
from elbolab.inference.fit import TrainingInterrupted
from elbolab.inference.objectives import (
    OBJECTIVES,
    Reconstruction,
    get_objective,
    parse_objective_spec,
)
from elbolab.files import atomic_write, read_json, write_json
from elbolab.inference.training_checkpoint import CHECKPOINT_FILE, read_checkpoint
from elbolab.models import LIKELIHOODS, ConditionalVAE, as_condition
from elbolab.models.vae import MODEL_NAMES
from elbolab.models.vqvae import code_usage
from elbolab.nn import ACTIVATIONS

COMPARISON_FILE = "comparison.csv"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _seed(text: str) -> int:
    """An argparse type: a seed, 0 to 2**32 - 1 (the range every generator elbolab seeds accepts)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**32 - 1}, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    try:
        seeds = [_seed(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers from 0 to {2**32 - 1} such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat in {text!r}")
    return seeds


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _widths(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths such as 200,200, got {text!r}") from None


def _binarize(text: str) -> str | None:
    if text not in ("none", "threshold", "dynamic"):
        raise argparse.ArgumentTypeError(f"expected none, threshold or dynamic, got {text!r}")
    return None if text == "none" else text


def _obs_scale(text: str) -> float | None:
    return None if text == "learned" else _float(text)


# flag -> (config section, field, argparse options); every flag fills one dataclass field.
FIT_FLAGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "--data": ("data", "name", {"metavar": "NAME", "help": f"data set: {', '.join(DATASETS)} (default digits)"}),
    "--data-dir": ("data", "data_dir", {"metavar": "DIR", "help": "folder of the data set's files"}),
    "--binarize": ("data", "binarize", {"type": _binarize, "metavar": "MODE",
                   "help": "none, threshold (x>0.5) or dynamic (x~Bernoulli(x) per batch); default none"}),
    "--train-split": ("data", "train_split", {"choices": ["train", "train+valid"],
                      "help": "train (and report the validation ELBO each epoch) or train+valid"}),
    "--model": ("model", "name", {"choices": list(MODEL_NAMES),
                "help": "vae (default), cvae (conditional on the data set's labels), hvae (hierarchical: "
                "several stochastic layers), vqvae (vector-quantized), autoencoder"}),
    "--z-dim": ("model", "z_dim", {"type": _positive_int, "help": "latent width; vqvae: width of a code vector (default 20)"}),
    "--z-dims": ("model", "z_dims", {"type": _widths, "metavar": "W,W[,W...]",
                 "help": "hvae: widths of the stochastic layers, the one next to the data first (default 50,20)"}),
    "--hidden-upper": ("model", "hidden_upper", {"type": _widths, "metavar": "W[,W...]",
                       "help": "hvae: hidden widths between stochastic layers (default: --hidden)"}),
    "--codebook-size": ("model", "codebook_size", {"type": _int_at_least(2), "metavar": "K",
                        "help": "vqvae: number of codebook vectors (default 64)"}),
    "--num-codes": ("model", "num_codes", {"type": _positive_int, "metavar": "M",
                    "help": "vqvae: code vectors per data point (default 8)"}),
    "--commitment": ("model", "commitment", {"type": _float, "metavar": "BETA",
                     "help": "vqvae: weight of the commitment loss (default 0.25)"}),
    "--hidden": ("model", "hidden", {"type": _widths, "metavar": "W[,W...]",
                 "help": "hidden widths of the encoder, reversed in the decoder (default 400)"}),
    "--likelihood": ("model", "likelihood", {"choices": list(LIKELIHOODS), "help": "p(x|z) (default bernoulli)"}),
    "--activation": ("model", "activation", {"choices": list(ACTIVATIONS), "help": "default relu"}),
    "--obs-scale": ("model", "obs_scale", {"type": _obs_scale, "metavar": "S|learned",
                    "help": "gaussian likelihood: fixed scale, or learned per pixel (default)"}),
    "--guide": ("guide", "family", {"choices": [family for family in GUIDE_FAMILIES if family != "none"],
                "help": "q(z|x): vae and cvae: diagonal gaussian (default), mixture of gaussians, or normalizing "
                "flow; hvae: bottom-up (default) or ladder (top-down); vqvae: nearest-code (its only one)"}),
    "--components": ("guide", "components", {"type": _positive_int, "help": "mixture guide: components (default 5)"}),
    "--flow": ("guide", "flow", {"choices": list(FLOWS), "help": "flow guide: layer type (default iaf)"}),
    "--flow-depth": ("guide", "flow_depth", {"type": _positive_int, "help": "flow guide: layers (default 4)"}),
    "--objective": ("fit", "objective", {"metavar": "NAME", "help": "objective (default elbo); one of: " + ", ".join(OBJECTIVES)}),
    "--particles": ("fit", "particles", {"type": _positive_int, "help": "samples of z per data point (default 1)"}),
    "--beta": ("fit", "beta", {"type": _float, "help": "weight of the KL term, beta-VAE (default 1)"}),
    "--warmup": ("fit", "warmup", {"type": _non_negative_int, "metavar": "EPOCHS",
                 "help": "KL warm-up: beta rises linearly from 0 over this many epochs (default 0)"}),
    "--epochs": ("fit", "epochs", {"type": _positive_int, "help": "default 10"}),
    "--batch-size": ("fit", "batch_size", {"type": _positive_int, "help": "default 128"}),
    "--lr": ("fit", "lr", {"type": _float, "help": "Adam learning rate (default 1e-3)"}),
    "--clip-grad-norm": ("fit", "clip_grad_norm", {"type": _float, "metavar": "NORM",
                         "help": "rescale each gradient to at most this Euclidean norm (default: no clipping)"}),
    "--max-bad-steps": ("fit", "max_bad_steps", {"type": _positive_int, "metavar": "N",
                        "help": "a step with a non-finite loss or gradient is skipped; after N in a row the last good "
                        "state (end of the last epoch) is restored and the learning rate halved (default 10)"}),
    "--max-restorations": ("fit", "max_restorations", {"type": _non_negative_int, "metavar": "N",
                           "help": "stop, keeping the last checkpoint, after N restorations (default 3)"}),
    "--checkpoint-every": ("fit", "checkpoint_every", {"type": _positive_int, "metavar": "EPOCHS",
                           "help": "epochs between training checkpoints, which --resume continues from (default 1)"}),
    "--seed": ("fit", "seed", {"type": _seed, "help": "seed of initialisation, data order and sampling (default 0)"}),
    "--device": ("fit", "device", {"metavar": "DEV", "help": "auto, cpu, cuda or cuda:N (default auto)"}),
}


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """``--config`` and the flags of :data:`FIT_FLAGS`; only flags given on the command line override."""
    parser.add_argument("--config", type=Path, metavar="TOML",
                        help="TOML file with [data], [model], [fit] tables; flags override it")
    for flag, (section, name, options) in FIT_FLAGS.items():
        if flag in skip:
            continue
        if "choices" not in options:
            options = {"metavar": flag.lstrip("-").upper().replace("-", "_"), **options}
        parser.add_argument(flag, dest=f"{section}.{name}", default=argparse.SUPPRESS, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elbolab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"elbolab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    fit_parser = commands.add_parser(
        "fit", help="train a model and write a run folder",
        description="Train a model and guide with SVI and write a run folder: config.json, history.csv, "
        "weights.safetensors, loss_curves.png, reconstructions.png, samples.png.",
        epilog="examples:\n"
        "  elbolab fit --binarize dynamic --epochs 100 --out runs/digits\n"
        "  elbolab fit --data binarized-mnist --data-dir DIR --train-split train+valid \\\n"
        "      --hidden 200,200 --z-dim 50 --activation tanh --batch-size 100 --epochs 30\n"
        "  elbolab fit --config run.toml --seed 3   # [data], [model], [fit] tables; flags override\n\n"
        "A Bernoulli likelihood needs binary data: binarize grayscale data sets, or choose\n"
        "--likelihood continuous-bernoulli or gaussian with --binarize none.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(fit_parser)
    fit_parser.add_argument("--out", type=Path, metavar="DIR", help="run folder (default runs/DATA-MODEL[-GUIDE]-OBJECTIVE-seedN)")
    fit_parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    fit_parser.add_argument("--resume", type=Path, metavar="RUN",
                            help="continue the run in RUN from its checkpoint, with the options it was started with "
                            "(only --epochs, to train longer, --device, --data-dir and --nproc may be given)")
    fit_parser.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                            help="train in N processes on this machine with DistributedDataParallel, one per GPU on "
                            "CUDA (gloo on CPU): each takes 1/N of every batch (the same as torchrun "
                            "--standalone --nproc-per-node=N -m elbolab fit ...; default 1)")
    fit_parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")

    compare_parser = commands.add_parser(
        "compare", help="train one model under several objectives and seeds, and compare them",
        description="Train the same model and guide (same architecture, data, optimizer, epochs and, per seed, "
        "the same initial weights) under each objective and seed; evaluate each on the test split. Writes "
        "comparison.csv, histories.csv, summary.md, learning_curves.png and log_likelihood.png.",
        epilog="example:\n  elbolab compare --binarize dynamic --objectives elbo,iwae:k=5,iwae-dreg:k=5,renyi:alpha=0.5:k=5 "
        "--seeds 0,1,2 --epochs 50\n\nObjective specs: NAME[:k=PARTICLES][:alpha=ORDER], NAME one of "
        + ", ".join(name for name in OBJECTIVES if name != "reconstruction") + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_parser.add_argument("--objectives", metavar="SPEC[,SPEC...]",
                                help="objectives to compare, e.g. elbo,iwae:k=5,renyi:alpha=0.5:k=5")
    compare_parser.add_argument("--seeds", type=_seeds, metavar="S[,S...]", help="seeds (default 0)")
    compare_parser.add_argument("--num-samples", type=_positive_int, metavar="K",
                                help="importance samples for the test log-likelihood (default 5000)")
    # Objectives and seeds come from --objectives and --seeds; beta and warm-up are not compared.
    _add_config_flags(compare_parser, skip=("--objective", "--particles", "--beta", "--warmup", "--seed"))
    compare_parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default runs/compare-DATA)")
    compare_parser.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    compare_parser.add_argument("--resume", type=Path, metavar="OUT",
                                help="continue the comparison in OUT: finished runs are read back, unfinished ones "
                                "continue from their checkpoints (only --device and --data-dir may be given)")
    compare_parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")

    evaluate_parser = commands.add_parser(
        "evaluate", help="estimate ELBO and log p(x) of runs on held-out data",
        description="Importance-sample log p(x) (the IWAE bound with K samples) and the ELBO of each run on a "
        "split of its data set; write metrics.json into each run folder and print a table.",
    )
    evaluate_parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders")
    evaluate_parser.add_argument("--num-samples", type=_positive_int, default=5000, metavar="K", help="importance samples per data point (default 5000)")
    evaluate_parser.add_argument("--split", choices=["test", "valid", "train"], default="test", help="default test")
    evaluate_parser.add_argument("--data-dir", metavar="DIR", help="where the data set's files are now, if moved")
    evaluate_parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    evaluate_parser.add_argument("--seed", type=_seed, default=0, help="seed of the importance samples (default 0)")
    evaluate_parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")

    diagnose_parser = commands.add_parser(
        "diagnose", help="find the data points a run's guide fails on; export InferenceData and figures",
        description="Per-data-point importance diagnostics of a run's guide on a split of its data set: PSIS k-hat "
        "(Yao et al. 2018: above 0.7, q(z|x) cannot be trusted for that point; below 0.5 it is reliable), "
        "effective sample size, log p(x), ELBO and their gap. Writes into the run folder diagnostics.csv (one row "
        "per point), inference_data.nc (ArviZ InferenceData of points spread over the split: posterior draws of q, "
        "posterior predictive replicas, log-likelihoods, importance weights), figures (khat.png, "
        "gap_histogram.png, latent_scatter.png, kl_per_dimension.png and, for images, worst_best_khat.png, "
        "interpolations.png, traversals.png, ppc_images.png, ppc_statistics.png), adds a summary to "
        "metrics.json and prints it.",
        epilog="example:\n  elbolab diagnose runs/digits-vae-elbo-seed0 --num-samples 1000\n\n"
        "Read inference_data.nc with arviz.from_netcdf or elbolab.analysis.load_inference_data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    diagnose_parser.add_argument("run", type=Path, metavar="RUN", help="run folder")
    diagnose_parser.add_argument("--split", choices=["test", "valid", "train"], default="test", help="default test")
    diagnose_parser.add_argument("--num-samples", type=_positive_int, default=1000, metavar="K",
                                 help="importance samples per data point for k-hat and log p(x) (default 1000)")
    diagnose_parser.add_argument("--points", type=_positive_int, metavar="N",
                                 help="diagnose N points of the split drawn at random with --seed (default all); "
                                 "diagnostics.csv's point column is their row in the split")
    diagnose_parser.add_argument("--draws", type=_positive_int, default=50, metavar="S",
                                 help="posterior draws per point in inference_data.nc (default 50)")
    diagnose_parser.add_argument("--inference-points", type=_positive_int, default=500, metavar="N",
                                 help="points exported to inference_data.nc, evenly spaced over those diagnosed "
                                 "(default 500; its size grows as draws x points x data width)")
    diagnose_parser.add_argument("--data-dir", metavar="DIR", help="where the data set's files are now, if moved")
    diagnose_parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    diagnose_parser.add_argument("--seed", type=_seed, default=0, help="seed of the draws (default 0)")
    diagnose_parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")

    sample_parser = commands.add_parser(
        "sample", help="draw new data from a run's model",
        description="Draw z ~ p(z), decode, and write the means of p(x|z) as an image grid (or CSV). A cvae run "
        "draws digits of the class given by --label, or a grid with one row per class; a vqvae run decodes "
        "uniformly drawn codes; an hvae run draws every stochastic layer from the top down.",
    )
    sample_parser.add_argument("run", type=Path, metavar="RUN", help="run folder")
    sample_parser.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sample_parser.add_argument("--seed", type=_seed, default=0, help="default 0")
    sample_parser.add_argument("--label", type=_non_negative_int, metavar="C",
                               help="cvae runs: draw samples of class C (default: n/classes samples of each class)")
    sample_parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    sample_parser.add_argument("--out", type=Path, metavar="FILE", help="output file (default RUN/samples.png, or .csv for non-image data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 a user's mistake)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Under torchrun every rank runs this; rank 0 speaks for the run, the others only for themselves.
    rank = environment_rank()
    prefix = f"elbolab {args.command}: " + (f"rank {rank}: " if rank else "")
    try:
        if environment_world_size() > 1 and args.command != "fit":
            raise InputError(f"only fit trains in several processes; run elbolab {args.command} without torchrun")
        if environment_world_size() > 1 and args.nproc > 1:
            raise InputError("--nproc launches the processes that torchrun has already launched: leave it out under torchrun")
        if args.command == "fit" and args.nproc > 1 and environment_world_size() == 1:
            # A mistake in the options or the data is one line here, not one per process.
            _training_data(_plan_fit(args)[0])
            return launch(args.nproc, _without_nproc(argv))
        commands = {"fit": _fit, "compare": _compare, "evaluate": _evaluate, "diagnose": _diagnose, "sample": _sample}
        commands[args.command](args)
    except InputError as error:
        print(f"{prefix}error: {error}", file=sys.stderr)
        return 2
    except _Stopped as stopped:
        if not rank:
            print(f"{prefix}interrupted by {stopped}", file=sys.stderr)
        return stopped.status
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    finally:
        leave_process_group()
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``): what each launched process runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _run_config(args: argparse.Namespace) -> RunConfig:
    raw: dict[str, dict[str, Any]] = {}
    if args.config is not None:
        try:
            raw = tomllib.loads(args.config.read_text())
        except FileNotFoundError:
            raise InputError(f"{args.config}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as error:
            raise InputError(f"{args.config}: not a readable TOML file ({error})") from None
        if not raw:
            raise InputError(f"{args.config}: the config file is empty")
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".")
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise InputError(f"{args.config}: [{section}] must be a table of options")
            table[name] = value
    return RunConfig.from_dict(raw, source=str(args.config) if args.config else "options")


def check_likelihood(likelihood: str, data: Dataset) -> None:
    """Refuse a likelihood whose support does not match the data."""
    if likelihood == "bernoulli" and data.kind != "binary":
        raise InputError(
            f"the bernoulli likelihood needs binary data, but {data.name} is grayscale: "
            "pass --binarize dynamic or threshold, or --likelihood continuous-bernoulli or gaussian"
        )
    if likelihood == "gaussian" and data.kind == "binary":
        raise InputError(f"the gaussian likelihood is for real-valued data, but {data.name} is binarized: pass --binarize none")
    if likelihood == "continuous-bernoulli" and (data.x.min() < 0 or data.x.max() > 1):
        raise InputError(f"the continuous-bernoulli likelihood needs data in [0, 1]; {data.name} is not")


def _refuse_existing(out: Path, overwrite: bool, command: str) -> None:
    """Refuse an output that already holds something, unless ``--overwrite``; say how to resume an unfinished run."""
    if overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise InputError(f"{out} is a file, not a folder; choose another --out")
    unfinished = unfinished_run(out) if command == "fit" else (
        "holds an unfinished comparison" if (out / CONFIG_FILE).exists() and not (out / COMPARISON_FILE).exists() else None
    )
    if unfinished:
        raise InputError(f"{out} {unfinished}; continue it with: elbolab {command} --resume {out} (or pass --overwrite "
                         "to start again)")
    what = "holds a run" if (out / CONFIG_FILE).exists() else "exists and is not an empty folder"
    raise InputError(f"{out} {what}; pass --overwrite to replace it, or choose another --out")


def _training_data(config: RunConfig) -> tuple[Dataset, Dataset | None]:
    """The training split, the validation split (when training on "train"), both checked."""
    train = config.data.load(config.data.train_split)
    valid = config.data.load("valid") if config.data.train_split == "train" else None
    check_likelihood(config.model.likelihood, train)
    config.x_dim, config.image_shape = train.x_dim, train.image_shape
    if config.model.name == "cvae":
        if train.y is None:
            raise InputError(f"the cvae model is conditioned on class labels, and {train.name} has none")
        config.y_dim = int(train.y.max()) + 1
    return train, valid


def _conditions(config: RunConfig, data: Dataset | None) -> tuple[torch.Tensor, ...]:
    """The per-point arguments the run's model takes after x: one-hot labels for a cvae, else none."""
    if data is None or config.model.name != "cvae":
        return ()
    if data.y is None:
        raise InputError(f"the cvae model is conditioned on class labels, and {data.name} has none")
    return (as_condition(data.y, config.y_dim),)


def _new_model_and_guide(config: RunConfig, train: Dataset) -> tuple[Any, Any]:
    """A freshly initialised model and guide (seed the RNG first); decoders start at the data mean."""
    model = build_run_model(config, train.x_dim)
    if hasattr(model, "init_output_bias"):
        model.init_output_bias(train.x)
    return model, build_run_guide(config, model)


class _Stopped(Exception):
    """Training was interrupted after saving its state; the message says how to continue."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _interrupted(stop: TrainingInterrupted, resume_command: str) -> _Stopped:
    signal_name = signal.Signals(stop.signum).name
    return _Stopped(f"{signal_name}: {stop}; the training state is in {stop.checkpoint}; "
                    f"continue with: {resume_command}", 128 + stop.signum)


def _plan_fit(args: argparse.Namespace) -> tuple[RunConfig, Path, str, dict[str, Any]]:
    """The run's config, its folder, objective name and options; every check that needs no data."""
    resuming = args.resume is not None
    config = _resumed_fit_config(args) if resuming else _run_config(args)
    fc: FitConfig = config.fit
    name, options = parse_objective_spec(fc.objective)
    family = "" if config.guide.family in ("gaussian", "none", "nearest-code") else f"-{config.guide.family}"
    out = args.resume or args.out or Path("runs") / f"{config.data.name}-{config.model.name}{family}-{name}-seed{fc.seed}"
    if not resuming:
        _refuse_existing(out, args.overwrite, "fit")
    if config.model.name == "autoencoder" and name != "reconstruction":
        raise InputError("the autoencoder has no latent variables and no ELBO: use --objective reconstruction")
    if config.model.name == "vqvae" and name != "elbo":
        raise InputError(
            "the vqvae's posterior is one-hot (deterministic): every objective reduces to its ELBO, so it trains "
            "with --objective elbo"
        )
    if name != "reconstruction":
        options.setdefault("num_particles", fc.particles)
    device = resolve_device(fc.device)
    # Under torchrun, each process checks that its node has a GPU for it (join_process_group).
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise InputError(f"--nproc {args.nproc} on CUDA needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    return config, out, name, options


def _fit(args: argparse.Namespace) -> None:
    config, out, name, options = _plan_fit(args)
    fc: FitConfig = config.fit
    resuming = args.resume is not None
    world_size = environment_world_size()
    leader = environment_rank() == 0
    device = resolve_device(fc.device)
    train, valid = _training_data(config)
    pyro.set_rng_seed(fc.seed)
    model, guide = _new_model_and_guide(config, train)
    if not resuming and out.exists() and leader:  # --overwrite, and every input has been checked
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    start = time.perf_counter()
    try:
        result = fit(
            model, guide, train, objective=name, epochs=fc.epochs, batch_size=fc.batch_size, lr=fc.lr,
            beta=fc.beta, warmup_epochs=fc.warmup, valid=valid, device=device, seed=fc.seed,
            progress=False if args.quiet else None, args=_conditions(config, train),
            valid_args=_conditions(config, valid), clip_grad_norm=fc.clip_grad_norm,
            max_bad_steps=fc.max_bad_steps, max_restorations=fc.max_restorations,
            checkpoint=out / CHECKPOINT_FILE, checkpoint_every=fc.checkpoint_every, resume=resuming,
            checkpoint_metadata=config.to_dict(), **options,
        )
    except TrainingInterrupted as stop:
        raise _interrupted(stop, f"elbolab fit --resume {out}" + (f" --nproc {world_size}" if world_size > 1 else "")) from None
    seconds = time.perf_counter() - start
    if not leader:  # rank 0 writes the run folder
        return
    try:
        _fit_figures(out, config, model, guide, result.history, valid if valid is not None else train)
        save_run(out, config, model, guide, result.history)  # weights last: the run is finished once they are there
    except KeyboardInterrupt:
        raise _Stopped(f"SIGINT: training finished but {out} was not fully written; "
                       f"finish it with: elbolab fit --resume {out}", 130) from None
    if not args.quiet:
        last = result.history.iloc[-1]
        valid_text = f", validation ELBO {last['valid_elbo']:.3f}" if not math.isnan(last["valid_elbo"]) else ""
        skipped = int(result.history["skipped_steps"].sum())
        skipped_text = f"; {skipped} non-finite steps skipped, {int(last['restorations'])} restorations" if skipped else ""
        where = f"{world_size} processes on {device.type}" if world_size > 1 else str(device)
        print(f"{out}: {fc.epochs} epochs ({seconds:.1f} s in this session) on {where}, training loss "
              f"{last['train_loss']:.3f}{valid_text} nats/point{skipped_text}")


# Options a resumed run may change: they alter neither the model nor the optimization already done.
RESUME_FLAGS = ("--epochs", "--device", "--data-dir")


def _refuse_options_on_resume(args: argparse.Namespace) -> None:
    changed = [flag for flag, (section, name, _) in FIT_FLAGS.items()
               if f"{section}.{name}" in vars(args) and flag not in RESUME_FLAGS]
    changed += [flag for flag in ("--config", "--out", "--objectives", "--seeds", "--num-samples")
                if getattr(args, flag.lstrip("-").replace("-", "_"), None) not in (None, False)]
    changed += ["--overwrite"] if args.overwrite else []
    if changed:
        raise InputError(
            f"--resume continues with the options the run was started with; {changed[0]} cannot be given "
            f"with it (only {', '.join(RESUME_FLAGS)})"
        )


def _with_resume_flags(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    given = vars(args)
    if "fit.epochs" in given:
        config.fit = dataclasses.replace(config.fit, epochs=given["fit.epochs"])
    if "fit.device" in given:
        config.fit = dataclasses.replace(config.fit, device=given["fit.device"])
    if "data.data_dir" in given:
        config.data.data_dir = given["data.data_dir"]
    return config


def _resumed_fit_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run in ``--resume``, read from its checkpoint, with the flags a resume may change."""
    _refuse_options_on_resume(args)
    run = args.resume
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    checkpoint = run / CHECKPOINT_FILE
    if not checkpoint.exists():
        raise InputError(f"{run}: no {CHECKPOINT_FILE} to resume from (it is written after the first epoch)")
    _, training = read_checkpoint(checkpoint)
    config = _with_resume_flags(RunConfig.from_dict(training["metadata"], source=f"{checkpoint} (its run config)"), args)
    done = training["progress"]["epoch"]
    if (run / WEIGHTS_FILE).exists() and done >= config.fit.epochs:
        raise InputError(f"{run} has finished its {done} epochs; pass --epochs N with N > {done} to train it longer")
    return config


def _resumed_comparison(args: argparse.Namespace) -> tuple[RunConfig, list[str], list[int], int]:
    _refuse_options_on_resume(args)
    if "fit.epochs" in vars(args):  # the finished runs would keep their epochs: not a fair comparison
        raise InputError("compare --resume continues with the comparison's own epochs; --epochs cannot be given with it")
    raw = read_json(args.resume / CONFIG_FILE)
    try:
        specs, seeds, num_samples = raw.pop("objectives"), raw.pop("seeds"), raw.pop("num_samples")
    except KeyError as missing:
        raise InputError(f"{args.resume / CONFIG_FILE}: not a comparison's config ({missing} is missing)") from None
    config = _with_resume_flags(RunConfig.from_dict(raw, source=str(args.resume / CONFIG_FILE)), args)
    return config, list(specs), list(seeds), int(num_samples)


def _compare(args: argparse.Namespace) -> None:
    resuming = args.resume is not None
    if resuming:
        config, specs, seeds, num_samples = _resumed_comparison(args)
    else:
        config = _run_config(args)
        if not args.objectives:
            raise InputError("compare needs --objectives, e.g. --objectives elbo,iwae:k=5 (or --resume OUT)")
        specs = [spec for spec in args.objectives.split(",") if spec.strip()]
        seeds, num_samples = args.seeds or [0], args.num_samples or 5000
    fc: FitConfig = config.fit
    if config.model.name in ("autoencoder", "vqvae"):
        raise InputError(
            f"the {config.model.name} has no objectives to compare (no ELBO, or a one-hot posterior); use another --model"
        )
    for spec in specs:
        spec_name, spec_options = parse_objective_spec(spec)
        get_objective(spec_name, **spec_options)
    out = args.resume or args.out or Path("runs") / f"compare-{config.data.name}"
    if not resuming:
        _refuse_existing(out, args.overwrite, "compare")
    train, valid = _training_data(config)
    test = config.data.load("test")
    if not resuming:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True)
        write_json(out / CONFIG_FILE, config.to_dict() | {"objectives": specs, "seeds": list(seeds), "num_samples": num_samples})
    try:
        comparison = compare_runs(
            lambda: _new_model_and_guide(config, train)[0], lambda model: build_run_guide(config, model),
            train, objectives=specs, seeds=seeds, test=test, valid=valid, epochs=fc.epochs,
            batch_size=fc.batch_size, lr=fc.lr, num_samples=num_samples, device=fc.device,
            progress=False if args.quiet else None, args=_conditions(config, train),
            valid_args=_conditions(config, valid), test_args=_conditions(config, test),
            folder=out / "runs", checkpoint_every=fc.checkpoint_every, clip_grad_norm=fc.clip_grad_norm,
            max_bad_steps=fc.max_bad_steps, max_restorations=fc.max_restorations,
        )
    except TrainingInterrupted as stop:
        raise _interrupted(stop, f"elbolab compare --resume {out}") from None
    summary = summarize(comparison.table)
    markdown = to_markdown(summary, num_samples)
    atomic_write(out / "histories.csv", comparison.histories.to_csv(index=False).encode())
    atomic_write(out / "summary.md", markdown.encode())
    plot_comparison_curves(comparison.histories, out / "learning_curves.png")
    plot_comparison_summary(summary, out / "log_likelihood.png", num_samples)
    atomic_write(out / COMPARISON_FILE, comparison.table.to_csv(index=False).encode())  # last: the comparison is finished
    if not args.quiet:
        print(f"{out}: {config.data.name}, {fc.epochs} epochs, nats per test point, mean ± s.e. over seeds")
        print(markdown, end="")


def _fit_figures(folder: Path, config: RunConfig, model: Any, guide: Any, history: pd.DataFrame, shown: Dataset) -> None:
    plot_history(history, folder / "loss_curves.png",
                 title=f"{config.model.name} on {config.data.name}, {config.fit.objective}")
    if config.image_shape is None:
        return
    model.cpu()
    if guide is not None:
        guide.cpu()
    shown = shown.fixed_binarization(config.fit.seed)
    inputs = shown.x[:16]
    conditions = tuple(c[:16] for c in _conditions(config, shown))
    if isinstance(model, ConditionalVAE):
        reconstructions = model.reconstruct(inputs, *conditions, guide)
    else:
        reconstructions = model.reconstruct(inputs, guide)
    plot_reconstructions(inputs, reconstructions, config.image_shape, folder / "reconstructions.png")
    if config.model.name != "autoencoder":
        samples, title, columns = _samples(model, config, 64, label=None)
        plot_image_grid(samples, config.image_shape, folder / "samples.png", title=title, columns=columns)


def _samples(model: Any, config: RunConfig, n: int, label: int | None) -> tuple[torch.Tensor, str, int]:
    """``n`` decoded prior draws, a title and a grid width; a cvae's are of class ``label``, or one row per class."""
    with pyro.validation_enabled(False):
        if not isinstance(model, ConditionalVAE):
            if label is not None:
                raise InputError(f"--label is for a cvae run; this run's model is a {config.model.name}")
            return model.generate(n), f"{n} samples from p(z)p(x|z): means of p(x|z)", 8
        if label is not None:
            if not 0 <= label < config.y_dim:
                raise InputError(f"--label {label} is not a class of this run: its labels are 0 to {config.y_dim - 1}")
            return model.generate(n, y=label), f"{n} samples of class {label}: means of p(x|z,y), z ~ p(z)", 8
        per_class = max(1, n // config.y_dim)
        labels = torch.arange(config.y_dim).repeat_interleave(per_class)
        title = f"{per_class} samples per class, one class per row (0 at the top): means of p(x|z,y)"
        return model.generate(len(labels), y=labels), title, per_class


def _evaluation_data(config: RunConfig, args: argparse.Namespace, run: Path) -> Dataset:
    """The ``--split`` of a run's data set (from ``--data-dir`` when given), one fixed binarization."""
    if args.data_dir:
        config.data.data_dir = args.data_dir
    data = config.data.load(args.split).fixed_binarization(seed=0)
    if data.x_dim != config.x_dim:
        raise InputError(f"the {args.split} split of {data.name} has {data.x_dim} features per point, but {run} was "
                         f"trained on data with {config.x_dim}")
    return data


def _evaluate(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    rows = []
    for path in args.runs:
        run = load_run(path, device=device)
        data = _evaluation_data(run.config, args, path)
        x = data.x.to(device)
        conditions = tuple(c.to(device) for c in _conditions(run.config, data))
        pyro.set_rng_seed(args.seed)
        split = args.split
        metrics: dict[str, Any] = {"elbolab_version": __version__, "split": split, "num_points": data.num_points}
        if isinstance(run.guide, NearestCodeGuide):
            metrics |= _code_metrics(run.model, run.guide, x, split, progress=not args.quiet)
        elif run.guide is None:
            with torch.no_grad(), pyro.validation_enabled(False):
                loss = sum(Reconstruction().differentiable_loss(run.model, None, chunk).item() for chunk in x.split(1000))
            metrics[f"{split}_reconstruction_loss"] = loss / data.num_points
        else:
            estimate = importance_estimate(run.model, run.guide, x, *conditions, num_samples=args.num_samples,
                                           progress=False if args.quiet else None)
            metrics |= {
                f"{split}_elbo": estimate.elbo.mean().item(),
                f"{split}_log_likelihood": estimate.log_likelihood.mean().item(),
                f"{split}_reconstruction_loss": -estimate.reconstruction.mean().item(),
                f"{split}_ess_fraction": (estimate.ess.mean() / args.num_samples).item(),
                "num_samples": args.num_samples,
            }
        metrics_path = path / METRICS_FILE
        previous = read_json(metrics_path) if metrics_path.exists() else {}
        write_json(metrics_path, previous | metrics)
        rows.append({"run": str(path), "model": run.config.model.name, "guide": run.config.guide.family,
                     "objective": run.config.fit.objective,
                     **{k.removeprefix(f"{split}_"): v for k, v in metrics.items() if k.startswith(f"{split}_")}})
    if not args.quiet:
        table = pd.DataFrame(rows)
        if "elbo" in table and "log_likelihood" in table:
            table["gap"] = table["log_likelihood"] - table["elbo"]
        print(f"{args.split} split, nats per data point" + (f", K = {args.num_samples}" if "log_likelihood" in table else ""))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _code_metrics(model: Any, guide: NearestCodeGuide, x: torch.Tensor, split: str, progress: bool) -> dict[str, Any]:
    """A VQ-VAE's evaluation: its exact ELBO, reconstruction error and the information in its codes.

    The posterior is one-hot, so one sample gives the ELBO exactly, and the importance-sampled
    log p(x) is that same ELBO (log p(x) >= ELBO is all one can say). ``code_bits_per_code`` is the
    entropy of the codes' empirical distribution over the split, in bits per code entry (at most
    log2 K, reached when every code is used equally); ``rate_bits`` is the KL of the one-hot
    posterior to the uniform prior, M log2 K bits per data point.
    """
    estimate = importance_estimate(model, guide, x, num_samples=1, progress=None if progress else False)
    codes = torch.cat([guide.codes(chunk) for chunk in x.split(4096)])
    usage = code_usage(torch.bincount(codes.reshape(-1), minlength=guide.codebook.size).float())
    elbo = estimate.elbo.mean().item()
    return {
        f"{split}_elbo": elbo,
        f"{split}_reconstruction_loss": -estimate.reconstruction.mean().item(),
        f"{split}_bits_per_dim": -elbo / (x.shape[1] * math.log(2)),
        f"{split}_code_bits_per_code": usage["code_bits"],
        f"{split}_perplexity": usage["perplexity"],
        f"{split}_codes_used": usage["codes_used"],
        "rate_bits": guide.num_codes * math.log2(guide.codebook.size),
    }


def _diagnose(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    if run.guide is None:
        raise InputError(f"{args.run} is an autoencoder: it has no posterior q(z|x) to diagnose")
    if run.config.model.name == "vqvae":
        raise InputError(f"{args.run} is a vqvae: its posterior is one-hot, every importance weight is the same, and "
                         "there is nothing for k-hat to diagnose; use elbolab evaluate")
    if run.config.model.name == "cvae":
        raise InputError(f"{args.run} is a cvae: diagnose reads guides of x alone, and a cvae's guide also takes the "
                         "labels; use elbolab evaluate, or importance_diagnostics(model, guide, x, y) from Python")
    data = _evaluation_data(run.config, args, args.run)
    rows = torch.arange(data.num_points)
    if args.points and args.points < data.num_points:
        # A random subset: data sets are often sorted by class, so the first N points would not do.
        chosen = torch.randperm(data.num_points, generator=torch.Generator().manual_seed(args.seed))[: args.points]
        rows = chosen.sort().values
    x = data.x[rows].to(device)
    labels = data.y[rows] if data.y is not None else None
    pyro.set_rng_seed(args.seed)
    config = run.config
    result = diagnose(
        run.model, run.guide, x, args.run, labels=labels, image_shape=config.image_shape,
        binary=data.kind == "binary", num_samples=args.num_samples, draws=args.draws,
        inference_points=args.inference_points, objective=config.fit.objective,
        attrs={"run": str(args.run), "data": config.data.name, "split": args.split, "seed": args.seed},
        point_ids=rows.tolist(), progress=False if args.quiet else None,
    )
    metrics_path = args.run / METRICS_FILE
    previous = read_json(metrics_path) if metrics_path.exists() else {}
    write_json(metrics_path, previous | {f"{args.split}_diagnose": result.summary, "elbolab_version": __version__})
    if args.quiet:
        return
    s = result.summary
    print(f"{args.run}: {args.split} split, {s['points']} points, K = {s['num_samples']} importance samples")
    print(f"  PSIS k-hat > {K_HAT_BAD} (q unreliable): {100 * s['khat_above_0.7']:.1f}% of points; "
          f"{K_HAT_GOOD}-{K_HAT_BAD}: {100 * s['khat_0.5_to_0.7']:.1f}%  (worst rows: diagnostics.csv sorted by pareto_k)")
    print(f"  log p(x) {s['log_likelihood']:.3f}, ELBO {s['elbo']:.3f}, gap mean {s['gap_mean']:.3f} "
          f"(median {s['gap_median']:.3f}) nats per point; ESS/K {s['ess_fraction']:.3f}")
    kl_text = f", KL {s['kl']:.2f} nats" if "kl" in s else ""
    print(f"  active units {s['active_units']} of {s['latent_dims']}{kl_text}")
    if "kl_per_dimension" in s:
        print(f"  KL per dimension {s['kl_per_dimension']}")
    print(f"  wrote {', '.join(path.name for path in result.files)}")


def _sample(args: argparse.Namespace) -> None:
    run = load_run(args.run, device=resolve_device(args.device))
    if run.config.model.name == "autoencoder":
        raise InputError(f"{args.run} is an autoencoder: it has no prior over codes and cannot generate")
    pyro.set_rng_seed(args.seed)
    samples, title, columns = _samples(run.model, run.config, args.n, args.label)
    samples = samples.cpu()
    image_shape = run.config.image_shape
    out = args.out or args.run / ("samples.png" if image_shape else "samples.csv")
    if out.suffix == ".png" and image_shape:
        plot_image_grid(samples, image_shape, out, title=f"{title}; seed {args.seed}", columns=columns)
    elif out.suffix == ".csv":
        pd.DataFrame(samples.numpy()).to_csv(out, index=False)
    else:
        raise InputError(f"{out}: write samples to a .png (image data) or .csv file")
    print(out)
