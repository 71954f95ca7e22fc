"""Every model family that takes --arch conv trains, evaluates, samples and loads back; user modules plug in."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

from elbolab.cli import main
from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide, GaussianGuide
from elbolab.inference import fit, log_likelihood
from elbolab.models import VAE, LatentModel, ModelConfig
from elbolab.nn import ConvDecoder, ConvEncoder
from elbolab.nn.conv import PixelBias
from elbolab.runs import load_run

# Through the CLI, one case per family in the default run; every guide family on conv features is
# also checked without it, cheaply, below.
CASES = [
    ("vae", "gaussian"), pytest.param("vae", "mixture", marks=pytest.mark.slow), pytest.param("vae", "flow", marks=pytest.mark.slow),
    pytest.param("cvae", "gaussian", marks=pytest.mark.slow), pytest.param("hvae", "bottom-up", marks=pytest.mark.slow),
    pytest.param("hvae", "ladder", marks=pytest.mark.slow), ("vqvae", "nearest-code"),
]


@pytest.mark.parametrize(("model", "guide"), CASES)
def test_conv_family_trains_evaluates_samples_and_loads_back(tmp_path: Path, model: str, guide: str, capsys) -> None:
    out = tmp_path / "run"
    extra = ["--z-dim", "4"] if model == "vqvae" else []
    status = main(["fit", "--model", model, "--guide", guide, "--arch", "conv", "--channels", "4,8", "--residual-blocks", "1",
                   "--epochs", "1", "--batch-size", "256", "--out", str(out), "--quiet", *extra])
    assert status == 0, capsys.readouterr().err
    assert main(["evaluate", str(out), "--num-samples", "4", "--quiet"]) == 0
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    run = load_run(out)
    assert run.config.model.arch == "conv"
    assert any(isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) for module in run.model.modules())
    # The weights read back are the trained ones (not a fresh initialisation), and read back the same each time.
    again = load_run(out)
    pyro.set_rng_seed(0)
    fresh = run.config.new_model()
    trained, reread, initial = run.model.state_dict(), again.model.state_dict(), fresh.state_dict()
    assert all(torch.equal(trained[name], reread[name]) for name in trained)
    assert any(not torch.equal(trained[name], initial[name]) for name in trained if "conv" in type(run.model).__name__.lower()
               or trained[name].is_floating_point())
    test = load_dataset("digits", "test", binarize="dynamic").fixed_binarization(0)
    conditions = tuple(c[:8] for c in run.config.conditions(test))
    with torch.no_grad(), pyro.validation_enabled(False):
        pyro.set_rng_seed(1)
        first = run.config.family.reconstruct(run.model, run.guide, test.x[:8], conditions)
        pyro.set_rng_seed(1)
        second = again.config.family.reconstruct(again.model, again.guide, test.x[:8], conditions)
    assert first.shape == (8, 64) and torch.equal(first, second)


@pytest.mark.parametrize("family", ["gaussian", "mixture", "flow"])
def test_every_guide_family_trains_on_conv_features(family: str) -> None:
    from elbolab.guides import GuideConfig, build_guide
    from elbolab.inference import get_objective

    torch.manual_seed(0)
    architecture = ModelConfig(arch="conv", channels=(4, 8)).architecture((8, 8))
    model = VAE(64, 3, architecture=architecture)
    guide = build_guide(GuideConfig(family=family), 64, 3, (400,), trunk=architecture.encoder(64))
    assert isinstance(guide.trunk if hasattr(guide, "trunk") else guide.encoder.trunk, ConvEncoder)
    x = load_dataset("digits", binarize="threshold").x[:32]
    loss = get_objective("elbo").differentiable_loss(model, guide, x)
    loss.backward()
    conv = next(m for m in guide.modules() if isinstance(m, nn.Conv2d))
    assert torch.isfinite(loss) and conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_vqvae_codes_are_the_conv_grid() -> None:
    from elbolab.models import VQVAE

    architecture = ModelConfig(arch="conv", channels=(4, 8)).architecture((28, 28))
    model = VQVAE(784, codebook_size=16, code_dim=3, architecture=architecture)
    assert model.num_codes == 49  # 28 -> 14 -> 7: one code per cell of the 7 x 7 grid
    with pytest.raises(InputError, match="one code per cell of its 49-cell grid"):
        VQVAE(784, codebook_size=16, code_dim=3, num_codes=10, architecture=architecture)


def test_conv_is_refused_for_data_without_an_image_shape(capsys) -> None:
    status = main(["fit", "--data", "synthetic-linear-gaussian", "--likelihood", "gaussian", "--arch", "conv", "--epochs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "the conv architecture is for images" in err


def test_conv_options_need_the_conv_architecture() -> None:
    with pytest.raises(InputError, match="channels is an option of arch conv"):
        ModelConfig(channels=(8, 16))
    with pytest.raises(InputError, match="kernel must be an odd positive integer"):
        ModelConfig(arch="conv", kernel=4)
    with pytest.raises(InputError, match="arch is not an option of the gmvae model"):
        from elbolab.families import checked_model_config

        checked_model_config(ModelConfig(name="gmvae", arch="conv"))


def test_a_users_encoder_and_decoder_plug_into_the_guides_and_models() -> None:
    torch.manual_seed(0)
    x = load_dataset("digits", binarize="threshold").x[:300]
    # A user's own encoder trunk and decoder, conv ones: the VAE and the Gaussian guide take them as they are.
    decoder = ConvDecoder(4, (8, 8), channels=(8, 4))
    model = VAE(64, 4, decoder=decoder).init_output_bias(x)
    assert torch.allclose(decoder.output_layer.bias, torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)))
    guide = GaussianGuide(64, 4, trunk=ConvEncoder((8, 8), channels=(4, 8)))
    fit(model, guide, x, epochs=1, batch_size=100, progress=False)
    assert torch.isfinite(log_likelihood(model, guide, x[:5], num_samples=8)).all()
    # LatentModel takes the decoder, AutoAmortizedGuide the encoder.
    from elbolab.models import Latent

    latent_model = LatentModel(64, [Latent("z", 4)], decoder=ConvDecoder(4, (8, 8), channels=(8,)))
    auto = AutoAmortizedGuide(latent_model, x[:10], encoder=ConvEncoder((8, 8), channels=(4,)))
    assert isinstance(auto.local_q.encoder.trunk, ConvEncoder)
    fit(latent_model, auto, x, epochs=1, batch_size=100, progress=False)
    assert torch.isfinite(log_likelihood(latent_model, auto, x[:5], num_samples=8)).all()


def test_a_trunk_of_unknown_width_is_measured() -> None:
    trunk = nn.Sequential(nn.Linear(64, 13), nn.Tanh())
    guide = GaussianGuide(64, 3, trunk=trunk)
    assert guide.encoder.head.in_features == 13
    with pytest.raises(InputError, match=r"must map \[N, 64\] inputs to \[N, F\] features"):
        GaussianGuide(64, 3, trunk=nn.Unflatten(1, (8, 8)))
    assert isinstance(PixelBias(4), nn.Module)
