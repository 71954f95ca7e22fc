"""TensorBoard logging: the per-step losses recovered from the running sums, the epoch scalars, image grids, refusals."""

import math
import subprocess
import sys
from typing import ClassVar

import pyro
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import fit
from elbolab.models import VAE
from elbolab.runs.tensorboard import TensorBoardMonitor, image_grid, require_tensorboard


def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return [(event.step, event.value) for event in events.Scalars(tag)]


def row(epoch, **values):
    return {"epoch": epoch, "train_loss": 1.5, "beta": 1.0, "valid_elbo": -2.5, "seconds": 0.25,
            "skipped_steps": 0, "restorations": 0, "lr": 1e-3} | values


class Watched(torch.Tensor):
    """A tensor that records the torch functions called on it."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_step_losses_are_differences_of_the_running_sums(tmp_path):
    sums = torch.zeros(3, dtype=torch.float64)  # one buffer updated in place, as fit's
    with TensorBoardMonitor(tmp_path) as monitor:

        def step(number, loss, points, skipped, beta=0.5, lr=1e-3):
            sums.copy_(torch.tensor([loss, points, skipped], dtype=torch.float64))
            monitor.step(number, sums, beta, lr)

        step(1, 3, 1, 0)  # the first step seen: the baseline only
        step(2, 8, 2, 0)  # loss 5 over 1 point
        step(3, 15, 4, 0)  # loss 7 over 2 points
        step(4, 15, 4, 1)  # skipped
        monitor.epoch(row(1, skipped_steps=1, codes_used=7, note="not a number"), None, None)
        step(5, 6, 2, 0, beta=0.75)  # fit zeroed the sums: loss 6 over 2 points
        step(6, 6, 2, 1, beta=0.75)  # skipped
        step(7, 10, 3, 1, beta=0.75, lr=5e-4)  # loss 4 over 1 point
        monitor.epoch(row(2, valid_elbo=math.nan, skipped_steps=1, train_loss=10 / 3), None, None)
        step(8, -2, 2, 0)  # stopped mid-epoch: close writes it (a negative loss, continuous data)

    events = read_events(tmp_path)
    assert scalars(events, "step/loss") == [(2, 5.0), (3, 3.5), (5, 3.0), (7, 4.0), (8, -1.0)]
    assert scalars(events, "step/skipped_steps") == [(2, 0), (3, 0), (4, 1), (5, 1), (6, 2), (7, 2), (8, 2)]
    assert scalars(events, "step/beta") == [(2, 0.5), (3, 0.5), (4, 0.5), (5, 0.75), (6, 0.75), (7, 0.75), (8, 0.5)]
    assert [step for step, _ in scalars(events, "step/lr")] == [2, 3, 4, 5, 6, 7, 8]
    assert scalars(events, "step/lr")[5][1] == pytest.approx(5e-4, rel=1e-6)

    tags = set(events.Tags()["scalars"])
    assert {tag for tag in tags if tag.startswith("epoch/")} == {
        "epoch/train_loss", "epoch/beta", "epoch/valid_elbo", "epoch/seconds", "epoch/skipped_steps",
        "epoch/restorations", "epoch/lr", "epoch/codes_used",
    }
    assert scalars(events, "epoch/valid_elbo") == [(1, -2.5)]  # epoch 2's NaN is not written
    assert scalars(events, "epoch/codes_used") == [(1, 7.0)]
    assert scalars(events, "epoch/seconds") == [(1, 0.25), (2, 0.25)]
    train_loss = scalars(events, "epoch/train_loss")
    assert [step for step, _ in train_loss] == [1, 2]
    assert [value for _, value in train_loss] == pytest.approx([1.5, 10 / 3], rel=1e-6)
    assert not events.Tags()["images"]


def test_the_first_step_of_an_epoch_differs_from_zeros_even_when_the_sums_do_not_fall(tmp_path):
    # One batch per epoch: every epoch's sums are one step's, with the same number of points.
    sums = torch.zeros(3, dtype=torch.float64)
    with TensorBoardMonitor(tmp_path) as monitor:
        for epoch, loss in enumerate([8.0, 6.0, 5.0], start=1):
            sums.copy_(torch.tensor([loss, 4, 0], dtype=torch.float64))
            monitor.step(epoch, sums, 1.0, 1e-3)
            monitor.epoch(row(epoch, train_loss=loss / 4), None, None)
    assert scalars(read_events(tmp_path), "step/loss") == [(2, 1.5), (3, 1.25)]


def test_a_step_only_copies_the_sums_on_their_device(tmp_path):
    sums = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64).as_subclass(Watched)
    with TensorBoardMonitor(tmp_path) as monitor:
        Watched.calls.clear()
        monitor.step(1, sums, 1.0, 1e-3)
        calls = list(Watched.calls)
        sums.add_(1.0)  # fit goes on updating its buffer
        monitor.step(2, sums, 1.0, 1e-3)
        monitor.epoch(row(1), None, None)
    # A read of the values (a host sync on a GPU) goes through one of these.
    reads = {"item", "tolist", "cpu", "numpy", "to", "__float__", "__bool__", "__format__", "__repr__", "__eq__"}
    assert "clone" in calls
    assert not reads & set(calls)
    assert scalars(read_events(tmp_path), "step/loss") == [(2, 1.0)]  # (4 - 3) / (2 - 1): the copy, not the buffer


def small_vae():
    pyro.set_rng_seed(0)
    return VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))


def test_fit_logs_what_its_history_says(tmp_path):
    data = load_dataset("digits", binarize="dynamic")
    valid = load_dataset("digits", "valid", binarize="dynamic")
    options = dict(epochs=3, batch_size=256, progress=False, valid=valid)
    seen_training = []

    def images(model, guide):
        seen_training.append(model.training or guide.training)
        return {
            "samples": model.generate(4).reshape(-1, 8, 8),
            "images/reconstructions": model.reconstruct(valid.x[:8], guide).reshape(-1, 8, 8),
        }

    with TensorBoardMonitor(tmp_path / "tensorboard", images=images, image_every=2) as monitor:
        result = fit(*small_vae(), data, monitor=monitor, **options)
    history = result.history
    assert result.skipped_steps == 0

    events = read_events(tmp_path / "tensorboard")
    train_loss = scalars(events, "epoch/train_loss")
    assert [step for step, _ in train_loss] == [1, 2, 3]
    assert [value for _, value in train_loss] == pytest.approx(history["train_loss"].tolist(), rel=1e-6)
    assert [value for _, value in scalars(events, "epoch/valid_elbo")] == pytest.approx(history["valid_elbo"].tolist(), rel=1e-6)

    batch_sizes = [min(256, data.num_points - start) for start in range(0, data.num_points, 256)]
    steps = 3 * len(batch_sizes)
    losses = scalars(events, "step/loss")
    assert [step for step, _ in losses] == list(range(2, steps + 1))  # the first step only set the baseline
    second_epoch = dict(losses)
    second_epoch = [second_epoch[step] for step in range(len(batch_sizes) + 1, 2 * len(batch_sizes) + 1)]
    weighted = sum(loss * size for loss, size in zip(second_epoch, batch_sizes, strict=True)) / data.num_points
    assert weighted == pytest.approx(history["train_loss"].iloc[1], rel=1e-6)

    for tag, count in (("images/samples", 4), ("images/reconstructions", 8)):
        pictures = events.Images(tag)
        assert [picture.step for picture in pictures] == [1, 2]
        assert {(picture.height, picture.width) for picture in pictures} == {(1 * 9 + 1, count * 9 + 1)}
    assert seen_training == [False, False]

    # The monitor and its images leave training as it is without them.
    plain = fit(*small_vae(), data, **options).history
    assert plain["train_loss"].tolist() == history["train_loss"].tolist()
    assert plain["valid_elbo"].tolist() == history["valid_elbo"].tolist()


def test_images_are_drawn_in_eval_mode_without_gradients_and_each_mode_is_put_back(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model[1].eval()  # a submodule in another mode than its parent
    seen = []

    def images(model, guide):
        seen.append((model.training, model[0].training, torch.is_grad_enabled()))
        return {"weights": model[0].weight.unsqueeze(0)}

    with TensorBoardMonitor(tmp_path, images=images, image_every=3) as monitor:
        for epoch in range(1, 7):
            monitor.epoch(row(epoch), model, None)
    assert seen == [(False, False, False)] * 3
    assert (model.training, model[0].training, model[1].training) == (True, True, False)
    pictures = read_events(tmp_path).Images("images/weights")
    assert [picture.step for picture in pictures] == [1, 3, 6]
    assert {(picture.height, picture.width) for picture in pictures} == {(6, 6)}


def test_without_tensorboard_the_flag_is_refused_on_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for refuse in (require_tensorboard, lambda: TensorBoardMonitor(tmp_path / "tensorboard")):
        with pytest.raises(InputError) as refused:
            refuse()
        message = str(refused.value)
        assert "\n" not in message
        assert "--tensorboard" in message
        assert "pip install 'elbolab[tensorboard]'" in message
    assert not (tmp_path / "tensorboard").exists()


def test_image_every_must_be_a_positive_integer(tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="image_every"):
            TensorBoardMonitor(tmp_path, image_every=bad)


def test_importing_the_module_does_not_import_tensorboard():
    check = ("import sys, elbolab.cli, elbolab.runs, elbolab.runs.tensorboard; "
             "loaded = [m for m in sys.modules if 'tensorboard' in m and m != 'elbolab.runs.tensorboard']; "
             "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", check], check=True)


def test_image_grid_tiles_row_by_row():
    images = torch.stack([10 * k + torch.tensor([[1.0, 2.0], [3.0, 4.0]]) for k in range(3)])
    grid = image_grid(images, columns=2, padding=1, pad_value=0)
    expected = torch.tensor([
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 0, 11, 12, 0],
        [0, 3, 4, 0, 13, 14, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 21, 22, 0, 0, 0, 0],
        [0, 23, 24, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    assert torch.equal(grid, expected.unsqueeze(0))
    assert torch.equal(image_grid(images, columns=5, padding=0), torch.cat(list(images), dim=1).unsqueeze(0))
    assert torch.equal(image_grid(images, columns=1, padding=0), torch.cat(list(images), dim=0).unsqueeze(0))


def test_image_grid_shapes_and_channels():
    assert image_grid(torch.rand(9, 8, 8)).shape == (1, 2 * 9 + 1, 8 * 9 + 1)
    assert image_grid(torch.rand(1, 28, 28), padding=2).shape == (1, 32, 32)
    colour = torch.zeros(2, 3, 1, 1)
    colour[:, 1] = 1.0  # green
    grid = image_grid(colour, columns=2, padding=1, pad_value=0.5)
    assert grid.shape == (3, 3, 5)
    assert grid[:, 1, 1].tolist() == grid[:, 1, 3].tolist() == [0.0, 1.0, 0.0]
    assert grid[:, 0, 0].tolist() == [0.5, 0.5, 0.5]
    assert image_grid(torch.ones(2, 2, 2, dtype=torch.uint8), padding=0).dtype == torch.float32
    for bad in (torch.zeros(0, 8, 8), torch.zeros(8, 8), torch.zeros(1, 1, 1, 1, 1)):
        with pytest.raises(InputError, match="image_grid"):
            image_grid(bad)
    with pytest.raises(InputError, match="columns"):
        image_grid(torch.zeros(2, 8, 8), columns=0)
