"""The reproduction configs in configs/ are valid runs, and each names the figure it reproduces and its source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from elbolab.cli_arguments import build_parser, run_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_is_a_config_per_published_row() -> None:
    names = {path.stem for path in CONFIGS}
    for layers in ("one-layer", "two-layers"):
        assert {f"iwae-paper-{layers}-{row}" for row in ("vae", "iwae-k5", "iwae-k50")} <= names
    assert {"vampprior-one-layer", "conv-vae-iaf"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_is_a_valid_run_that_cites_its_figure(path: Path) -> None:
    config = run_config(build_parser().parse_args(["fit", "--config", str(path)]))
    assert config.data.name == "binarized-mnist"
    text = path.read_text()
    assert re.search(r"test log p\(x\) = -\d+\.\d\d nats", text), "the published figure"
    assert re.search(r"[A-Z][a-z]+ (\&|et al\.|\().*(19|20)\d\d", text), "its source: authors and year"
    assert "Protocol:" in text
