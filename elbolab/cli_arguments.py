"""The ``elbolab`` command's arguments: every flag, its type and help, and the configs they fill.

Flags of ``fit`` and ``compare`` fill fields of a :class:`~elbolab.runs.RunConfig` (the table
:data:`FIT_FLAGS`, flag -> section and field), on top of a TOML file given with ``--config``;
flags that several commands take are declared once (:data:`SHARED_FLAGS`).
"""

from __future__ import annotations

__all__ = ["FIT_FLAGS", "RESUME_FLAGS", "SHARED_FLAGS", "binarization_note", "build_parser", "run_config"]

import argparse
import math
import tomllib
from pathlib import Path
from typing import Any

from elbolab.data import DATASETS
from elbolab.errors import InputError
from elbolab.families import FAMILIES, GUIDE_FAMILIES, get_family
from elbolab.guides import FLOWS
from elbolab.inference.objectives import OBJECTIVES
from elbolab.models import LIKELIHOODS, ModelConfig
from elbolab.nn import ACTIVATIONS
from elbolab.nn.architecture import ARCHITECTURES
from elbolab.runs import RunConfig
from elbolab.version import __version__

DESCRIPTION = "fit, evaluate, diagnose and sample from latent-variable models"
# Options a resumed run may change: they alter neither the model nor the optimization already done.
RESUME_FLAGS = ("--epochs", "--device", "--data-dir", "--compile", "--max-minutes")


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
    if text not in ("none", "threshold", "dynamic", "auto"):
        raise argparse.ArgumentTypeError(f"expected none, threshold, dynamic or auto, got {text!r}")
    return None if text == "none" else text


def _obs_scale(text: str) -> float | None:
    return None if text == "learned" else _float(text)


# flag -> (config section, field, argparse options); every flag fills one dataclass field.
FIT_FLAGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "--data": ("data", "name", {"metavar": "NAME", "help": f"data set: {', '.join(DATASETS)} (default digits)"}),
    "--data-dir": ("data", "data_dir", {"metavar": "DIR", "help": "folder of the data set's files (default: none, "
                   "which the embedded and synthetic data sets need)"}),
    "--binarize": ("data", "binarize", {"type": _binarize, "metavar": "MODE",
                   "help": "none, threshold (x>0.5), dynamic (x~Bernoulli(x) per batch) or auto: dynamic for "
                   "grayscale images under the bernoulli likelihood, none otherwise (default auto)"}),
    "--train-split": ("data", "train_split", {"choices": ["train", "train+valid"],
                      "help": "train (and report the validation ELBO each epoch) or train+valid (default train)"}),
    "--model": ("model", "name", {"choices": list(FAMILIES),
                "help": "; ".join(f"{name}: {family.summary}" for name, family in FAMILIES.items()) + f" (default {ModelConfig().name})"}),
    "--z-dim": ("model", "z_dim", {"type": _positive_int, "help": "latent width, or the width of each code vector (default 20)"}),
    "--z-dims": ("model", "z_dims", {"type": _widths, "metavar": "W,W[,W...]",
                 "help": "widths of the stochastic layers, the one next to the data first (default 50,20)"}),
    "--hidden-upper": ("model", "hidden_upper", {"type": _widths, "metavar": "W[,W...]",
                       "help": "hidden widths between stochastic layers (default: --hidden)"}),
    "--codebook-size": ("model", "codebook_size", {"type": _int_at_least(2), "metavar": "K",
                        "help": "number of codebook vectors (default 64)"}),
    "--num-codes": ("model", "num_codes", {"type": _positive_int, "metavar": "M",
                    "help": "code vectors per data point (default 8)"}),
    "--commitment": ("model", "commitment", {"type": _float, "metavar": "BETA",
                     "help": "weight of the commitment loss (default 0.25)"}),
    "--clusters": ("model", "clusters", {"type": _int_at_least(2), "metavar": "C",
                   "help": "clusters of the mixture prior (default 10)"}),
    "--labels-per-class": ("model", "labels_per_class", {"type": _int_at_least(0), "metavar": "N",
                           "help": "ssvae: labels kept per class of the training set, the others missing; 0 keeps every "
                           "label (default 10)"}),
    "--classification-weight": ("model", "classification_weight", {"type": _float, "metavar": "ALPHA",
                                "help": "ssvae: weight of the classifier's loss on the labelled points (default 50)"}),
    "--hidden": ("model", "hidden", {"type": _widths, "metavar": "W[,W...]",
                 "help": "hidden widths of the encoder, reversed in the decoder (default 400)"}),
    "--arch": ("model", "arch", {"choices": list(ARCHITECTURES),
               "help": "the networks: mlp (of --hidden), or conv for images: stride-2 convolutions of --channels in the "
               "encoder, transposed convolutions back in the decoder (default mlp)"}),
    "--channels": ("model", "channels", {"type": _widths, "metavar": "C[,C...]",
                   "help": "conv: channels of the encoder's stages, each halving the image; reversed in the decoder "
                   "(default 32,64)"}),
    "--kernel": ("model", "kernel", {"type": _positive_int, "help": "conv: kernel size, odd (default 3)"}),
    "--residual-blocks": ("model", "residual_blocks", {"type": _non_negative_int, "metavar": "N",
                          "help": "conv: residual blocks after each stage (default 0)"}),
    "--gated": ("model", "gated", {"action": "store_true",
                "help": "conv: gated convolutions, conv_h(x) * sigmoid(conv_g(x)), as in the Sylvester-flows paper "
                "(default: plain)"}),
    "--prior": ("model", "prior", {"choices": ["standard", "vamp"],
                "help": "p(z): standard, N(0, I), or vamp, the VampPrior (1/K) sum_k q(z|u_k) with K learned "
                "pseudo-inputs (Tomczak & Welling 2018; gaussian guide) (default standard)"}),
    "--pseudo-inputs": ("model", "pseudo_inputs", {"type": _positive_int, "metavar": "K",
                        "help": "vamp prior: number of pseudo-inputs, started at training points (default 500)"}),
    "--likelihood": ("model", "likelihood", {"choices": list(LIKELIHOODS), "help": "p(x|z) (default bernoulli)"}),
    "--activation": ("model", "activation", {"choices": list(ACTIVATIONS), "help": "default relu"}),
    "--obs-scale": ("model", "obs_scale", {"type": _obs_scale, "metavar": "S|learned",
                    "help": "gaussian likelihood: fixed scale, or learned per pixel (default)"}),
    "--guide": ("guide", "family", {"choices": [family for family in GUIDE_FAMILIES if family != "none"],
                "help": "q(z|x), the model's first by default: " + "; ".join(
                    f"{name}: {', '.join(family.guides)}" for name, family in FAMILIES.items() if family.guides != ("none",))
                + " (gaussian: diagonal; mixture of gaussians; normalizing flow; ladder: top-down)"}),
    "--components": ("guide", "components", {"type": _positive_int, "help": "mixture guide: components (default 5)"}),
    "--flow": ("guide", "flow", {"choices": list(FLOWS), "help": "flow guide: layer type (default iaf)"}),
    "--flow-depth": ("guide", "flow_depth", {"type": _positive_int, "help": "flow guide: layers (default 4)"}),
    "--objective": ("fit", "objective", {"metavar": "NAME", "help": "objective (default elbo); one of: " + ", ".join(OBJECTIVES)}),
    "--particles": ("fit", "particles", {"type": _positive_int, "help": "samples of z per data point (default 1)"}),
    "--beta": ("fit", "beta", {"type": _float, "help": "weight of the KL term, beta-VAE (default 1)"}),
    "--warmup": ("fit", "warmup", {"type": _non_negative_int, "metavar": "EPOCHS",
                 "help": "KL warm-up: beta rises linearly from 0 over this many epochs (default 0)"}),
    "--epochs": ("fit", "epochs", {"type": _positive_int, "help": "default 10"}),
    "--max-minutes": ("fit", "max_minutes", {"type": _float, "metavar": "MIN",
                      "help": "a budget of training time: stop after the last epoch that ends within it, even before "
                      "--epochs (compiling and validation excluded; default: no budget)"}),
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
    "--compile": ("fit", "compile", {"action": "store_true",
                  "help": "trace the training step once per batch shape into a static graph and compile it (Inductor; "
                  "CUDA graphs on a GPU): the same noise and results up to rounding, the compile time printed and kept "
                  "out of the epoch times; a step that cannot be traced trains eagerly and says why (default: eager)"}),
}


# Flags that several commands take, declared once.
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--tensorboard": {"action": "store_true",
                      "help": "write TensorBoard event files into the run folder's tensorboard/: per-step and per-epoch "
                      "scalars (loss, validation ELBO, beta, learning rate, skipped steps, codebook perplexity) and, for "
                      "images, reconstructions and samples every 5 epochs; tensorboard --logdir runs shows every run side "
                      "by side (needs the extra: pip install 'elbolab[tensorboard]'; default off)"},
    "--split": {"choices": ["test", "valid", "train"], "default": "test", "help": "split of the run's data set (default test)"},
    "--data-dir": {"metavar": "DIR", "help": "where the data set's files are now, if moved"},
    "--device": {"default": "auto", "metavar": "DEV", "help": "auto, cpu, cuda or cuda:N (default auto)"},
    "--seed": {"type": _seed, "default": 0, "help": "seed of the random draws (default 0)"},
    "--quiet": {"action": "store_true", "help": "no progress bar and no summary"},
}


def _add_shared_flags(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **SHARED_FLAGS[flag])


def _owned_help(section: str, name: str, text: str) -> str:
    """``text``, naming the model families that read a ``[model]`` option only some of them read."""
    owners = [family.name for family in FAMILIES.values() if name in family.fields]
    if section != "model" or len(owners) == len(FAMILIES):
        return text
    return f"{', '.join(owners)}: {text}"


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """``--config`` and the flags of :data:`FIT_FLAGS`; only flags given on the command line override."""
    parser.add_argument("--config", type=Path, metavar="TOML",
                        help="TOML file with [data], [model], [guide], [fit] tables; flags override it (default: "
                        "none, every option at the default given here)")
    for flag, (section, name, options) in FIT_FLAGS.items():
        if flag in skip:
            continue
        if "choices" not in options and "action" not in options:
            options = {"metavar": flag.lstrip("-").upper().replace("-", "_"), **options}
        options = options | {"help": _owned_help(section, name, options["help"])}
        parser.add_argument(flag, dest=f"{section}.{name}", default=argparse.SUPPRESS, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elbolab", description=f"The elbolab command: {DESCRIPTION}.")
    parser.add_argument("--version", action="version", version=f"elbolab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    fit_parser = commands.add_parser(
        "fit", help="train a model and write a run folder",
        description="Train a model and guide with SVI and write a run folder: config.json, history.csv, "
        "weights.safetensors, loss_curves.png, reconstructions.png, samples.png.",
        epilog="examples:\n"
        "  elbolab fit --epochs 100 --out runs/digits   # digits, dynamically binarized\n"
        "  elbolab fit --data binarized-mnist --data-dir DIR --train-split train+valid \\\n"
        "      --hidden 200,200 --z-dim 50 --activation tanh --batch-size 100 --epochs 30\n"
        "  elbolab fit --config run.toml --seed 3   # [data], [model], [fit] tables; flags override\n\n"
        "A Bernoulli likelihood needs binary data: grayscale data sets are binarized dynamically\n"
        "unless --binarize says otherwise; to model the gray levels, choose --likelihood\n"
        "continuous-bernoulli or gaussian.",
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
    _add_shared_flags(fit_parser, "--tensorboard", "--quiet")

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
    compare_parser.add_argument("--snr", action="store_true",
                                help="measure the signal-to-noise ratio |mean| / std of the encoder's and the decoder's "
                                "gradients (Rainforth et al. 2018) of every run at --snr-epochs, under iwae, iwae-dreg and "
                                "iwae-stl at each K of --snr-k, on a batch of training points; writes snr.csv and "
                                "snr_against_k.png (default off)")
    compare_parser.add_argument("--snr-epochs", type=_widths, metavar="E[,E...]",
                                help="epochs after which --snr measures (default: the last)")
    compare_parser.add_argument("--snr-k", type=_widths, default=[1, 4, 16, 64], metavar="K[,K...]",
                                help="particle counts of --snr (default 1,4,16,64)")
    _add_shared_flags(compare_parser, "--tensorboard", "--quiet")

    evaluate_parser = commands.add_parser(
        "evaluate", help="estimate ELBO and log p(x) of runs on held-out data",
        description="Importance-sample log p(x) (the IWAE bound with K samples) and the ELBO of each run on a "
        "split of its data set; write metrics.json into each run folder and print a table.",
    )
    evaluate_parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders")
    evaluate_parser.add_argument("--num-samples", type=_positive_int, default=5000, metavar="K", help="importance samples per data point (default 5000)")
    evaluate_parser.add_argument("--compile", action="store_true",
                                 help="run the model and guide on each chunk of samples as a graph traced once per chunk shape "
                                 "and compiled (Inductor): the same draws and estimates up to rounding, faster for large K "
                                 "(default: eager)")
    _add_shared_flags(evaluate_parser, "--split", "--data-dir", "--device", "--seed", "--quiet")

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
    diagnose_parser.add_argument("--gaps", type=_positive_int, nargs="?", const=100, default=0, metavar="N",
                                 help="also split the gap log p(x) - ELBO of N points spread over those diagnosed "
                                 "(100 when N is left out) into the approximation gap (of the guide's family) and the "
                                 "amortization gap (of sharing one encoder), Cremer et al. 2018: each point's own guide of "
                                 "the family, and a full-covariance Gaussian, optimized with the model frozen; writes "
                                 "gaps.csv and gaps.png (default: not computed)")
    diagnose_parser.add_argument("--gap-steps", type=_positive_int, default=500, metavar="STEPS",
                                 help="Adam steps of each point's own guide for --gaps (default 500)")
    _add_shared_flags(diagnose_parser, "--split", "--data-dir", "--device", "--seed", "--quiet")

    calibrate_parser = commands.add_parser(
        "calibrate", help="simulation-based calibration of a run's guide, per latent dimension",
        description="Simulation-based calibration (Talts et al. 2018): draw z ~ p(z) and x ~ p(x|z) from the run's "
        "model, then draws of q(z|x) from its guide, and rank the true z among them in every latent dimension. For "
        "a calibrated guide the ranks are uniform; a U shape means q is too narrow (under-dispersed), a hump too "
        "wide (over-dispersed), a slope biased. Writes calibration.csv (one row per dimension: chi-square and KS "
        "p-values, verdict), calibration_ranks.csv and calibration.png (rank histograms with the band of a uniform "
        "one) into the run folder, adds a summary to metrics.json and prints it.",
        epilog="example:\n  elbolab calibrate runs/digits-vae-elbo-seed0 --simulations 1000 --draws 99",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate_parser.add_argument("run", type=Path, metavar="RUN", help="run folder")
    calibrate_parser.add_argument("--simulations", type=_positive_int, default=1000, metavar="S",
                                  help="simulated data points (default 1000)")
    calibrate_parser.add_argument("--draws", type=_positive_int, default=99, metavar="L",
                                  help="draws of q(z|x) per simulated point; ranks run from 0 to L (default 99)")
    calibrate_parser.add_argument("--bins", type=_positive_int, default=20, metavar="B",
                                  help="bins of the rank histograms and the chi-square test, at least 2 (default 20)")
    _add_shared_flags(calibrate_parser, "--device", "--seed", "--quiet")

    sample_parser = commands.add_parser(
        "sample", help="draw new data from a run's model",
        description="Draw z ~ p(z), decode, and write the means of p(x|z) as an image grid (or CSV). A run of a model "
        "on class labels draws data of the class given by --label, or a grid with one row per class; a quantized "
        "model decodes uniformly drawn codes; a hierarchical one draws every stochastic layer from the top down.",
    )
    sample_parser.add_argument("run", type=Path, metavar="RUN", help="run folder")
    sample_parser.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sample_parser.add_argument("--label", type=_non_negative_int, metavar="C",
                               help="models on class labels: draw samples of class C (default: n/classes samples of each class)")
    _add_shared_flags(sample_parser, "--device", "--seed")
    sample_parser.add_argument("--out", type=Path, metavar="FILE", help="output file (default RUN/samples.png, or .csv for non-image data)")
    return parser


def binarization_note(args: argparse.Namespace, config: RunConfig) -> str | None:
    """The line that says how the data were binarized when neither a flag nor the TOML file said (``"auto"``)."""
    given = vars(args).get("data.binarize", "auto")
    if args.config is not None and given == "auto":
        given = tomllib.loads(args.config.read_text()).get("data", {}).get("binarize", "auto")
    if given != "auto" or config.data.binarize != "dynamic":
        return None
    return (f"{config.data.name} is grayscale and the likelihood {config.model.likelihood}: binarized dynamically "
            "(x ~ Bernoulli(x) at every batch; --binarize none with --likelihood continuous-bernoulli models the gray levels)")


def run_config(args: argparse.Namespace, *, comparing: bool = False) -> RunConfig:
    """The run's config: the TOML file of ``--config``, overridden by the flags given.

    ``comparing``: for ``compare``, whose objectives come from ``--objectives``, a model family that
    trains under one objective only is refused first, before its config is checked.
    """
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
    model = raw.get("model", {})
    if comparing and isinstance(model, dict):
        get_family(model.get("name", ModelConfig().name)).check_comparable()
    return RunConfig.from_dict(raw, source=str(args.config) if args.config else "options")


