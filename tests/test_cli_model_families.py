"""`elbolab fit/evaluate/sample/compare` with the conditional, hierarchical and vector-quantized VAEs."""

import json
import subprocess
import sys

import pytest

from elbolab.cli import main

TINY = ["--data", "digits", "--binarize", "dynamic", "--hidden", "16", "--epochs", "2", "--quiet"]
MODELS = {
    "cvae": ["--model", "cvae", "--z-dim", "2"],
    "hvae": ["--model", "hvae", "--z-dims", "4,2", "--hidden-upper", "8", "--guide", "ladder"],
    "hvae-bottom-up": ["--model", "hvae", "--z-dims", "4,2", "--objective", "iwae-dreg"],
    "vqvae": ["--model", "vqvae", "--z-dim", "2", "--codebook-size", "8", "--num-codes", "3"],
    "gmvae": ["--model", "gmvae", "--z-dim", "2", "--clusters", "3"],
    "ssvae": ["--model", "ssvae", "--z-dim", "2", "--labels-per-class", "5"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    for name, options in MODELS.items():
        assert main(["fit", *TINY, *options, "--out", str(folder / name)]) == 0, name
    return folder


@pytest.mark.parametrize("name", MODELS)
def test_fit_writes_the_run_and_evaluate_reloads_it(runs, name):
    run = runs / name
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.safetensors", "config.json", "history.csv", "loss_curves.png", "reconstructions.png",
        "samples.png", "weights.safetensors"]
    assert main(["evaluate", str(run), "--num-samples", "10", "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_elbo"] < 0 and metrics["test_reconstruction_loss"] > 0
    if name == "vqvae":
        assert 1 <= metrics["test_perplexity"] <= 8 and 0 < metrics["test_code_bits_per_code"] <= 3
        assert metrics["rate_bits"] == pytest.approx(9.0)  # 3 codes of log2 8 bits
    else:
        assert metrics["test_elbo"] <= metrics["test_log_likelihood"]
    if name == "ssvae":  # the classifier q(y | x) on the test split's labels
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
    if name == "gmvae":  # digits has labels: the clusters are matched to them
        assert 0.1 <= metrics["test_clustering_accuracy"] <= 1 and 1 <= metrics["test_clusters_used"] <= 3


def test_config_records_what_rebuilds_each_model(runs):
    cvae = json.loads((runs / "cvae" / "config.json").read_text())
    assert cvae["y_dim"] == 10 and cvae["guide"]["family"] == "gaussian"
    hvae = json.loads((runs / "hvae" / "config.json").read_text())
    assert hvae["model"]["z_dims"] == [4, 2] and hvae["guide"]["family"] == "ladder"
    default = json.loads((runs / "hvae-bottom-up" / "config.json").read_text())
    assert default["guide"]["family"] == "bottom-up"  # the hvae's default guide
    vqvae = json.loads((runs / "vqvae" / "config.json").read_text())
    assert vqvae["model"]["codebook_size"] == 8 and vqvae["guide"]["family"] == "nearest-code"


def test_vqvae_history_reports_codebook_usage(runs):
    header = (runs / "vqvae" / "history.csv").read_text().splitlines()[0]
    assert "perplexity" in header and "codes_used" in header


def test_sample_writes_a_class_of_a_cvae(runs, tmp_path):
    assert main(["sample", str(runs / "cvae"), "--label", "3", "--n", "8", "--out", str(tmp_path / "threes.png")]) == 0
    assert (tmp_path / "threes.png").stat().st_size > 1000
    assert main(["sample", str(runs / "vqvae"), "--n", "8", "--out", str(tmp_path / "codes.png")]) == 0


def test_compare_trains_a_cvae_under_several_objectives(tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", *[a for a in TINY if a != "--quiet"], *MODELS["cvae"], "--objectives", "elbo,iwae:k=3",
                 "--num-samples", "10", "--out", str(out), "--quiet"]) == 0
    assert (out / "comparison.csv").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", *TINY, "--model", "hvae", "--guide", "gaussian"], "takes the guides bottom-up, ladder"),
        (["fit", *TINY, "--model", "hvae", "--z-dims", "8"], "two or more"),
        (["fit", *TINY, "--z-dims", "8,4"], "options of the hvae model"),
        (["fit", *TINY, "--model", "vqvae", "--objective", "iwae"], "--objective elbo"),
        (["fit", *TINY, "--model", "vqvae", "--codebook-size", "1"], "--codebook-size"),
        (["fit", *TINY, "--model", "hvae", "--guide", "bottom-up", "--objective", "elbo-analytic"], "model's order"),
        (["fit", "--data", "synthetic-linear-gaussian", "--likelihood", "gaussian", "--model", "cvae"], "has none"),
    ],
)
def test_model_family_mistakes_exit_2_with_one_line(tmp_path, argv, message):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "elbolab", *argv, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_label_is_refused_for_a_model_without_classes_and_out_of_range(runs, capsys):
    assert main(["sample", str(runs / "hvae"), "--label", "3"]) == 2
    assert main(["sample", str(runs / "cvae"), "--label", "10"]) == 2
    assert "0 to 9" in capsys.readouterr().err
