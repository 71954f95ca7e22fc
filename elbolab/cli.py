"""The ``elbolab`` command: fit, evaluate, diagnose and sample from latent-variable models.

    elbolab fit --data digits --binarize dynamic --objective elbo --epochs 50 --out runs/digits
    elbolab evaluate runs/digits --num-samples 5000
    elbolab sample runs/digits --n 64
    elbolab diagnose runs/digits

Options come from flags or a TOML file (``--config``) with ``[data]``, ``[model]`` and ``[fit]``
tables, filling the same dataclasses; flags override the file. A user's mistake ends with one
line on stderr and exit status 2; no run folder is left half-written.

The flags, and the configs they fill, are declared in :mod:`elbolab.cli_arguments`; this module
runs the commands: it calls the library with those configs and prints. What a model family
trains under, reports and draws is its registry entry's (:mod:`elbolab.families`).
"""

from __future__ import annotations

__all__ = ["build_parser", "main"]

import argparse
import math
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
import torch

from elbolab.analysis import (
    K_HAT_BAD,
    K_HAT_GOOD,
    SNRMonitor,
    calibration,
    compare_runs,
    diagnose,
    plot_calibration,
    plot_comparison_curves,
    plot_comparison_summary,
    plot_history,
    plot_image_grid,
    plot_reconstructions,
    plot_snr_against_k,
    summarize,
    to_markdown,
)
from elbolab.cli_arguments import (
    FIT_FLAGS,
    RESUME_FLAGS,
    binarization_note,
    build_parser,
    run_config,
)
from elbolab.data import Dataset
from elbolab.errors import InputError
from elbolab.files import atomic_write, read_json, write_json
from elbolab.inference import TrainingInterrupted, fit, resolve_device
from elbolab.inference.distributed import (
    environment_rank,
    environment_world_size,
    launch,
    leave_process_group,
)
from elbolab.inference.objectives import get_objective, parse_objective_spec
from elbolab.inference.training_checkpoint import CHECKPOINT_FILE
from elbolab.models import check_likelihood
from elbolab.runs import RunConfig, load_run, save_run, unfinished_run
from elbolab.runs.folder import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, checkpointed_config
from elbolab.runs.tensorboard import TensorBoardMonitor, require_tensorboard
from elbolab.version import __version__

COMPARISON_FILE = "comparison.csv"
TENSORBOARD_FOLDER = "tensorboard"  # a run's event files: tensorboard --logdir runs finds them


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
        commands = {"fit": _fit, "compare": _compare, "evaluate": _evaluate, "diagnose": _diagnose, "sample": _sample,
                    "calibrate": _calibrate}
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


def _training_data(config: RunConfig) -> tuple[RunConfig, Dataset, Dataset | None]:
    """The config with the data's shape recorded, the training split and (training on "train") the validation split."""
    train = config.data.load(config.data.train_split)
    valid = config.data.load("valid") if config.data.train_split == "train" else None
    check_likelihood(config.model.likelihood, train)
    return config.with_data(train), train, valid


class _Stopped(Exception):
    """Training was interrupted after saving its state; the message says how to continue."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _interrupted(stop: TrainingInterrupted, resume_command: str) -> _Stopped:
    signal_name = signal.Signals(stop.signum).name
    return _Stopped(f"{signal_name}: {stop}; the training state is in {stop.checkpoint}; "
                    f"continue with: {resume_command}", 128 + stop.signum)


def _plan_fit(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run's config and its folder; every check that needs no data."""
    resuming = args.resume is not None
    config = _resumed_fit_config(args) if resuming else run_config(args)
    name = parse_objective_spec(config.fit.objective)[0]
    guide = "" if config.guide.family in ("gaussian", "none", "nearest-code") else f"-{config.guide.family}"
    out = args.resume or args.out or Path("runs") / f"{config.data.name}-{config.model.name}{guide}-{name}-seed{config.fit.seed}"
    if not resuming:
        _refuse_existing(out, args.overwrite, "fit")
    device = resolve_device(config.fit.device)
    # Under torchrun, each process checks that its node has a GPU for it (join_process_group).
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise InputError(f"--nproc {args.nproc} on CUDA needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    return config, out


def _fit(args: argparse.Namespace) -> None:
    if args.tensorboard:
        require_tensorboard()  # one line if the extra is missing, before anything is built or replaced
    config, out = _plan_fit(args)
    world_size, leader = environment_world_size(), environment_rank() == 0
    config, train, valid = _training_data(config)
    pyro.set_rng_seed(config.fit.seed)
    model = config.new_model(train)
    guide = config.new_guide(model)
    if args.resume is None and out.exists() and leader:  # --overwrite, and every input has been checked
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    note = binarization_note(args, config) if args.resume is None else None
    if note and leader and not args.quiet:  # once the run is built: a refusal before it stays one line
        print(f"elbolab fit: {note}", file=sys.stderr)
    monitor = _tensorboard(out / TENSORBOARD_FOLDER, config, valid if valid is not None else train) if args.tensorboard and leader else None
    start = time.perf_counter()
    try:
        result = fit(model, guide, train, config.fit, valid=valid, args=config.conditions(train, training=True),
                     valid_args=config.conditions(valid), progress=False if args.quiet else None,
                     checkpoint=out / CHECKPOINT_FILE, resume=args.resume is not None,
                     checkpoint_metadata=config.to_dict(), monitor=monitor)
    except TrainingInterrupted as stop:
        raise _interrupted(stop, f"elbolab fit --resume {out}" + (f" --nproc {world_size}" if world_size > 1 else "")) from None
    finally:
        if monitor is not None:
            monitor.close()
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
        device = resolve_device(config.fit.device)
        where = f"{world_size} processes on {device.type}" if world_size > 1 else str(device)
        print(f"{out}: {int(last['epoch'])} epochs ({seconds:.1f} s in this session) on {where}, training loss "
              f"{last['train_loss']:.3f}{valid_text} nats/point{skipped_text}")


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
    fit_changes = {name: given[f"fit.{name}"] for name in ("epochs", "device", "compile", "max_minutes") if f"fit.{name}" in given}
    data = replace(config.data, data_dir=given["data.data_dir"]) if "data.data_dir" in given else config.data
    return replace(config, fit=replace(config.fit, **fit_changes), data=data)


def _resumed_fit_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run in ``--resume``, read from its checkpoint, with the flags a resume may change."""
    _refuse_options_on_resume(args)
    recorded, done = checkpointed_config(args.resume)
    config = _with_resume_flags(recorded, args)
    if (args.resume / WEIGHTS_FILE).exists() and done >= config.fit.epochs:
        raise InputError(f"{args.resume} has finished its {done} epochs; pass --epochs N with N > {done} to train it longer")
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
    config = _with_resume_flags(RunConfig.from_dict(raw, source=str(args.resume / CONFIG_FILE), written=True), args)
    return config, list(specs), list(seeds), int(num_samples)


def _compare(args: argparse.Namespace) -> None:
    if args.tensorboard:
        require_tensorboard()
    resuming = args.resume is not None
    if resuming and args.snr:
        raise InputError("--snr measures during training, from the first epoch: start the comparison again with it "
                         "rather than --resume")
    if resuming:
        config, specs, seeds, num_samples = _resumed_comparison(args)
    else:
        config = run_config(args, comparing=True)
        if not args.objectives:
            raise InputError("compare needs --objectives, e.g. --objectives elbo,iwae:k=5 (or --resume OUT)")
        specs = [spec for spec in args.objectives.split(",") if spec.strip()]
        seeds, num_samples = args.seeds or [0], args.num_samples or 5000
        if args.snr and args.snr_epochs and max(args.snr_epochs) > config.fit.epochs:
            raise InputError(f"--snr-epochs {','.join(map(str, args.snr_epochs))}: the runs train for "
                             f"{config.fit.epochs} epochs (--epochs)")
    config.family.check_comparable()
    for spec in specs:
        spec_name, spec_options = parse_objective_spec(spec)
        config.family.check_objective(spec_name)
        get_objective(spec_name, **spec_options)
    out = args.resume or args.out or Path("runs") / f"compare-{config.data.name}"
    if not resuming:
        _refuse_existing(out, args.overwrite, "compare")
    config, train, valid = _training_data(config)
    test = config.data.load("test")
    note = None if resuming else binarization_note(args, config)
    if note and not args.quiet:
        print(f"elbolab compare: {note}", file=sys.stderr)
    if not resuming:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True)
        write_json(out / CONFIG_FILE, config.to_dict() | {"objectives": specs, "seeds": list(seeds), "num_samples": num_samples})
    snr_monitors: dict[str, SNRMonitor] = {}

    def monitor(name: str) -> Any:
        monitors = []
        if args.tensorboard:
            monitors.append(_tensorboard(out / TENSORBOARD_FOLDER / name, config, valid if valid is not None else train))
        if args.snr:
            shown = train.fixed_binarization(config.fit.seed)
            snr_monitors[name] = SNRMonitor(shown.x[:SNR_POINTS], *(c[:SNR_POINTS] for c in config.conditions(shown)),
                                            epochs=args.snr_epochs or [config.fit.epochs], ks=args.snr_k)
            monitors.append(snr_monitors[name])
        return _Monitors(monitors) if monitors else None

    try:
        comparison = compare_runs(
            lambda: config.new_model(train), config.new_guide, train, config.fit, objectives=specs, seeds=seeds,
            test=test, valid=valid, num_samples=num_samples, progress=False if args.quiet else None,
            args=config.conditions(train, training=True), valid_args=config.conditions(valid), test_args=config.conditions(test),
            folder=out / "runs", monitor=monitor if args.tensorboard or args.snr else None,
        )
    except TrainingInterrupted as stop:
        raise _interrupted(stop, f"elbolab compare --resume {out}") from None
    summary = summarize(comparison.table)
    markdown = to_markdown(summary, num_samples)
    atomic_write(out / "histories.csv", comparison.histories.to_csv(index=False).encode())
    atomic_write(out / "summary.md", markdown.encode())
    plot_comparison_curves(comparison.histories, out / "learning_curves.png")
    plot_comparison_summary(summary, out / "log_likelihood.png", num_samples)
    snr_table = _write_snr(out, snr_monitors) if args.snr else None
    atomic_write(out / COMPARISON_FILE, comparison.table.to_csv(index=False).encode())  # last: the comparison is finished
    if not args.quiet:
        print(f"{out}: {config.data.name}, {config.fit.epochs} epochs, nats per test point, mean ± s.e. over seeds")
        print(markdown, end="")
        if snr_table is not None:
            print(f"gradient SNR (|mean| / std over estimates, mean over parameters) on {SNR_POINTS} training points:")
            wide = snr_table.pivot_table(index=["run", "epoch", "group"], columns=["objective", "k"], values="snr_mean")
            print(wide.to_string(float_format=lambda v: f"{v:.3g}"))


SNR_POINTS = 100  # training points whose gradient compare --snr measures


class _Monitors:
    """Several monitors of one run, told in turn."""

    def __init__(self, monitors: list[Any]) -> None:
        self.monitors = monitors

    def step(self, *args: Any) -> None:
        for monitor in self.monitors:
            monitor.step(*args)

    def epoch(self, *args: Any) -> None:
        for monitor in self.monitors:
            monitor.epoch(*args)

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()


def _write_snr(out: Path, monitors: dict[str, SNRMonitor]) -> pd.DataFrame | None:
    """snr.csv of every run, and snr_against_k.png of the first run at its last measured epoch."""
    tables = [monitor.table.assign(run=name) for name, monitor in monitors.items() if len(monitor.table)]
    if not tables:
        print("elbolab compare: --snr measured nothing: no run reached an epoch of --snr-epochs", file=sys.stderr)
        return None
    table = pd.concat(tables, ignore_index=True)
    atomic_write(out / "snr.csv", table.to_csv(index=False).encode())
    first = table[table.run == table.run.iloc[0]]
    last = first[first.epoch == first.epoch.max()]
    plot_snr_against_k(last.drop(columns="run"), out / "snr_against_k.png",
                       title=f"gradient SNR against K: {table.run.iloc[0]}, after epoch {int(last.epoch.iloc[0])}")
    return table


def _tensorboard(folder: Path, config: RunConfig, shown: Dataset) -> Any:
    """A TensorBoard monitor writing into ``folder``; for images, with reconstructions of ``shown`` and samples."""
    if config.image_shape is None:
        return TensorBoardMonitor(folder)
    shown = shown.fixed_binarization(config.fit.seed)
    inputs, conditions = shown.x[:32], tuple(c[:32] for c in config.conditions(shown))

    def images(model: Any, guide: Any) -> dict[str, torch.Tensor]:
        device = next(iter(model.parameters()), torch.empty(0)).device
        reconstructions = config.family.reconstruct(model, guide, inputs.to(device), tuple(c.to(device) for c in conditions))
        pictures = {"reconstructions": torch.cat([inputs, reconstructions.cpu()]).reshape(-1, *config.image_shape)}
        if config.family.sample is not None:
            samples, _, _ = config.family.samples(model, 32, None, config.y_dim)
            pictures["samples"] = samples.cpu().reshape(-1, *config.image_shape)
        return pictures

    return TensorBoardMonitor(folder, images=images, image_every=5)


def _fit_figures(folder: Path, config: RunConfig, model: Any, guide: Any, history: pd.DataFrame, shown: Dataset) -> None:
    plot_history(history, folder / "loss_curves.png",
                 title=f"{config.model.name} on {config.data.name}, {config.fit.objective}")
    if config.image_shape is None:
        return
    for module in (model, guide):
        if module is not None:
            module.cpu()
    shown = shown.fixed_binarization(config.fit.seed)
    inputs, conditions = shown.x[:16], tuple(c[:16] for c in config.conditions(shown))
    reconstructions = config.family.reconstruct(model, guide, inputs, conditions)
    plot_reconstructions(inputs, reconstructions, config.image_shape, folder / "reconstructions.png")
    if config.family.sample is not None:
        samples, title, columns = config.family.samples(model, 64, None, config.y_dim)
        plot_image_grid(samples, config.image_shape, folder / "samples.png", title=title, columns=columns)


def _evaluation_data(config: RunConfig, args: argparse.Namespace, run: Path) -> Dataset:
    """The ``--split`` of a run's data set (from ``--data-dir`` when given), one fixed binarization."""
    data_config = replace(config.data, data_dir=args.data_dir) if args.data_dir else config.data
    data = data_config.load(args.split).fixed_binarization(seed=0)
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
        conditions = tuple(c.to(device) for c in run.config.conditions(data))
        pyro.set_rng_seed(args.seed)
        per_point, per_run = run.config.family.evaluate(run.model, run.guide, data.x.to(device), conditions,
                                                        num_samples=args.num_samples, progress=False if args.quiet else None,
                                                        compile=args.compile, labels=data.y)
        metrics = {"elbolab_version": __version__, "split": args.split, "num_points": data.num_points}
        metrics |= {f"{args.split}_{name}": value for name, value in per_point.items()} | per_run
        metrics_path = path / METRICS_FILE
        write_json(metrics_path, (read_json(metrics_path) if metrics_path.exists() else {}) | metrics)
        rows.append({"run": str(path), "model": run.config.model.name, "guide": run.config.guide.family,
                     "objective": run.config.fit.objective, **per_point})
    if not args.quiet:
        table = pd.DataFrame(rows)
        if "elbo" in table and "log_likelihood" in table:
            table["gap"] = table["log_likelihood"] - table["elbo"]
        print(f"{args.split} split, nats per data point" + (f", K = {args.num_samples}" if "log_likelihood" in table else ""))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _diagnose(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    run = load_run(args.run, device=device)
    config = run.config
    if config.family.no_diagnosis:
        raise InputError(f"{args.run} holds a run of the {config.model.name} model: {config.family.no_diagnosis}")
    data = _evaluation_data(config, args, args.run)
    rows = torch.arange(data.num_points)
    if args.points and args.points < data.num_points:
        # A random subset: data sets are often sorted by class, so the first N points would not do.
        chosen = torch.randperm(data.num_points, generator=torch.Generator().manual_seed(args.seed))[: args.points]
        rows = chosen.sort().values
    pyro.set_rng_seed(args.seed)
    result = diagnose(
        run.model, run.guide, data.x[rows].to(device), args.run, labels=data.y[rows] if data.y is not None else None,
        image_shape=config.image_shape, binary=data.kind == "binary", num_samples=args.num_samples, draws=args.draws,
        inference_points=args.inference_points, objective=config.fit.objective,
        attrs={"run": str(args.run), "data": config.data.name, "split": args.split, "seed": args.seed},
        point_ids=rows.tolist(), progress=False if args.quiet else None, gaps=args.gaps, gap_steps=args.gap_steps,
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
    if args.gaps:
        print(f"  gaps of {s['gap_points']} points ({s['gap_steps']} steps of per-point guides): approximation "
              f"{s['approximation_gap_mean']:.3f}, amortization {s['amortization_gap_mean']:.3f} nats per point; "
              f"a per-point full-covariance Gaussian's approximation gap {s['approximation_gap_full_mean']:.3f}  (gaps.csv)")
    print(f"  wrote {', '.join(path.name for path in result.files)}")


def _calibrate(args: argparse.Namespace) -> None:
    run = load_run(args.run, device=resolve_device(args.device))
    config = run.config
    if config.family.no_diagnosis:
        raise InputError(f"{args.run} holds a run of the {config.model.name} model, which calibrate reads no more "
                         f"than diagnose: {config.family.no_diagnosis}")
    pyro.set_rng_seed(args.seed)
    try:
        result = calibration(run.model, run.guide, num_simulations=args.simulations, num_draws=args.draws, bins=args.bins,
                             progress=False if args.quiet else None)
    except InputError as error:
        raise InputError(f"{args.run}: {error}") from None
    atomic_write(args.run / "calibration.csv", result.table.to_csv(index=False).encode())
    atomic_write(args.run / "calibration_ranks.csv", result.ranks.to_csv(index=False).encode())
    plot_calibration(result, args.run / "calibration.png",
                     title=f"{config.model.name} on {config.data.name}, {config.fit.objective}: SBC ranks")
    verdicts = result.table["verdict"].value_counts().to_dict()
    summary = {"simulations": args.simulations, "draws": args.draws, "bins": result.bins, "seed": args.seed,
               "dimensions": len(result.table), "verdicts": verdicts,
               "min_chi2_p": float(result.table["chi2_p"].min()), "min_ks_p": float(result.table["ks_p"].min())}
    metrics_path = args.run / METRICS_FILE
    previous = read_json(metrics_path) if metrics_path.exists() else {}
    write_json(metrics_path, previous | {"calibration": summary, "elbolab_version": __version__})
    if args.quiet:
        return
    print(f"{args.run}: simulation-based calibration, {args.simulations} simulations x {args.draws} draws of q(z|x)")
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("  " + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.items())
          + " of " + f"{len(result.table)} dimensions; wrote calibration.csv, calibration_ranks.csv, calibration.png")


def _sample(args: argparse.Namespace) -> None:
    run = load_run(args.run, device=resolve_device(args.device))
    pyro.set_rng_seed(args.seed)
    try:
        samples, title, columns = run.config.family.samples(run.model, args.n, args.label, run.config.y_dim)
    except InputError as error:
        raise InputError(f"{args.run}: {error}") from None
    samples = samples.cpu()
    image_shape = run.config.image_shape
    out = args.out or args.run / ("samples.png" if image_shape else "samples.csv")
    if out.suffix == ".png" and image_shape:
        plot_image_grid(samples, image_shape, out, title=f"{title}; seed {args.seed}", columns=columns)
    elif out.suffix == ".csv":
        atomic_write(out, pd.DataFrame(samples.numpy()).to_csv(index=False).encode())
    else:
        raise InputError(f"{out}: write samples to a .png (image data) or .csv file")
    print(out)
