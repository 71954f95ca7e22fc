"""README's troubleshooting table is true: every bad input in it gets the message it shows.

Each row's example is run through the command line with its placeholders (RUN, NAN_DIR, ...)
replaced by files prepared here; the run must end with exit status 2, the row's message on one
line of stderr, and nothing new on disk.
"""

import contextlib
import io
import json
import pickle
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from elbolab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def table_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    table = text.split("<!-- bad-inputs table")[1].split("\n\n")[0]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows.append((cells[0], re.findall(r"`([^`]*)`", cells[1])[0], re.findall(r"`([^`]*)`", cells[2])[0]))
    return rows


def run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
    return status, stderr.getvalue()


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("troubleshooting")
    run = root / "run"
    status, stderr = run_cli(["fit", "--binarize", "dynamic", "--hidden", "8", "--z-dim", "2", "--epochs", "2",
                              "--quiet", "--out", str(run)])
    assert status == 0, stderr

    def copy(name: str, edit) -> Path:
        target = root / name
        shutil.copytree(run, target)
        edit(target)
        return target

    def edit_config(change):
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            change(config)
            (folder / "config.json").write_text(json.dumps(config))
        return edit

    def flip_last_byte(folder: Path) -> None:
        raw = bytearray((folder / "weights.safetensors").read_bytes())
        raw[-1] ^= 0xFF
        (folder / "weights.safetensors").write_bytes(bytes(raw))

    class Payload:
        def __reduce__(self):
            return (open, (str(root / "executed"), "w"))

    def unfinished(folder: Path) -> None:
        status, stderr = run_cli(["fit", "--binarize", "dynamic", "--hidden", "8", "--z-dim", "2", "--epochs", "1",
                                  "--quiet", "--out", str(root / "one-epoch")])
        assert status == 0, stderr
        for path in folder.iterdir():
            path.unlink()
        # A run of 2 epochs stopped after the first: its checkpoint, nothing else.
        from elbolab.files import load_tensors, save_tensors
        tensors, header = load_tensors(root / "one-epoch" / "checkpoint.safetensors")
        training = json.loads(header["training"])
        training["metadata"]["fit"]["epochs"] = 2
        save_tensors(folder / "checkpoint.safetensors", tensors, header | {"training": json.dumps(training)})

    nan_dir = root / "nan"
    nan_dir.mkdir()
    faces = np.random.default_rng(0).uniform(0, 255, size=(560, 700))
    faces[3, 5] = np.nan
    scipy.io.savemat(nan_dir / "frey_rawface.mat", {"ff": faces})
    (root / "empty").mkdir()
    tomls = {"BAD_TOML": "[model\nz_dim = 3", "EMPTY_TOML": "", "UNKNOWN_KEY_TOML": "[model]\nzdim = 3\n",
             "WRONG_TYPE_TOML": "[data]\nname = 3\n"}
    for name, text in tomls.items():
        (root / f"{name}.toml").write_text(text)
    return {
        "RUN": run,
        "NAN_DIR": nan_dir,
        "EMPTY_DIR": root / "empty",
        "OTHER_DATA_RUN": copy("other-data", edit_config(lambda c: c["data"].update(name="synthetic-linear-gaussian",
                                                                                  binarize=None))),
        "OTHER_CONFIG_RUN": copy("other-config", edit_config(lambda c: c["model"].update(z_dim=3))),
        "TRUNCATED_RUN": copy("truncated", lambda f: (f / "weights.safetensors").write_bytes(
            (f / "weights.safetensors").read_bytes()[:300])),
        "CORRUPTED_RUN": copy("corrupted", flip_last_byte),
        "PICKLE_RUN": copy("pickle", lambda f: (f / "weights.safetensors").write_bytes(pickle.dumps(Payload()))),
        "NEWER_RUN": copy("newer", edit_config(lambda c: c.update(format_version=2))),
        "NO_RUN": root / "no-such-run",
        "UNFINISHED_RUN": copy("unfinished", unfinished),
        **{name: root / f"{name}.toml" for name in tomls},
    }


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("what, example, message", table_rows(), ids=[row[0] for row in table_rows()])
def test_each_bad_input_gets_the_message_in_the_readme(placeholders, what, example, message, tmp_path, monkeypatch):
    if "--device cuda" in example and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)  # a default output folder would appear here
    argv = [str(placeholders.get(word, word)) for word in shlex.split(example)]
    root = placeholders["RUN"].parent
    before = snapshot(root)
    status, stderr = run_cli(argv)
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr, stderr
    assert snapshot(root) == before and not any(tmp_path.iterdir())
    assert not (root / "executed").exists()


def test_the_table_lists_what_the_issue_asks_for():
    inputs = " ".join(row[0] for row in table_rows())
    for needed in ("unknown data set", "unknown model", "unknown guide", "unknown objective", "negative epochs",
                   "zero particles", "Rényi", "latent width", "NaN", "Bernoulli", "width than the run",
                   "holds a run", "unreadable TOML", "empty TOML", "unknown config key", "truncated", "newer"):
        assert needed in inputs, needed
