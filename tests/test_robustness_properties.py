"""Property-based tests: whatever a user types or feeds in, elbolab succeeds or refuses cleanly.

A clean refusal is exit status 2, one line on stderr naming the input, no traceback, and no
output folder left behind. Hypothesis draws option values (in range and out of it, misspelt
names, NaN, infinities), TOML configs, and data and run files that are random or corrupted
versions of valid ones.
"""

import contextlib
import gzip
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from elbolab.cli import main
from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.runs import load_run

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

NUMBERS = st.sampled_from(["-1", "0", "1", "2", "0.5", "1e-3", "nan", "inf", "-inf", "1e9", "x", "", "3,4", "-0"])
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_:=0123456789", min_size=0, max_size=12)
# Each flag draws from values a user might type: valid, out of range, malformed or misspelt.
FLAG_VALUES = {
    "--data": st.sampled_from(["digits", "digit", "synthetic-linear-gaussian", "binarized-mnist", "frey-faces"]) | NAMES,
    "--binarize": st.sampled_from(["dynamic", "threshold", "none", "yes"]),
    "--model": st.sampled_from(["vae", "cvae", "hvae", "vqvae", "autoencoder", "vea"]),
    "--guide": st.sampled_from(["gaussian", "mixture", "flow", "ladder", "bottom-up", "nearest-code", "gauss"]),
    "--likelihood": st.sampled_from(["bernoulli", "gaussian", "continuous-bernoulli", "poisson"]),
    "--objective": st.sampled_from(["elbo", "elbo-analytic", "iwae", "iwae-dreg", "renyi", "elbo-stl", "iwea",
                                    "reconstruction", "iwae:k=2", "renyi:alpha=1", "renyi:alpha=0.5:k=2"]) | NAMES,
    "--epochs": st.sampled_from(["-1", "0", "1", "2", "1.5", "x"]),
    "--batch-size": NUMBERS,
    "--z-dim": st.sampled_from(["0", "1", "2", "-3", "x"]),
    "--z-dims": st.sampled_from(["2,1", "3", "0,2", "a,b", ""]),
    "--hidden": st.sampled_from(["8", "16", "8,8", "0", "-4", "8,", "x"]),
    "--particles": NUMBERS,
    "--beta": NUMBERS,
    "--warmup": NUMBERS,
    "--lr": NUMBERS,
    "--clip-grad-norm": NUMBERS,
    "--max-bad-steps": NUMBERS,
    "--max-restorations": NUMBERS,
    "--checkpoint-every": NUMBERS,
    "--components": NUMBERS,
    "--flow-depth": NUMBERS,
    "--codebook-size": NUMBERS,
    "--num-codes": NUMBERS,
    "--commitment": NUMBERS,
    "--obs-scale": st.sampled_from(["learned", "0.1", "0", "-1", "nan"]),
    "--seed": st.sampled_from(["0", "-5", "x", "99999999999"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:7", "tpu", "gpu"]),
}


def run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's own refusals
            status = exit.code
    return status, stderr.getvalue()


def assert_clean_outcome(status: int, stderr: str, out: Path) -> None:
    event(f"exit status {status}")
    assert status in (0, 2), (status, stderr)
    if status == 0:
        assert (out / "weights.safetensors").exists()
        return
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and ": error: " in stderr, stderr
    if "training diverged" in stderr:  # the last good checkpoint is kept on purpose
        assert (out / "checkpoint.safetensors").exists() and not (out / "weights.safetensors").exists()
    else:
        assert not out.exists(), f"{stderr}: left {sorted(p.name for p in out.iterdir())}"


@PROPERTY
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), min_size=1, max_size=6).flatmap(
    lambda flags: st.fixed_dictionaries({flag: FLAG_VALUES[flag] for flag in flags})))
def test_fit_with_random_options_succeeds_or_refuses_cleanly(flags):
    flags.setdefault("--epochs", "1")
    flags.setdefault("--hidden", "8")
    argv = ["fit", "--quiet"] + [part for flag, value in flags.items() for part in (flag, value)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        status, stderr = run_cli([*argv, "--out", str(out)])
        assert_clean_outcome(status, stderr, out)


# Values in range: most combinations train, a few are refused (a guide the model does not take).
VALID_VALUES = {
    "--model": st.sampled_from(["vae", "cvae", "hvae", "vqvae"]),
    "--guide": st.sampled_from(["gaussian", "mixture", "flow", "ladder"]),
    "--objective": st.sampled_from(["elbo", "elbo-analytic", "iwae:k=2", "iwae-dreg:k=2", "renyi:alpha=0.5:k=2"]),
    "--z-dim": st.sampled_from(["1", "2", "3"]),
    "--batch-size": st.sampled_from(["1000", "64", "5000"]),
    "--lr": st.sampled_from(["1e-3", "0.5", "1e-6"]),
    "--beta": st.sampled_from(["0", "1", "4"]),
    "--clip-grad-norm": st.sampled_from(["1e-3", "10"]),
    "--max-bad-steps": st.sampled_from(["1", "10"]),
    "--checkpoint-every": st.sampled_from(["1", "3"]),
    "--seed": st.sampled_from(["0", "-5", "123456789"]),
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(VALID_VALUES)), st.none(), min_size=1, max_size=4).flatmap(
    lambda flags: st.fixed_dictionaries({flag: VALID_VALUES[flag] for flag in flags})))
def test_fit_with_options_in_range_trains_or_refuses_cleanly(flags):
    argv = ["fit", "--quiet", "--binarize", "dynamic", "--epochs", "1", "--hidden", "8"]
    argv += [part for flag, value in flags.items() for part in (flag, value)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        status, stderr = run_cli([*argv, "--out", str(out)])
        assert_clean_outcome(status, stderr, out)


TOML_KEYS = {
    "data": ["name", "binarize", "data_dir", "train_split", "nmae"],
    "model": ["name", "z_dim", "hidden", "likelihood", "activation", "zdim"],
    "guide": ["family", "components", "flow"],
    "fit": ["objective", "epochs", "lr", "batch_size", "seed", "clip_grad_norm", "epoch"],
    "extra": ["anything"],
}
TOML_VALUES = st.sampled_from(['"digits"', '"dynamic"', '"vae"', '"elbo"', "1", "0", "-1", "2.5", "nan", "inf",
                               "[8]", "[0]", "true", '"x"', "[]", '"gaussian"'])


@PROPERTY
@given(st.dictionaries(st.sampled_from(sorted(TOML_KEYS)), st.just(None), max_size=3).flatmap(
    lambda sections: st.fixed_dictionaries({
        section: st.dictionaries(st.sampled_from(TOML_KEYS[section]), TOML_VALUES, max_size=3) for section in sections
    })), st.sampled_from(["", "garbage [[", "\x00\xff", "[fit\nepochs=1"]))
def test_random_toml_configs_succeed_or_refuse_cleanly(sections, prefix):
    text = prefix + "\n" + "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items()) for section, keys in sections.items()
    )
    with tempfile.TemporaryDirectory() as tmp:
        config, out = Path(tmp) / "run.toml", Path(tmp) / "run"
        config.write_text(text)
        status, stderr = run_cli(["fit", "--config", str(config), "--epochs", "1", "--hidden", "8", "--quiet",
                                  "--out", str(out)])
        assert_clean_outcome(status, stderr, out)


def corrupt(raw: bytes, data: st.DataObject) -> bytes:
    """A truncation, a flipped byte, an insertion, or random bytes in place of ``raw``."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "random", "empty"]))
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "flip" and raw:
        position = data.draw(st.integers(0, len(raw) - 1))
        return raw[:position] + bytes([raw[position] ^ data.draw(st.integers(1, 255))]) + raw[position + 1 :]
    if kind == "insert":
        position = data.draw(st.integers(0, len(raw)))
        return raw[:position] + data.draw(st.binary(min_size=1, max_size=8)) + raw[position:]
    if kind == "random":
        return data.draw(st.binary(max_size=2000))
    return b""


def amat(rows: int = 3) -> bytes:
    images = np.random.default_rng(0).integers(0, 2, size=(rows, 784))
    return "".join(" ".join(map(str, row)) + "\n" for row in images).encode()


def idx(magic: int, shape: tuple[int, ...], values: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in shape)
    return header + values.astype(np.uint8).tobytes()


def frey_mat(columns: int = 700) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"ff": np.random.default_rng(0).integers(0, 256, size=(560, columns)).astype(np.uint8)})
    return buffer.getvalue()


def data_files() -> dict[str, dict[str, bytes]]:
    """Valid small files of each file-based data set, as its loader expects them."""
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 256, size=(n, 28, 28)) for n in (20, 10)}
    labels = {n: rng.integers(0, 10, size=n) for n in (20, 10)}
    mnist = {
        "train-images-idx3-ubyte": idx(2051, (20, 28, 28), images[20]),
        "train-labels-idx1-ubyte": idx(2049, (20,), labels[20]),
        "t10k-images-idx3-ubyte": idx(2051, (10, 28, 28), images[10]),
        "t10k-labels-idx1-ubyte": idx(2049, (10,), labels[10]),
    }
    return {
        "binarized-mnist": {f"binarized_mnist_{split}.amat": amat() for split in ("train", "valid", "test")},
        "mnist": mnist,
        "frey-faces": {"frey_rawface.mat": frey_mat()},
    }


@PROPERTY
@given(st.sampled_from(["binarized-mnist", "mnist", "frey-faces"]), st.booleans(), st.data())
def test_corrupted_data_files_load_or_are_refused_by_name(name, gzipped, data):
    files = data_files()[name]
    target = data.draw(st.sampled_from(sorted(files)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for filename, raw in files.items():
            if filename == target:
                raw = corrupt(raw, data)
            if gzipped and name != "frey-faces":
                (folder / f"{filename}.gz").write_bytes(gzip.compress(raw) if data.draw(st.booleans()) else raw)
            else:
                (folder / filename).write_bytes(raw)
        for split in ("train", "test"):
            try:
                dataset = load_dataset(name, split, data_dir=folder)
            except InputError as error:
                assert str(error) and "\n" not in str(error)
                continue
            assert np.isfinite(dataset.x.numpy()).all() and dataset.x.min() >= 0 and dataset.x.max() <= 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    status, stderr = run_cli(["fit", "--binarize", "dynamic", "--hidden", "8", "--z-dim", "2", "--epochs", "2",
                              "--quiet", "--out", str(out)])
    assert status == 0, stderr
    return out


def run_files(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in run.iterdir() if path.suffix != ".png"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(st.data())
def test_corrupted_run_folders_load_or_are_refused_by_name(finished_run, data):
    files = run_files(finished_run)
    target = data.draw(st.sampled_from(sorted(files)))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for filename, raw in files.items():
            if filename == target:
                if filename == "config.json" and data.draw(st.booleans()):
                    raw = edit_config(json.loads(raw), data)
                else:
                    raw = corrupt(raw, data)
            (run / filename).write_bytes(raw)
        try:
            load_run(run)
        except InputError as error:
            assert "\n" not in str(error) and str(run) in str(error), error
        status, stderr = run_cli(["evaluate", str(run), "--num-samples", "5", "--quiet"])
        assert status in (0, 2) and "Traceback" not in stderr
        if status == 2:
            assert len(stderr.strip().splitlines()) == 1, stderr


def edit_config(config: dict, data: st.DataObject) -> bytes:
    """A config.json with one value replaced: a plausible edit by hand."""
    section = data.draw(st.sampled_from(["data", "model", "guide", "fit", "x_dim", "format_version", "y_dim"]))
    value = data.draw(st.sampled_from([None, -1, 0, 3, 2.5, "x", [], {}, True, "vae", 1e308]))
    if isinstance(config.get(section), dict) and config[section]:
        key = data.draw(st.sampled_from([*sorted(config[section]), "unknown"]))
        config[section][key] = value
    else:
        config[section] = value
    return json.dumps(config).encode()
