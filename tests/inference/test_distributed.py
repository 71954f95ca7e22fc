"""Data-parallel training: torchrun with 2 processes and gloo on CPU, against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file

from elbolab.cli import main
from elbolab.contract import pair_contract
from elbolab.errors import InputError
from elbolab.inference.distributed import DataParallelLoss, ProcessGroup, rank_seed
from elbolab.inference.objectives import get_objective
from elbolab.runs import load_run

sys.path.insert(0, str(Path(__file__).parent))
from distributed_fit import run

SCRIPT = Path(__file__).parent / "distributed_fit.py"
pytestmark = pytest.mark.skipif(not torch_dist.is_available(), reason="torch without torch.distributed")


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def ranks(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(folder / "rank0.safetensors"), load_file(folder / "rank1.safetensors")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(str(SCRIPT), "autoencoder,pyro-param,vae", str(out / "straight"))
    torchrun(str(SCRIPT), "vae", str(out / "resumed"), "--epochs", "2")
    torchrun(str(SCRIPT), "vae", str(out / "resumed"), "--epochs", "3", "--resume")
    return out


@pytest.mark.parametrize("case", ["autoencoder", "pyro-param"])
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(two_rank_runs: Path, case: str) -> None:
    # Deterministic losses (no sampling): the only differences left are the order of float sums.
    rank0, rank1 = ranks(two_rank_runs / "straight" / case)
    single, history = run(case, epochs=3)
    assert rank0.keys() == rank1.keys() == single.keys()
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)
    # The history's loss is the global batch's, not rank 0's half.
    parallel_history = pd.read_csv(two_rank_runs / "straight" / case / "history.csv")
    torch.testing.assert_close(torch.tensor(parallel_history["train_loss"].to_numpy()),
                               torch.tensor(history["train_loss"].to_numpy()), rtol=1e-6, atol=0)


def test_ranks_stay_identical_under_sampling_and_resume_exactly(two_rank_runs: Path) -> None:
    rank0, rank1 = ranks(two_rank_runs / "straight" / "vae")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    # 2 epochs, stopped, resumed to 3: every rank's noise continues where it stopped.
    resumed0, resumed1 = ranks(two_rank_runs / "resumed" / "vae")
    assert all(torch.equal(resumed0[name], rank0[name]) and torch.equal(resumed1[name], rank0[name]) for name in rank0)
    # Each rank draws its own noise, so the run is not the single-process one, but trains as well.
    parallel = pd.read_csv(two_rank_runs / "straight" / "vae" / "history.csv")["train_loss"]
    single = run("vae", epochs=3)[1]["train_loss"]
    assert parallel.iloc[-1] < parallel.iloc[0] - 0.3
    assert abs(parallel.iloc[-1] - single.iloc[-1]) < 0.3


def test_leaving_the_process_group_stops_gloo_threads_before_the_interpreter_exits(two_rank_runs: Path) -> None:
    # A gloo worker thread alive at interpreter shutdown may still be releasing the tensors of a
    # finished collective; taking the GIL then ends the thread and aborts the rank ("terminate
    # called without an active exception"), now and then. Leaving the group must join them.
    reports = sorted(two_rank_runs.glob("*/threads-rank*.txt"))
    if not reports:
        pytest.skip("no /proc/self/task: thread names unknown")
    assert [p.relative_to(two_rank_runs).as_posix() for p in reports] == [
        "resumed/threads-rank0.txt", "resumed/threads-rank1.txt", "straight/threads-rank0.txt", "straight/threads-rank1.txt",
    ]
    for report in reports:
        names = report.read_text().split()
        assert not [name for name in names if "gloo" in name], f"{report}: {names}"


def test_rank_seeds_keep_rank_zero_on_the_run_seed_and_differ_elsewhere() -> None:
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(seed, rank) for seed in range(50) for rank in range(1, 9)}
    assert len(seeds) == 50 * 8 and not seeds & set(range(50))
    assert all(0 <= s < 2**32 for s in seeds)


def test_a_global_batch_is_split_into_contiguous_nearly_equal_shards() -> None:
    batch = torch.arange(11)
    shards = [ProcessGroup(rank, 3, torch.device("cpu")).shard(batch) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


@pytest.fixture
def single_process_group(tmp_path: Path):
    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield ProcessGroup(0, 1, torch.device("cpu"))
    torch_dist.destroy_process_group()


def test_a_model_with_a_global_latent_is_refused(single_process_group: ProcessGroup) -> None:
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0).expand([x.shape[1]]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    batch = (torch.zeros(4, 3),)
    with pytest.raises(InputError, match="'shift' sits outside it"):
        DataParallelLoss(single_process_group, pair_contract(model, guide, batch), get_objective("elbo"), model, guide, [], batch)


@pytest.mark.slow  # 40 s: two processes launched twice; the two-process step tests above keep the default run covered
def test_cli_nproc_writes_one_run_folder_that_loads_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--data", "digits", "--binarize", "dynamic", "--hidden", "16", "--z-dim", "2", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    started = subprocess.run([sys.executable, "-m", "elbolab", "fit", *common, "--epochs", "1", "--nproc", "2",
                              "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "elbolab", "fit", "--resume", str(out), "--epochs", "2", "--nproc", "2"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 processes on cpu" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "checkpoint.safetensors", "config.json", "history.csv", "loss_curves.png", "reconstructions.png",
        "samples.png", "weights.safetensors",
    ])
    loaded = load_run(out)
    assert list(loaded.history["epoch"]) == [1, 2]


def test_cli_nproc_refuses_bad_options_in_one_line_before_launching(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    status = main(["fit", "--data", "digits", "--binarize", "dynamic", "--lr", "-1", "--nproc", "2", "--out", str(out)])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == ["elbolab fit: error: lr must be positive, got -1.0"]
    # The data are read once before launching, too.
    status = main(["fit", "--data", "binarized-mnist", "--data-dir", str(tmp_path / "none"), "--nproc", "2", "--out", str(out)])
    assert status == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"elbolab fit: error: binarized-mnist: data directory {tmp_path / 'none'} does not exist")
    assert not out.exists()


def test_only_fit_runs_under_torchrun(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["sample", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "elbolab sample: rank 1: error: only fit trains in several processes; run elbolab sample without torchrun"
    )


def test_nproc_is_refused_under_torchrun(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["fit", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "leave it out under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_multi_node_command_line_trains_one_run(tmp_path: Path) -> None:
    """README's two-node torchrun command, with both "nodes" on this machine (c10d rendezvous on localhost)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=two-nodes", "-m", "elbolab", "fit", "--data", "digits",
               "--binarize", "dynamic", "--hidden", "16", "--z-dim", "2", "--epochs", "1", "--device", "cpu",
               "--out", str(out), "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    assert load_run(out).history["epoch"].tolist() == [1]
