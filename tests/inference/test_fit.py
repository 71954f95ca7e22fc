"""The training loop: reproducibility, isolation, warm-up, options, and refusals."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import ELBO, FitConfig, fit, kl_warmup
from elbolab.inference.training_checkpoint import read_checkpoint
from elbolab.models import VAE, Autoencoder


def small_vae(seed=0):
    pyro.set_rng_seed(seed)
    return VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))


def test_training_improves_the_validation_elbo(digits):
    model, guide = small_vae()
    valid = load_dataset("digits", "valid", binarize="dynamic")
    history = fit(model, guide, digits, epochs=15, valid=valid, progress=False).history
    assert list(history.columns) == ["epoch", "train_loss", "beta", "valid_elbo", "seconds", "skipped_steps", "restorations", "lr"]
    assert len(history) == 15
    assert history["valid_elbo"].iloc[-1] > history["valid_elbo"].iloc[0] + 5
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_same_seed_same_result_and_different_seed_differs(digits):
    runs = []
    for seed in (0, 0, 1):
        model, guide = small_vae(seed)
        runs.append((fit(model, guide, digits, epochs=2, seed=seed, progress=False), model))
    (first, m0), (second, m1), (_, m2) = runs
    assert first.history["train_loss"].tolist() == second.history["train_loss"].tolist()
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values(), strict=True))
    assert not torch.equal(m0.decoder[0].weight, m2.decoder[0].weight)


def test_two_fits_share_no_state(digits):
    first_model, _ = small_vae()
    before = {k: v.clone() for k, v in first_model.state_dict().items()}
    second_model, second_guide = small_vae()
    fit(second_model, second_guide, digits, epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in first_model.state_dict().items())
    assert len(pyro.get_param_store()) == 0


def test_kl_warmup_schedule():
    assert [kl_warmup(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_warmup(10, 0, beta=2.0) == 2.0
    assert kl_warmup(1, 2, beta=4.0) == 2.0


def test_fit_applies_beta_and_warmup(digits):
    model, guide = small_vae()
    history = fit(model, guide, digits, epochs=4, warmup=2, beta=0.5, progress=False).history
    steps_per_epoch = math.ceil(digits.num_points / 128)
    # beta is recorded as it stood at the last step of each epoch.
    expected = [kl_warmup(e * steps_per_epoch - 1, 2 * steps_per_epoch, 0.5) for e in (1, 2, 3, 4)]
    assert history["beta"].tolist() == pytest.approx(expected)


def test_autoencoder_trains_on_reconstruction_and_refuses_beta(digits):
    pyro.set_rng_seed(0)
    model = Autoencoder(64, 4, hidden=(32,))
    history = fit(model, None, digits, objective="reconstruction", epochs=5, progress=False).history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    with pytest.raises(InputError, match="beta"):
        fit(model, None, digits, objective="reconstruction", epochs=1, beta=2.0, progress=False)


def test_plain_pyro_functions_with_pyro_param_train():
    """fit finds parameters declared with pyro.param in a user's plain functions."""
    x = torch.randn(200, 1) + 3.0

    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(loc + z, 1.0), obs=x[:, 0])

    def guide(x):
        weight = pyro.param("weight", torch.zeros(()))
        scale = pyro.param("scale", torch.ones(()), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(weight * (x[:, 0] - 3.0), scale))

    fit(model, guide, x, epochs=150, batch_size=200, lr=0.05, progress=False)
    assert pyro.param("loc").item() == pytest.approx(3.0, abs=0.25)
    # Exact posterior of z given x: N((x - loc) / 2, 1/2).
    assert pyro.param("weight").item() == pytest.approx(0.5, abs=0.15)
    assert pyro.param("scale").item() == pytest.approx(0.5**0.5, abs=0.15)


def test_bad_inputs_are_refused(digits):
    model, guide = small_vae()
    nan_data = digits.x.clone()
    nan_data[3, 5] = math.nan
    with pytest.raises(InputError, match="NaN"):
        fit(model, guide, nan_data, epochs=1, progress=False)
    with pytest.raises(InputError, match=r"the data has values outside the support of site 'x', binary values \{0, 1\}, in \d+ rows"):
        fit(model, guide, load_dataset("digits").x, epochs=1, progress=False)  # grayscale under Bernoulli
    with pytest.raises(InputError, match="epochs"):
        fit(model, guide, digits, epochs=0, progress=False)
    with pytest.raises(InputError, match="unknown objective"):
        fit(model, guide, digits, objective="iwea", epochs=1, progress=False)
    with pytest.raises(InputError, match="features"):
        fit(model, guide, digits, valid=torch.zeros(5, 10), epochs=1, progress=False)
    with pytest.raises(InputError, match="device"):
        fit(model, guide, digits, epochs=1, device="tpu", progress=False)


def test_a_config_and_keywords_of_the_same_names_train_alike(digits):
    config = FitConfig(epochs=2, batch_size=200, lr=3e-3, warmup=1, seed=4)
    weights = []
    for call in (lambda m, g: fit(m, g, digits, config, progress=False),
                 lambda m, g: fit(m, g, digits, epochs=2, batch_size=200, lr=3e-3, warmup=1, seed=4, progress=False),
                 lambda m, g: fit(m, g, digits, FitConfig(epochs=2, lr=1.0), batch_size=200, lr=3e-3, warmup=1, seed=4,
                                  progress=False)):
        model, guide = small_vae()
        assert len(call(model, guide).history) == 2
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0].values(), other.values(), strict=True))
    assert config.lr == 3e-3  # the caller's config is left as it was


def test_the_old_keyword_names_are_refused_by_their_new_ones(digits):
    model, guide = small_vae()
    with pytest.raises(InputError, match="particles=, not num_particles="):
        fit(model, guide, digits, epochs=1, num_particles=2, progress=False)
    with pytest.raises(InputError, match="warmup=, not warmup_epochs="):
        fit(model, guide, digits, epochs=1, warmup_epochs=2, progress=False)


@pytest.mark.parametrize(
    "config, keywords, name, expected",
    [
        (None, {"objective": "iwae"}, "iwae", {}),  # the objective's own particles (IWAE's 5), as before
        (None, {"objective": "iwae", "particles": 3}, "iwae", {"num_particles": 3}),
        (FitConfig(objective="iwae"), {}, "iwae", {"num_particles": 1}),  # a config states particles, as the CLI's
        (FitConfig(objective="iwae:k=4", particles=2), {}, "iwae", {"num_particles": 4}),  # the spec's k wins
        (None, {"objective": "renyi:alpha=0.3", "particles": 2}, "renyi", {"alpha": 0.3, "num_particles": 2}),
        (None, {"objective": "renyi", "alpha": 0.3}, "renyi", {"alpha": 0.3}),
        (FitConfig(objective="elbo", warmup=1), {}, "elbo", {"num_particles": 1}),
    ],
)
def test_the_objective_spec_and_particles_give_the_options_a_checkpoint_records(digits, tmp_path, config, keywords,
                                                                                  name, expected):
    model, guide = small_vae()
    checkpoint = tmp_path / "checkpoint.safetensors"
    result = fit(model, guide, digits, config, epochs=1, progress=False, checkpoint=checkpoint, **keywords)
    options = read_checkpoint(checkpoint)[1]["options"]
    assert (options["objective"], options["objective_options"]) == (name, expected)
    assert result.objective.num_particles == expected.get("num_particles", 1 if name == "elbo" else 5)
    # The keys fit has always written: checkpoints of older runs resume.
    assert list(options) == ["objective", "objective_options", "batch_size", "lr", "beta", "warmup_epochs", "seed",
                             "clip_grad_norm", "max_bad_steps", "max_restorations", "data_shape", "dynamic_binarization"]
    assert options["warmup_epochs"] == (config.warmup if config is not None else 0)


def test_an_objective_instance_takes_no_objective_options(digits):
    model, guide = small_vae()
    result = fit(model, guide, digits, epochs=1, objective=ELBO(num_particles=2), progress=False)
    assert result.objective.num_particles == 2
    for options in ({"alpha": 0.5}, {"particles": 2}):
        with pytest.raises(InputError, match="objective given by name, not an instance"):
            fit(model, guide, digits, epochs=1, objective=ELBO(), progress=False, **options)
    with pytest.raises(InputError, match="alpha is given both in the spec"):
        fit(model, guide, digits, epochs=1, objective="renyi:alpha=0.5", alpha=0.3, progress=False)
