"""elbolab fit --tensorboard and compare --tensorboard write event files that hold the run's scalars; without the extra, one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from elbolab.cli import main

TINY = ["--hidden", "16", "--z-dim", "2", "--batch-size", "256", "--quiet"]


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_fit_writes_the_history_as_scalars_and_images_into_the_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["fit", "--epochs", "2", "--tensorboard", "--out", str(out), *TINY]) == 0
    logged = events(out / "tensorboard")
    history = pd.read_csv(out / "history.csv")
    for column in ("train_loss", "valid_elbo", "beta", "lr", "seconds"):
        values = [event.value for event in logged.Scalars(f"epoch/{column}")]
        assert values == pytest.approx(list(history[column]), rel=1e-6), column
    steps = [event.step for event in logged.Scalars("step/loss")]
    assert steps == list(range(2, 2 * 5 + 1))  # 1,257 digits, batches of 256: 5 steps an epoch; the first is the baseline
    assert {"images/reconstructions", "images/samples"} <= set(logged.Tags()["images"])


@pytest.mark.slow
def test_compare_writes_one_event_folder_per_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "compare"
    assert main(["compare", "--objectives", "elbo,iwae:k=2", "--epochs", "1", "--num-samples", "4", "--tensorboard",
                 "--out", str(out), *TINY]) == 0
    folders = sorted(path.name for path in (out / "tensorboard").iterdir())
    assert len(folders) == 2 and folders[0].startswith("elbo"), folders
    for folder in (out / "tensorboard").iterdir():
        assert len(events(folder).Scalars("epoch/train_loss")) == 1


def test_without_tensorboard_the_flag_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    for name in [module for module in sys.modules if module == "tensorboard" or module.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["fit", "--epochs", "1", "--tensorboard", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'elbolab[tensorboard]'" in err and "--tensorboard" in err
    assert not out.exists()
