"""Run folders written by elbolab 0.1.0 before the model-family registry still load, evaluate and sample to the same numbers.

``written_by_0.1.0/`` holds tiny runs of every built-in family (and a flow guide under IWAE),
fitted, evaluated (``elbolab evaluate --num-samples 10``) and sampled (``elbolab sample --n 4``,
seed 0) by that version; their ``metrics.json`` and ``samples.csv`` are what it printed.
"""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from elbolab.cli import main
from elbolab.runs import load_run

OLD_RUNS = Path(__file__).parent / "written_by_0.1.0"
NAMES = sorted(path.name for path in OLD_RUNS.iterdir() if path.is_dir())


@pytest.fixture
def old_run(request, tmp_path):
    run = tmp_path / request.param
    shutil.copytree(OLD_RUNS / request.param, run)
    return run


def test_every_family_is_kept():
    assert NAMES == ["autoencoder", "cvae", "hvae", "vae", "vae-flow", "vqvae"]


@pytest.mark.parametrize("old_run", NAMES, indirect=True)
def test_an_old_run_evaluates_to_the_numbers_it_had(old_run):
    expected = json.loads((old_run / "metrics.json").read_text())
    (old_run / "metrics.json").unlink()
    assert main(["evaluate", str(old_run), "--num-samples", "10", "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key


@pytest.mark.parametrize("old_run", [name for name in NAMES if name != "autoencoder"], indirect=True)
def test_an_old_run_samples_what_it_sampled(old_run, tmp_path):
    out = tmp_path / "samples.csv"
    assert main(["sample", str(old_run), "--n", "4", "--device", "cpu", "--out", str(out)]) == 0
    expected = pd.read_csv(old_run / "samples.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, rtol=1e-5, atol=1e-6)


# Options added since 0.1.0, which an old run's config reads as their defaults.
ADDED_SINCE = {
    "fit": {"compile": False, "max_minutes": None},
    "model": {"clusters": 10, "labels_per_class": 10, "classification_weight": 50.0, "arch": "mlp", "channels": [32, 64],
              "kernel": 3, "residual_blocks": 0, "gated": False, "prior": "standard", "pseudo_inputs": 500},
}


@pytest.mark.parametrize("old_run", NAMES, indirect=True)
def test_an_old_run_rebuilds_its_config(old_run):
    run = load_run(old_run)
    written = json.loads((old_run / "config.json").read_text())
    for section, options in ADDED_SINCE.items():
        written[section] = written[section] | options
    assert run.config.to_dict() == written


@pytest.mark.parametrize("old_run", ["hvae"], indirect=True)
def test_an_option_of_another_family_that_an_old_run_recorded_is_dropped_on_reading(old_run):
    """0.1.0 accepted and ignored ``--z-dim`` for an hvae and wrote it down; the run still loads and evaluates alike."""
    config = json.loads((old_run / "config.json").read_text())
    config["model"]["z_dim"] = 30
    (old_run / "config.json").write_text(json.dumps(config))
    expected = json.loads((old_run / "metrics.json").read_text())
    assert main(["evaluate", str(old_run), "--num-samples", "10", "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((old_run / "metrics.json").read_text())
    assert metrics["test_log_likelihood"] == pytest.approx(expected["test_log_likelihood"], rel=1e-5)
    assert load_run(old_run).config.model.z_dim == 20  # the option it never read is not carried on
