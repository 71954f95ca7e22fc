"""diagnose --gaps, calibrate and compare --snr end to end, and their refusals: one line, exit status 2, nothing written."""

import json
import shutil

import pandas as pd
import pytest
from cli_helpers import exit_status_and_stderr

from elbolab.cli import main


def test_diagnose_gaps_writes_the_table_the_figure_and_the_mean_gaps(fitted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    argv = ["diagnose", str(run), "--num-samples", "100", "--points", "40", "--draws", "5", "--inference-points", "10",
            "--gaps", "8", "--gap-steps", "30"]
    assert main(argv) == 0
    assert (run / "gaps.png").stat().st_size > 1000
    gaps = pd.read_csv(run / "gaps.csv", index_col="point")
    assert len(gaps) == 8 and set(gaps.index) <= set(pd.read_csv(run / "diagnostics.csv").point)
    # The two gaps add up to the whole gap, and the optimized guides' ELBOs lie below log p(x) (up to MC error).
    total = gaps.log_likelihood - gaps.elbo_amortized
    assert (gaps.approximation_gap + gaps.amortization_gap - total).abs().max() < 1e-4
    assert (gaps.elbo_optimized <= gaps.log_likelihood + 0.5).all() and (gaps.elbo_full <= gaps.log_likelihood + 0.5).all()
    summary = json.loads((run / "metrics.json").read_text())["test_diagnose"]
    assert summary["gap_points"] == 8 and summary["gap_steps"] == 30
    assert summary["amortization_gap_mean"] == pytest.approx(gaps.amortization_gap.mean())
    assert summary["approximation_gap_mean"] == pytest.approx(gaps.approximation_gap.mean())
    assert "gaps of 8 points (30 steps of per-point guides): approximation" in capsys.readouterr().out


def test_calibrate_writes_ranks_per_dimension_and_a_summary(fitted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    assert main(["calibrate", str(run), "--simulations", "60", "--draws", "19", "--bins", "5"]) == 0
    table = pd.read_csv(run / "calibration.csv")
    assert len(table) == 2 and table.chi2_p.between(0, 1).all() and table.ks_p.between(0, 1).all()
    ranks = pd.read_csv(run / "calibration_ranks.csv")
    assert ranks.shape == (60, 2) and ranks.to_numpy().min() >= 0 and ranks.to_numpy().max() <= 19
    assert (run / "calibration.png").stat().st_size > 1000
    summary = json.loads((run / "metrics.json").read_text())["calibration"]
    assert summary["simulations"] == 60 and summary["draws"] == 19 and summary["dimensions"] == 2
    assert sum(summary["verdicts"].values()) == 2
    assert summary["min_chi2_p"] == pytest.approx(table.chi2_p.min())
    assert "simulation-based calibration" in capsys.readouterr().out


def test_compare_snr_measures_every_objective_at_every_k(tmp_path, capsys):
    out = tmp_path / "comparison"
    argv = ["compare", "--binarize", "dynamic", "--hidden", "16", "--z-dim", "2", "--epochs", "2",
            "--objectives", "elbo,iwae:k=3", "--num-samples", "20", "--snr", "--snr-epochs", "1,2", "--snr-k", "1,4",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    snr = pd.read_csv(out / "snr.csv")
    assert set(snr.objective) == {"iwae", "iwae-dreg", "iwae-stl"} and set(snr.k) == {1, 4}
    assert set(snr.epoch) == {1, 2} and set(snr.group) == {"encoder", "decoder"}
    assert len(snr) == 2 * 2 * 3 * 2 * 2  # runs x epochs x objectives x K x groups
    assert (snr.snr_mean > 0).all()
    assert (out / "snr_against_k.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message, written",
    [
        (["calibrate", "RUN", "--bins", "1", "--simulations", "20", "--draws", "9"], "bins", "calibration.csv"),
        (["calibrate", "RUN", "--simulations", "0"], "--simulations", "calibration.csv"),
        (["calibrate", "/nonexistent-run"], "no such run folder", None),
        (["diagnose", "RUN", "--gaps", "0"], "--gaps", "gaps.csv"),
        (["diagnose", "RUN", "--gap-steps", "-3"], "--gap-steps", "gaps.csv"),
    ],
)
def test_diagnostic_mistakes_exit_2_with_one_line(fitted_run, tmp_path, capsys, argv, message, written):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    status, stderr = exit_status_and_stderr([str(run) if a == "RUN" else a for a in argv], capsys)
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    if written:
        assert not (run / written).exists() and not (run / "metrics.json").exists()


def test_compare_snr_with_resume_is_refused_in_one_line(tmp_path, capsys):
    status, stderr = exit_status_and_stderr(["compare", "--resume", str(tmp_path / "old"), "--snr"], capsys)
    assert status == 2 and "--snr" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_diagnose_gaps_refuses_a_guide_without_per_point_parameters(tmp_path, capsys):
    run = tmp_path / "hvae"
    fit = ["--data", "digits", "--binarize", "dynamic", "--hidden", "16", "--epochs", "1", "--quiet"]
    assert main(["fit", *fit, "--model", "hvae", "--z-dims", "3,2", "--out", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    status, stderr = exit_status_and_stderr(["diagnose", str(run), "--gaps", "4"], capsys)
    assert status == 2 and "BottomUpGuide does not expose its family's parameters per point" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_compare_snr_epochs_beyond_the_training_are_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "comparison"
    status, stderr = exit_status_and_stderr(["compare", "--binarize", "dynamic", "--epochs", "2", "--objectives", "elbo",
                                             "--snr", "--snr-epochs", "1,5", "--out", str(out)], capsys)
    assert status == 2 and "--snr-epochs 1,5: the runs train for 2 epochs" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
