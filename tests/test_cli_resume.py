"""Killed, interrupted and resumed runs of the `elbolab` command: nothing half-written, nothing lost.

Each run is a real `elbolab` process. A run killed with SIGKILL at a random moment, or in the
middle of writing its checkpoint, and then resumed must end with the weights, bit for bit, of a
run that was never stopped.
"""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from elbolab.cli import main
from elbolab.inference.training_checkpoint import read_checkpoint

# About 40 steps per epoch on 8x8 digits: a few seconds of training, a checkpoint every epoch.
FIT = ["fit", "--binarize", "dynamic", "--hidden", "64", "--z-dim", "4", "--epochs", "25", "--batch-size", "32",
       "--device", "cpu", "--quiet"]


def start(*argv, python=None):
    command = [sys.executable, "-m", "elbolab", *argv] if python is None else [sys.executable, "-c", python, *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def finish(*argv):
    result = subprocess.run([sys.executable, "-m", "elbolab", *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def assert_same_weights(run: Path, reference: Path):
    expected, found = load_file(reference / "weights.safetensors"), load_file(run / "weights.safetensors")
    assert expected.keys() == found.keys()
    for key in expected:
        assert (expected[key] == found[key]).all(), f"{run}: {key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(*FIT, "--out", str(out))
    return out


@pytest.mark.slow  # 45 s with its reference run; a kill mid-write and Ctrl-C keep resuming covered by default
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(reference, tmp_path):
    rng = random.Random(7)
    for attempt in range(2):  # two runs of two random kills each (a third took 17 s of the suite's 10 minutes)
        out = tmp_path / f"run{attempt}"
        checkpoint = out / "checkpoint.safetensors"
        process = start(*FIT, "--out", str(out))
        kills = 0
        for _ in range(2):  # killed twice: once in the first run, once while resuming
            wait_for(checkpoint, process)
            time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            # The checkpoint is always whole: it reads, and its checksum holds.
            training = read_checkpoint(checkpoint)[1]
            assert 1 <= training["progress"]["epoch"] <= 25
            assert not (out / "weights.safetensors").exists() or training["progress"]["epoch"] == 25
            process = start("fit", "--resume", str(out), "--quiet")
        assert process.wait() == 0, process.communicate()
        assert kills >= 1
        assert_same_weights(out, reference)
        assert not list(out.glob(".*.tmp"))
        history = pd.read_csv(out / "history.csv")
        assert history["epoch"].tolist() == list(range(1, 26))


# Runs `elbolab fit` with os.replace slowed down on the third checkpoint: the new checkpoint is
# fully in its temporary file but not yet renamed when the test kills the process.
SLOW_THIRD_CHECKPOINT = """
import os, sys, time
from pathlib import Path
marker, argv = Path(sys.argv[1]), sys.argv[2:]
real_replace, calls = os.replace, []
def replace(source, target):
    if str(target).endswith("checkpoint.safetensors"):
        calls.append(target)
        if len(calls) == 3:
            marker.write_text(str(source))
            time.sleep(600)
    real_replace(source, target)
os.replace = replace
from elbolab.cli import main
sys.exit(main(argv))
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_checkpoint(reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    process = start(str(marker), *FIT, "--out", str(out), python=SLOW_THIRD_CHECKPOINT)
    wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert Path(marker.read_text()).exists()  # the new checkpoint, written but never renamed
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["progress"]["epoch"] == 2
    finish("fit", "--resume", str(out), "--quiet")
    assert_same_weights(out, reference)
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_checkpoints_and_says_how_to_resume(reference, tmp_path):
    out = tmp_path / "run"
    process = start(*FIT, "--out", str(out))
    wait_for(out / "checkpoint.safetensors", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert f"continue with: elbolab fit --resume {out}" in stderr
    assert not (out / "weights.safetensors").exists()
    for command in (["evaluate", str(out)], [*FIT, "--out", str(out)]):
        refused = subprocess.run([sys.executable, "-m", "elbolab", *command], capture_output=True, text=True)
        assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr
    finish("fit", "--resume", str(out), "--quiet")
    assert_same_weights(out, reference)


def test_resume_refuses_changed_options_and_finished_runs(reference, tmp_path):
    assert main(["fit", "--resume", str(reference), "--lr", "0.1"]) == 2
    assert main(["fit", "--resume", str(reference)]) == 2  # finished: nothing to resume
    assert main(["fit", "--resume", str(tmp_path / "nothing")]) == 2


COMPARE = ["compare", "--binarize", "dynamic", "--hidden", "32", "--z-dim", "2", "--epochs", "12", "--batch-size", "32",
           "--objectives", "elbo,iwae:k=3", "--seeds", "0,1", "--num-samples", "50", "--device", "cpu", "--quiet"]


def test_compare_resumes_skipping_finished_runs(tmp_path):
    reference = tmp_path / "reference"
    assert main([*COMPARE, "--out", str(reference)]) == 0

    out = tmp_path / "resumed"
    process = start(*COMPARE, "--out", str(out))
    second = out / "runs" / "elbo-seed1"
    wait_for(second / "checkpoint.safetensors", process)  # the first run is finished
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_result = out / "runs" / "elbo-seed0" / "result.json"
    finished_at = first_result.stat().st_mtime_ns
    assert not (out / "comparison.csv").exists()
    assert main(["compare", *COMPARE[1:], "--out", str(out)]) == 2  # unfinished: refused, with how to resume
    assert main(["compare", "--resume", str(out), "--quiet"]) == 0
    assert first_result.stat().st_mtime_ns == finished_at  # read back, not trained again
    columns = ["objective", "seed", "test_elbo", "test_log_likelihood", "active_units"]
    expected, found = pd.read_csv(reference / "comparison.csv"), pd.read_csv(out / "comparison.csv")
    pd.testing.assert_frame_equal(found[columns], expected[columns])

