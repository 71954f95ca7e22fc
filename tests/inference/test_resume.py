"""Training checkpoints and divergence handling: exact resume, skipped steps, restorations, refusals."""

import math
import pickle
import signal

import pyro
import pytest
import torch
from safetensors.torch import save_file

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.families import build_model_guide
from elbolab.files import FORMAT_VERSION, load_tensors
from elbolab.guides import GaussianGuide, GuideConfig
from elbolab.inference import TrainingInterrupted, fit
from elbolab.inference.step import RunningSums, step_function
from elbolab.inference.training_checkpoint import read_checkpoint
from elbolab.models import VAE, VQVAE


@pytest.fixture(scope="module")
def valid():
    return load_dataset("digits", "valid", binarize="dynamic")


def vae(seed=0):
    pyro.set_rng_seed(seed)
    return VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))


def vqvae(seed=0):
    pyro.set_rng_seed(seed)
    model = VQVAE(64, codebook_size=16, code_dim=4, num_codes=2, hidden=(32,))
    return model, build_model_guide(GuideConfig(), model)


def weights(model, guide):
    return {f"model.{k}": v.clone() for k, v in model.state_dict().items()} | {
        f"guide.{k}": v.clone() for k, v in guide.state_dict().items()
    }


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "build, options",
    [
        (vae, {"objective": "elbo", "warmup": 3}),
        (vae, {"objective": "iwae-dreg", "particles": 3, "clip_grad_norm": 5.0}),
        (vqvae, {"objective": "elbo"}),
    ],
    ids=["vae-warmup", "vae-dreg-clipped", "vqvae"],
)
def test_resumed_training_is_bitwise_the_uninterrupted_one(digits, valid, tmp_path, build, options):
    model, guide = build()
    whole = fit(model, guide, digits, epochs=6, batch_size=200, valid=valid, progress=False, **options)
    expected = weights(model, guide)

    checkpoint = tmp_path / "checkpoint.safetensors"
    model, guide = build()
    fit(model, guide, digits, epochs=4, batch_size=200, valid=valid, progress=False, checkpoint=checkpoint,
        checkpoint_every=2, **options)
    assert read_checkpoint(checkpoint)[1]["progress"]["epoch"] == 4
    model, guide = build()  # a new process builds fresh modules under the same seed
    resumed = fit(model, guide, digits, epochs=6, batch_size=200, valid=valid, progress=False,
                  checkpoint=checkpoint, resume=True, **options)
    assert_bitwise_equal(weights(model, guide), expected)
    columns = ["epoch", "train_loss", "valid_elbo", "beta"]
    assert resumed.history[columns].equals(whole.history[columns])


class SignalAtCall(VAE):
    """A VAE that sends its own process a signal on its n-th call, as Ctrl-C would mid-epoch."""

    def __init__(self, *args, signal_at=None, signum=signal.SIGINT, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.signal_at, self.signum = 0, signal_at, signum

    def forward(self, x, *args):
        self.calls += torch.is_grad_enabled()  # the pair's check runs without gradients: not a step
        if self.calls == self.signal_at:
            signal.raise_signal(self.signum)
        return super().forward(x, *args)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_checkpoints_and_resumes_exactly(digits, tmp_path, signum):
    def build(signal_at=None):
        pyro.set_rng_seed(0)
        return SignalAtCall(64, 4, hidden=(32,), signal_at=signal_at, signum=signum), GaussianGuide(64, 4, hidden=(32,))

    model, guide = build()
    fit(model, guide, digits, epochs=3, batch_size=100, progress=False)
    expected = weights(model, guide)

    checkpoint = tmp_path / "checkpoint.safetensors"
    # Call 1 collects the parameters, then 13 batches per epoch: call 20 is epoch 2's sixth batch,
    # which finishes; training stops before the seventh.
    model, guide = build(signal_at=20)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(model, guide, digits, epochs=3, batch_size=100, progress=False, checkpoint=checkpoint)
    assert (stopped.value.epoch, stopped.value.batch, stopped.value.signum) == (2, 6, signum)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers are put back
    training = read_checkpoint(checkpoint)[1]
    assert training["progress"]["epoch"] == 1 and training["progress"]["batch"] == 6
    model, guide = build()
    fit(model, guide, digits, epochs=3, batch_size=100, progress=False, checkpoint=checkpoint, resume=True)
    assert_bitwise_equal(weights(model, guide), expected)


class NonFinite(VAE):
    """A VAE rigged to give a NaN loss, or a NaN gradient with a finite loss, at chosen calls."""

    def __init__(self, *args, nan_loss=(), nan_grad=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.nan_loss, self.nan_grad = 0, set(nan_loss), set(nan_grad)
        first = next(self.parameters())
        first.register_hook(lambda grad: grad * math.nan if self.calls in self.nan_grad else grad)

    def forward(self, x, *args):
        self.calls += torch.is_grad_enabled()  # the pair's check runs without gradients: not a step
        if x is not None and self.calls in self.nan_loss:
            x = x * math.nan
        return super().forward(x, *args)


def rigged(**kwargs):
    pyro.set_rng_seed(0)
    return NonFinite(64, 4, hidden=(32,), **kwargs), GaussianGuide(64, 4, hidden=(32,))


def test_non_finite_steps_are_skipped_and_counted(digits):
    # Calls 2-11 are epoch 1's ten batches, 12-21 epoch 2's; call 1 collected the parameters.
    model, guide = rigged(nan_loss={3, 8, 9}, nan_grad={16})
    history = fit(model, guide, digits, epochs=3, batch_size=128, max_bad_steps=5, progress=False).history
    assert history["skipped_steps"].tolist() == [3, 1, 0]
    assert history["restorations"].tolist() == [0, 0, 0]
    assert all(math.isfinite(v) for v in history["train_loss"])
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *guide.parameters()])


def test_skipped_steps_change_nothing():
    """A skipped step leaves parameters and Adam's moments and step count as they were."""
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.Adam([p], lr=0.1, fused=fused)
        take_step = step_function(optimizer, [p], clip_grad_norm=None)
        sums = RunningSums.zeros("cpu")
        p.grad = torch.ones(3)
        take_step(torch.tensor(2.0), 4, sums)
        before = (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
        for loss, grad in ((torch.tensor(math.nan), torch.ones(3)), (torch.tensor(1.0), torch.tensor([1.0, math.inf, 0]))):
            p.grad = grad
            take_step(loss, 4, sums)
        assert torch.equal(p.detach(), before[0])
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in before[1].items())
        # The checkpoint's loop.tally: loss of finite steps, points, skipped, run, longest, in this order.
        assert sums.tally.tolist() == [2.0, 4.0, 2.0, 2.0, 2.0]
        named = (sums.loss, sums.points, sums.skipped, sums.bad_run, sums.longest_bad_run)
        assert [value.item() for value in named] == [2.0, 4.0, 2.0, 2.0, 2.0]


def test_gradient_clipping_bounds_the_update():
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([p], lr=1.0)
    take_step = step_function(optimizer, [p], clip_grad_norm=0.5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    take_step(torch.tensor(0.0), 1, RunningSums.zeros("cpu"))
    assert torch.allclose(p.detach(), -torch.tensor([0.3, 0.4, 0.0, 0.0]))


def test_a_run_of_non_finite_steps_restores_the_last_good_state_and_halves_the_learning_rate(digits):
    model, guide = rigged(nan_loss=set(range(14, 24)))  # ten in a row: the last eight of epoch 2, two of epoch 3
    history = fit(model, guide, digits, epochs=4, batch_size=128, lr=2e-3, max_bad_steps=5, progress=False).history
    assert history["restorations"].tolist() == [0, 1, 1, 1]
    assert history["lr"].tolist() == [2e-3, 1e-3, 1e-3, 1e-3]
    assert history["skipped_steps"].tolist() == [0, 8, 2, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_that_keeps_diverging_stops_with_the_last_checkpoint_intact(digits, tmp_path):
    model, guide = rigged(nan_loss=set(range(26, 10_000)))  # from the middle of epoch 3 on
    fit(model, guide, digits, epochs=2, batch_size=128, progress=False)
    good = weights(model, guide)

    checkpoint = tmp_path / "checkpoint.safetensors"
    model, guide = rigged(nan_loss=set(range(26, 10_000)))
    # Restorations at the ends of epochs 3 and 4 put back the state of epoch 2; epoch 5 gives up.
    with pytest.raises(InputError, match=r"training diverged.*2 restorations.*checkpoint.safetensors"):
        fit(model, guide, digits, epochs=6, batch_size=128, max_bad_steps=4, max_restorations=2,
            checkpoint=checkpoint, progress=False)
    tensors, training = read_checkpoint(checkpoint)
    assert training["progress"]["epoch"] == 4
    assert [row["restorations"] for row in training["progress"]["history"]] == [0, 0, 1, 2]
    assert_bitwise_equal({k: v for k, v in tensors.items() if k.startswith(("model.", "guide."))}, good)


@pytest.fixture
def checkpoint(digits, tmp_path):
    model, guide = vae()
    path = tmp_path / "checkpoint.safetensors"
    fit(model, guide, digits, epochs=2, progress=False, checkpoint=path)
    return path


def resume(digits, path, **options):
    model, guide = vae()
    return fit(model, guide, digits, epochs=3, progress=False, checkpoint=path, resume=True, **options)


def test_resuming_with_other_options_is_refused(digits, checkpoint):
    with pytest.raises(InputError, match=r"checkpoint.safetensors: this checkpoint was written with lr=0.001, not lr=0.01"):
        resume(digits, checkpoint, lr=1e-2)
    with pytest.raises(InputError, match="objective='elbo', not objective='iwae'"):
        resume(digits, checkpoint, objective="iwae")


def test_a_checkpoint_of_another_model_is_refused(digits, checkpoint):
    pyro.set_rng_seed(0)
    model, guide = VAE(64, 5, hidden=(32,)), GaussianGuide(64, 5, hidden=(32,))
    with pytest.raises(InputError, match="checkpoint.safetensors: weights do not fit the configured model"):
        fit(model, guide, digits, epochs=3, progress=False, checkpoint=checkpoint, resume=True)


def test_truncated_corrupted_and_newer_checkpoints_are_refused_by_name(digits, checkpoint):
    raw = checkpoint.read_bytes()
    checkpoint.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="checkpoint.safetensors: not a readable safetensors file"):
        resume(digits, checkpoint)
    corrupted = bytearray(raw)
    corrupted[-100] ^= 0xFF  # a byte of the last tensor's data
    checkpoint.write_bytes(bytes(corrupted))
    with pytest.raises(InputError, match="checkpoint.safetensors: corrupted"):
        resume(digits, checkpoint)
    checkpoint.write_bytes(raw)
    tensors, header = load_tensors(checkpoint)
    save_file(tensors, checkpoint, metadata=header | {"format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(InputError, match=f"format version {FORMAT_VERSION + 1}, newer than this elbolab reads"):
        resume(digits, checkpoint)


def test_a_pickle_in_place_of_the_checkpoint_executes_nothing(digits, checkpoint, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="checkpoint.safetensors: not a readable safetensors file"):
        resume(digits, checkpoint)
    assert not marker.exists()


def test_a_finished_checkpoint_trains_on_when_given_more_epochs(digits, checkpoint):
    history = resume(digits, checkpoint).history
    assert history["epoch"].tolist() == [1, 2, 3]
    assert read_checkpoint(checkpoint)[1]["progress"]["epoch"] == 3
    with pytest.raises(InputError, match="already trained 3 epochs, more than epochs=2"):
        model, guide = vae()
        fit(model, guide, digits, epochs=2, progress=False, checkpoint=checkpoint, resume=True)
