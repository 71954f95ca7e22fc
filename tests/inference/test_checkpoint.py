"""Run folders: a loaded run gives the same log-likelihood; bad files are refused by name."""

import json

import pyro
import pytest
import torch

from elbolab.data import DataConfig, load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import FitConfig, fit, log_likelihood
from elbolab.models import VAE, ModelConfig
from elbolab.runs import RunConfig, load_run, save_run


@pytest.fixture
def saved_run(tmp_path):
    data = load_dataset("digits", "train", binarize="dynamic")
    config = RunConfig(DataConfig("digits", binarize="dynamic"), ModelConfig("vae", 4, (32,)), FitConfig(epochs=2),
                       x_dim=64, image_shape=(8, 8))
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))
    result = fit(model, guide, data, epochs=2, progress=False)
    save_run(tmp_path / "run", config, model, guide, result.history)
    return tmp_path / "run", model, guide, config


def test_loaded_run_gives_the_same_log_likelihood(saved_run):
    path, model, guide, config = saved_run
    x = load_dataset("digits", "test", binarize="dynamic").fixed_binarization(0).x[:50]
    torch.manual_seed(5)
    before = log_likelihood(model, guide, x, num_samples=100)
    run = load_run(path)
    torch.manual_seed(5)
    after = log_likelihood(run.model, run.guide, x, num_samples=100)
    assert torch.equal(before, after)
    assert run.config.to_dict() == config.to_dict()
    assert len(run.history) == 2
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "history.csv", "weights.safetensors"]


def test_truncated_weights_are_refused(saved_run):
    path = saved_run[0]
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="weights.safetensors"):
        load_run(path)


def test_a_pickle_in_place_of_the_weights_is_refused(saved_run, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    path = saved_run[0]
    (path / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="weights.safetensors"):
        load_run(path)
    assert not (tmp_path / "executed").exists()


def test_weights_of_another_configuration_are_refused(saved_run):
    path = saved_run[0]
    config = json.loads((path / "config.json").read_text())
    config["model"]["z_dim"] = 5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="do not fit the configured model"):
        load_run(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model"].update(colour="red"), "\\[model\\]: unknown key 'colour'"),
        (lambda c: c.update(format_version=99), "format version 99"),
        (lambda c: c["fit"].update(epochs=-1), "epochs"),
    ],
)
def test_bad_config_is_refused(saved_run, edit, message):
    path = saved_run[0]
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message):
        load_run(path)


def test_missing_run_folder(tmp_path):
    with pytest.raises(InputError, match="no such run folder"):
        load_run(tmp_path / "nothing")
