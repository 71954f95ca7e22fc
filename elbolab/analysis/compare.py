"""Comparing ELBO objectives on the same model, data, optimizer, epochs and initialisations.

For every objective and seed the model and guide are built afresh under that seed, so every
objective starts from the same weights for a given seed; each run is evaluated on the same test
data with the same number of importance samples. Differences in the table are the objectives'.
"""

from __future__ import annotations

__all__ = ["Comparison", "compare", "compare_runs", "run_folder_name", "summarize", "to_markdown"]

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyro
from torch import Tensor
from tqdm.auto import tqdm

from elbolab.analysis.latent import active_units
from elbolab.data import Dataset
from elbolab.errors import InputError
from elbolab.files import read_json, write_json
from elbolab.inference import FitConfig, fit, importance_estimate, resolve_device
from elbolab.inference.objectives import get_objective, parse_objective_spec
from elbolab.inference.training_checkpoint import CHECKPOINT_FILE

RESULT_FILE = "result.json"
# The FitConfig fields every run of a comparison shares; the others are each run's own.
SHARED_OPTIONS = ("epochs", "batch_size", "lr", "device", "clip_grad_norm", "max_bad_steps", "max_restorations",
                  "checkpoint_every", "compile")


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_runs` returns: the per-run table and every run's per-epoch history."""

    table: pd.DataFrame
    histories: pd.DataFrame


def compare(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """The table of :func:`compare_runs` (same arguments): one row per objective and seed."""
    return compare_runs(*args, **kwargs).table


def compare_runs(
    model_factory: Callable[[], Any],
    guide_factory: Callable[[Any], Any],
    data: Dataset | Tensor,
    config: FitConfig | None = None,
    *,
    objectives: Sequence[str],
    seeds: Sequence[int] = (0,),
    test: Dataset | Tensor,
    valid: Dataset | Tensor | None = None,
    num_samples: int = 5000,
    progress: bool | None = None,
    args: Sequence[Tensor] = (),
    valid_args: Sequence[Tensor] = (),
    test_args: Sequence[Tensor] = (),
    folder: str | Path | None = None,
    monitor: Callable[[str], Any] | None = None,
    **options: Any,
) -> Comparison:
    """Train one model/guide pair under several objectives and seeds; evaluate each on ``test``.

    Arguments:
        model_factory: builds a fresh model (called after seeding).
        guide_factory: builds a fresh guide for the model it is given (a ladder or VQ guide
            shares networks with its model).
        data: training data.
        objectives: spec strings, e.g. ``["elbo", "iwae:k=5", "renyi:alpha=0.5:k=5"]``.
        seeds: one run per objective and seed; a seed fixes initialisation, data order and samples.
        test: evaluation data; ``valid``: optional data for per-epoch validation ELBO curves.
        config: the training options every run shares (a :class:`~elbolab.inference.FitConfig`;
            ``None``: its defaults): ``epochs``, ``batch_size``, ``lr``, ``device``,
            ``clip_grad_norm``, ``max_bad_steps``, ``max_restorations``, ``checkpoint_every``.
            Its ``objective``, ``particles``, ``seed``, ``beta`` and ``warmup`` are not used: each
            run's objective is its spec (with the spec's ``k``, or the objective's own number of
            particles), its seed one of ``seeds``, at ``beta`` 1 without warm-up.
        **options: those shared options by name, overriding ``config`` (``epochs=50``).
        num_samples: importance samples for the test log-likelihood.
        progress: a progress bar over runs (``None``: only on a terminal).
        args, valid_args, test_args: further per-data-point tensors for ``data``, ``valid`` and
            ``test`` (e.g. one-hot labels of a conditional VAE), as in :func:`~elbolab.inference.fit`.
        folder: where each run keeps its training checkpoint (every ``checkpoint_every``
            epochs) and, once evaluated, its result: ``FOLDER/<objective>-seed<seed>/`` with
            ``checkpoint.safetensors`` and ``result.json``. Calling again with the same folder
            reads finished runs back, resumes unfinished ones from their checkpoints (exactly,
            on CPU) and trains the rest: an interrupted comparison loses at most the epochs
            since each run's last checkpoint. ``None``: nothing is written.
        monitor: ``monitor(run_name)`` -> the monitor :func:`~elbolab.inference.fit` tells of that
            run's steps and epochs (e.g. a :class:`~elbolab.runs.tensorboard.TensorBoardMonitor`
            writing under a folder of that name), closed when it has trained; ``None``: none.

    Returns:
        A :class:`Comparison`. Its ``table`` has one row per objective and seed: ``objective`` (the spec), ``name``, ``options``, ``seed``,
        ``test_elbo``, ``test_log_likelihood``, ``gap`` (log-likelihood minus ELBO), ``active_units``,
        ``train_seconds``; its ``histories`` every run's per-epoch history with ``objective``
        and ``seed`` columns.

    Example:
        >>> table = compare(lambda: VAE(64, 8), lambda model: GaussianGuide(64, 8), train,
        ...                 objectives=["elbo", "iwae:k=5"], seeds=[0, 1], test=test, epochs=50)
    """
    if unshared := sorted(options.keys() - set(SHARED_OPTIONS)):
        raise InputError(
            f"compare_runs takes the shared training options {', '.join(SHARED_OPTIONS)}, not {unshared[0]}: "
            "each run's objective and particles are its spec's (objectives=['iwae:k=5']), its seed one of seeds="
        )
    config = dataclasses.replace(config, **options) if config is not None else FitConfig(**options)
    shared = {name: getattr(config, name) for name in SHARED_OPTIONS}
    if not objectives:
        raise InputError("compare needs at least one objective")
    if not seeds:
        raise InputError("compare needs at least one seed")
    parsed = [(spec, *parse_objective_spec(spec)) for spec in objectives]
    for _, name, options in parsed:
        get_objective(name, **options)  # refuse bad options before any training
    test_x = test.fixed_binarization(0).x if isinstance(test, Dataset) else test
    device = resolve_device(config.device)
    test_x = test_x.to(device)  # once, on the device fit trains on
    test_args = tuple(a.to(device) for a in test_args)
    rows, histories = [], []
    runs = [(entry, seed) for entry in parsed for seed in seeds]
    bar = tqdm(runs, desc="compare", unit="run", disable=None if progress is None else not progress)
    for (spec, name, options), seed in bar:
        bar.set_postfix(objective=spec, seed=seed)
        run_folder = Path(folder) / run_folder_name(spec, seed) if folder is not None else None
        if run_folder is not None and (run_folder / RESULT_FILE).exists():
            row, history = _read_result(run_folder / RESULT_FILE)
        else:
            pyro.set_rng_seed(seed)
            model = model_factory()
            guide = guide_factory(model)
            run_monitor = monitor(run_folder_name(spec, seed)) if monitor is not None else None
            try:
                # Keywords, not the config: without a k in the spec, an objective keeps its own particles (IWAE's 5).
                result = fit(model, guide, data, objective=spec, seed=seed, **shared | {"device": device},
                             valid=valid, progress=False, args=args, valid_args=valid_args,
                             checkpoint=run_folder / CHECKPOINT_FILE if run_folder is not None else None, resume=True,
                             checkpoint_metadata={"objective": spec, "seed": seed}, monitor=run_monitor)
            finally:
                if run_monitor is not None:
                    run_monitor.close()
            history = result.history
            pyro.set_rng_seed(seed)
            estimate = importance_estimate(model, guide, test_x, *test_args, num_samples=num_samples)
            elbo, log_lik = estimate.elbo.mean().item(), estimate.log_likelihood.mean().item()
            row = {
                "objective": spec, "name": name,
                "options": ";".join(f"{k}={v}" for k, v in options.items()), "seed": seed,
                "test_elbo": elbo, "test_log_likelihood": log_lik, "gap": log_lik - elbo,
                "active_units": active_units(guide, test_x, *test_args),
                "train_seconds": float(history["seconds"].sum()),  # over every session of a resumed run
                "skipped_steps": int(history["skipped_steps"].sum()) if "skipped_steps" in history else 0,
                "compile_seconds": result.compile_seconds,
            }
            if config.compile and result.not_compiled and progress is not False:
                tqdm.write(f"compare: {spec}, seed {seed}: trained eagerly, not compiled: {result.not_compiled}", file=sys.stderr)
            if run_folder is not None:
                run_folder.mkdir(parents=True, exist_ok=True)
                write_json(run_folder / RESULT_FILE, {"row": row, "history": history.to_dict(orient="list")})
        rows.append(row)
        histories.append(history.assign(objective=spec, seed=seed))
    compiling = sum(row.get("compile_seconds", 0.0) for row in rows)
    if compiling and progress is not False:
        print(f"compare: compiled the training steps in {compiling:.1f} s in all (kept out of the train seconds)", file=sys.stderr)
    return Comparison(pd.DataFrame(rows), pd.concat(histories, ignore_index=True))


def run_folder_name(spec: str, seed: int) -> str:
    """The sub-folder of one objective and seed: the spec with ``:`` (not allowed on Windows) as ``_``."""
    return f"{spec.replace(':', '_')}-seed{seed}"


def _read_result(path: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    payload = read_json(path)
    try:
        return dict(payload["row"]), pd.DataFrame(payload["history"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not a comparison run's result (expected 'row' and 'history')") from None


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds, one row per objective, in the order first seen."""
    columns = ["test_elbo", "test_log_likelihood", "gap", "active_units", "train_seconds"]
    grouped = table.groupby("objective", sort=False)[columns]
    mean, count = grouped.mean(), grouped.count()
    stderr = grouped.std(ddof=1).fillna(0.0) / count.pow(0.5)
    summary = mean.join(stderr.add_suffix("_se"))
    summary.insert(0, "seeds", count["test_elbo"])
    if "skipped_steps" in table:
        summary["skipped_steps"] = table.groupby("objective", sort=False)["skipped_steps"].sum()
    return summary.reset_index()


def to_markdown(summary: pd.DataFrame, num_samples: int) -> str:
    """A Markdown table: mean ± standard error per objective (nats per data point)."""

    def cell(row: Any, column: str, digits: int = 2) -> str:
        value, se = getattr(row, column), getattr(row, f"{column}_se")
        return f"{value:.{digits}f} ± {se:.{digits}f}"

    lines = [
        f"| objective | seeds | test ELBO | test log p(x), K = {num_samples} | gap | active units | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    skipped_any = False
    for row in summary.itertuples(index=False):
        skipped = int(getattr(row, "skipped_steps", 0) or 0)
        skipped_any |= skipped > 0
        mark = f" (skipped {skipped} steps)" if skipped else ""
        lines.append(
            f"| {row.objective}{mark} | {row.seeds} | {cell(row, 'test_elbo')} | {cell(row, 'test_log_likelihood')} | "
            f"{cell(row, 'gap')} | {cell(row, 'active_units', 1)} | {cell(row, 'train_seconds', 1)} |"
        )
    if skipped_any:
        lines.append("")
        lines.append("Runs marked 'skipped N steps' had steps with a non-finite loss or gradient, skipped (see the histories).")
    return "\n".join(lines) + "\n"
