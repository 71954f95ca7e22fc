"""The elbolab command end to end, and its refusals: one line, exit status 2, nothing written."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import TINY, exit_status_and_stderr

from elbolab.cli import build_parser, main


def test_fit_writes_a_complete_run_folder(fitted_run):
    names = sorted(p.name for p in fitted_run.iterdir())
    assert names == ["checkpoint.safetensors", "config.json", "history.csv", "loss_curves.png", "reconstructions.png",
                     "samples.png", "weights.safetensors"]
    config = json.loads((fitted_run / "config.json").read_text())
    assert config["model"]["hidden"] == [16] and config["fit"]["epochs"] == 2 and config["x_dim"] == 64
    assert len(pd.read_csv(fitted_run / "history.csv")) == 2


def test_evaluate_writes_metrics_and_prints_a_table(fitted_run, capsys):
    assert main(["evaluate", str(fitted_run), "--num-samples", "20"]) == 0
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["num_points"] == 360
    assert metrics["test_elbo"] <= metrics["test_log_likelihood"] < 0
    assert "log_likelihood" in capsys.readouterr().out


def test_sample_writes_an_image_grid(fitted_run, tmp_path):
    assert main(["sample", str(fitted_run), "--n", "9", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 1000


@pytest.mark.parametrize("guide", [["--guide", "mixture", "--components", "3"],
                                   ["--guide", "flow", "--flow", "affine-coupling", "--flow-depth", "2"]])
def test_fit_and_evaluate_with_a_richer_guide(tmp_path, guide):
    out = tmp_path / "run"
    assert main(["fit", *TINY, *guide, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["guide"]["family"] == guide[1]
    assert main(["evaluate", str(out), "--num-samples", "20", "--quiet"]) == 0  # the guide is rebuilt and loaded
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_elbo"] <= metrics["test_log_likelihood"] < 0


def test_toml_config_fills_the_same_fields_and_flags_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[data]\nname = "digits"\nbinarize = "dynamic"\n[model]\nz_dim = 3\nhidden = [16]\n[fit]\nepochs = 1\nseed = 4\n')
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["model"]["z_dim"] == 3 and written["fit"]["epochs"] == 2 and written["fit"]["seed"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--epochs", "-1"], "--epochs"),
        (["fit", "--objective", "elbo-analytc"], "did you mean 'elbo-analytic'"),
        (["fit", "--data", "cifar"], "unknown data set 'cifar'"),
        (["fit", "--data", "binarized-mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["fit", "--data", "digits", "--binarize", "none"], "bernoulli likelihood needs binary data"),
        (["fit", "--model", "autoencoder", "--binarize", "dynamic"], "--objective reconstruction"),
        (["fit", "--binarize", "dynamic", "--device", "cuda:7"], "CUDA is not available"),
        (["fit", "--hidden", "10,x"], "--hidden"),
        (["fit", "--config", "/nonexistent.toml"], "no such config file"),
        (["fit", "--binarize", "dynamic", "--guide", "flw"], "--guide"),
        (["fit", "--binarize", "dynamic", "--guide", "mixture", "--components", "0"], "--components"),
        (["fit", "--binarize", "dynamic", "--guide", "mixture", "--objective", "elbo-analytic"], "no closed-form KL"),
        (["evaluate", "/nonexistent-run"], "no such run folder"),
        (["diagnose", "/nonexistent-run"], "no such run folder"),
        (["diagnose", "runs/x", "--draws", "0"], "--draws"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [*argv, "--out", str(out)] if argv[0] == "fit" else argv
    status, stderr = exit_status_and_stderr(argv, capsys)
    assert status == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_bad_toml_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nz_dim = 3")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[model]\nzdim = 3\n")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for path, message in [(bad, "not a readable TOML"), (unknown, "did you mean 'z_dim'"), (empty, "empty")]:
        result = subprocess.run([sys.executable, "-m", "elbolab", "fit", "--config", str(path)], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_existing_run_is_not_overwritten_without_flag(fitted_run):
    before = (fitted_run / "weights.safetensors").read_bytes()
    assert main(["fit", *TINY, "--out", str(fitted_run)]) == 2
    assert (fitted_run / "weights.safetensors").read_bytes() == before


def test_help_explains_every_command(capsys):
    # The entry point once, in a process of its own; every command's help in this one (an import costs seconds).
    result = subprocess.run([sys.executable, "-m", "elbolab", "fit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: elbolab fit" in result.stdout
    for command in ("fit", "compare", "evaluate", "diagnose", "calibrate", "sample"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and "usage: elbolab " + command in capsys.readouterr().out


def test_compare_writes_the_table_summary_and_figures(tmp_path, capsys):
    out = tmp_path / "comparison"
    argv = ["compare", "--binarize", "dynamic", "--hidden", "16", "--z-dim", "2", "--epochs", "2",
            "--objectives", "elbo,iwae:k=3,renyi:alpha=-inf:k=3", "--seeds", "0,1", "--num-samples", "20",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert table["objective"].tolist() == ["elbo", "elbo", "iwae:k=3", "iwae:k=3", "renyi:alpha=-inf:k=3", "renyi:alpha=-inf:k=3"]
    assert (table["gap"] == table["test_log_likelihood"] - table["test_elbo"]).all()
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.csv", "config.json", "histories.csv", "learning_curves.png", "log_likelihood.png", "runs",
        "summary.md"]
    assert "| iwae:k=3 | 2 |" in (out / "summary.md").read_text()
    assert len(pd.read_csv(out / "histories.csv")) == 6 * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--objectives", "elbo,iwea"], "unknown objective 'iwea'"),
        (["compare", "--objectives", "renyi:alpha=1"], "alpha = 1"),
        (["compare", "--objectives", "iwae:k=two"], "k must be int"),
        (["compare", "--objectives", "elbo", "--seeds", "1,1"], "seeds repeat"),
    ],
)
def test_compare_refuses_bad_specs(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    status, stderr = exit_status_and_stderr([*argv, "--binarize", "dynamic", "--out", str(out)], capsys)
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


DIAGNOSE_FILES = {
    "diagnostics.csv", "inference_data.nc", "khat.png", "gap_histogram.png", "latent_scatter.png",
    "kl_per_dimension.png", "worst_best_khat.png", "interpolations.png", "traversals.png", "ppc_images.png",
    "ppc_statistics.png",
}


def test_diagnose_writes_the_table_inference_data_and_figures(fitted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    before = {p.name for p in run.iterdir()}
    argv = ["diagnose", str(run), "--num-samples", "200", "--points", "120", "--draws", "10", "--inference-points", "30"]
    assert main(argv) == 0
    assert {p.name for p in run.iterdir()} == before | DIAGNOSE_FILES | {"metrics.json"}
    table = pd.read_csv(run / "diagnostics.csv", index_col="point")
    assert list(table.columns) == ["label", "log_likelihood", "elbo", "gap", "ess", "pareto_k"] and len(table) == 120
    assert table.index.is_monotonic_increasing and table.index.max() < 360  # rows of the 360-point test split
    assert (table.gap >= -1e-6).all() and (table.ess <= 200 + 1e-6).all()
    from elbolab.analysis import load_inference_data

    idata = load_inference_data(run / "inference_data.nc")
    assert idata.posterior["z"].shape == (1, 10, 30, 2)
    assert set(idata.posterior["obs"].values) <= set(table.index)
    assert idata.posterior.attrs["objective"] == "elbo" and idata.posterior.attrs["run"] == str(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        arviz.plot_khat(table.pareto_k.to_numpy())  # what elbolab writes is what ArviZ reads
    summary = json.loads((run / "metrics.json").read_text())["test_diagnose"]
    assert summary["points"] == 120 and summary["latent_dims"] == 2
    assert summary["khat_above_0.7"] == pytest.approx((table.pareto_k > 0.7).mean())
    out = capsys.readouterr().out
    assert "PSIS k-hat > 0.7" in out and "active units" in out


def test_diagnose_refuses_an_autoencoder_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "ae"
    assert main(["fit", *TINY, "--model", "autoencoder", "--objective", "reconstruction", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    result = subprocess.run([sys.executable, "-m", "elbolab", "diagnose", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and "no posterior q(z|x) to diagnose" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_fit_with_no_options_trains_on_the_default_data_and_says_how_it_binarized(tmp_path: Path, capsys) -> None:
    """The defaults agree: digits are grayscale, the likelihood Bernoulli, so the data are binarized dynamically."""
    out = tmp_path / "run"
    assert main(["fit", "--epochs", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("elbolab fit: digits is grayscale and the likelihood bernoulli: binarized dynamically "
                                   "(x ~ Bernoulli(x) at every batch; --binarize none with --likelihood continuous-bernoulli "
                                   "models the gray levels)")
    assert json.loads((out / "config.json").read_text())["data"]["binarize"] == "dynamic"
    # A likelihood of gray levels is not binarized, and nothing is said.
    assert main(["fit", "--epochs", "1", "--likelihood", "continuous-bernoulli", "--out", str(tmp_path / "c")]) == 0
    assert "binarized" not in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "config.json").read_text())["data"]["binarize"] is None


def test_fit_help_names_every_default_and_the_defaults_it_names_are_the_configs() -> None:
    """Every option of fit says its default, and a "(default X)" written by hand agrees with the dataclass field."""
    from dataclasses import fields

    from elbolab.cli_arguments import FIT_FLAGS
    from elbolab.data import DataConfig
    from elbolab.guides import GuideConfig
    from elbolab.inference import FitConfig
    from elbolab.models import ModelConfig

    parser = build_parser()
    fit_parser = parser._subparsers._group_actions[0].choices["fit"]
    for action in fit_parser._actions:
        if action.option_strings and action.option_strings[0] not in ("-h", "--overwrite", "--quiet", "--resume"):
            assert "default" in (action.help or ""), f"{action.option_strings[0]} does not say its default"
    sections = {"data": DataConfig, "model": ModelConfig, "guide": GuideConfig, "fit": FitConfig}
    for flag, (section, name, options) in FIT_FLAGS.items():
        stated = re.search(r"default ([^ ;:)]+)", options["help"])
        if not stated or flag == "--z-dims":  # () in the config: the hvae family fills in 50,20 (checked in its tests)
            continue
        default = {f.name: f for f in fields(sections[section])}[name].default
        if default is dataclasses.MISSING:
            default = {f.name: f for f in fields(sections[section])}[name].default_factory()
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(stated.group(1).rstrip(",")) == default, (flag, stated.group(1), default)
        else:
            shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else str(default)
            assert stated.group(1).rstrip(",") == shown.lower(), (flag, stated.group(1), default)
