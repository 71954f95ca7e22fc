"""TensorBoard logging of a training run: a monitor for :func:`~elbolab.inference.fit`.

:class:`TensorBoardMonitor` is passed as ``fit(..., monitor=...)`` and writes one event file
into ``log_dir``:

    step/loss            the step's loss, nats per data point (none for a skipped step)
    step/beta, step/lr   the KL weight and the learning rate the step was taken with
    step/skipped_steps   steps skipped for a non-finite loss or gradient, counted since the monitor began
    epoch/KEY            every finite number of the epoch's history row: train_loss, valid_elbo,
                         beta, seconds, skipped_steps, restorations, lr, and a model's own
                         (e.g. the VQ-VAE's perplexity, codes_used)
    images/NAME          image grids from an ``images(model, guide)`` callback, at epoch 1 and
                         every ``image_every`` epochs

The ``step/`` scalars have the global step as their axis, the ``epoch/`` scalars and the images
the epoch number.

The step scalars cost the training loop no host sync: after each step the monitor only copies
the epoch's running sums on the device (``loss, points, skipped``, see
:class:`~elbolab.inference.step.RunningSums`), and reads the copies once per epoch, when fit
reads the sums anyway. A step's loss is the difference of consecutive copies; fit zeroes the sums
at each epoch's start, so the first step of an epoch differs from zeros. The monitor cannot know
the sums before its first step (a resumed run restores them mid-epoch): that step only sets the
baseline and is not logged.

Each run writes under its own folder (the CLI passes ``RUN_FOLDER/tensorboard``), so
``tensorboard --logdir runs`` shows every run in ``runs/`` side by side, named by its folder.

TensorBoard is an optional dependency (``pip install 'elbolab[tensorboard]'``), imported only when
a monitor is made: importing this module does not import it.
"""

from __future__ import annotations

__all__ = ["TensorBoardMonitor", "image_grid", "require_tensorboard"]

import math
import numbers
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from elbolab.config import is_integer
from elbolab.errors import InputError
from elbolab.random_state import kept_rng_state

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

IMAGE_PREFIX = "images/"


def require_tensorboard() -> None:
    """Refuse, with an :class:`~elbolab.errors.InputError` naming the fix, when TensorBoard cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"--tensorboard needs the tensorboard package, which cannot be imported ({reason}): "
            "pip install 'elbolab[tensorboard]'"
        ) from None


def image_grid(images: Tensor, columns: int = 8, padding: int = 1, *, pad_value: float = 0.5) -> Tensor:
    """Tile a batch of images into one image, row by row.

    Arguments:
        images: ``[n, H, W]`` (grayscale) or ``[n, C, H, W]``.
        columns: images per row (fewer when ``n`` is smaller).
        padding: pixels of ``pad_value`` between the images and around them.
        pad_value: the value of the padding and of the empty places in the last row; the
            default gray sets the images off both a black and a white background.

    Returns:
        ``[C, rows * (H + padding) + padding, columns * (W + padding) + padding]`` (``C = 1`` for
        grayscale), with ``rows = ceil(n / columns)``; a floating tensor.

    Example:
        >>> image_grid(torch.ones(3, 2, 2), columns=2, padding=1, pad_value=0).shape
        torch.Size([1, 7, 7])
    """
    if not isinstance(images, Tensor) or images.dim() not in (3, 4) or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"image_grid takes a batch of images [n, H, W] or [n, C, H, W], got {shape}")
    if not is_integer(columns) or columns < 1:
        raise InputError(f"columns must be a positive integer, got {columns}")
    if not is_integer(padding) or padding < 0:
        raise InputError(f"padding must be a non-negative integer, got {padding}")
    images = images.detach()
    images = images if images.is_floating_point() else images.float()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    n, channels, height, width = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    blanks = images.new_full((rows * columns - n, channels, height, width), pad_value)
    # Each tile padded on its top and left; the grid then on its bottom and right.
    tiles = F.pad(torch.cat([images, blanks]), (padding, 0, padding, 0), value=pad_value)
    tile_h, tile_w = height + padding, width + padding
    grid = tiles.reshape(rows, columns, channels, tile_h, tile_w).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * tile_h, columns * tile_w)
    return F.pad(grid, (0, padding, 0, padding), value=pad_value)


class TensorBoardMonitor:
    """Writes a run's per-step and per-epoch scalars, and image grids, as TensorBoard events.

    Arguments:
        log_dir: the folder the event file goes to (made if missing); the CLI passes
            ``RUN_FOLDER/tensorboard``.
        images: ``images(model, guide) -> {name: images}``, called after epoch 1 and every
            ``image_every`` epochs, in eval mode, without gradients, and with the random
            generators (torch's, Python's, NumPy's) put back afterwards, so that drawing images
            leaves training as it would be without them. A value is a batch ``[n, H, W]`` or
            ``[n, C, H, W]`` (tiled by :func:`image_grid`) or one image ``[H, W]``, with values in
            [0, 1]; it is written as ``images/NAME`` (a name already starting ``images/`` as it is).
        image_every: epochs between image grids.

    Raises:
        InputError: the tensorboard package cannot be imported, or ``image_every`` is not a
            positive integer.

    Example:
        >>> with TensorBoardMonitor("runs/vae/tensorboard") as monitor:
        ...     fit(model, guide, data, epochs=20, monitor=monitor)
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        images: Callable[[Any, Any], dict[str, Tensor]] | None = None,
        image_every: int = 5,
    ) -> None:
        require_tensorboard()
        if not is_integer(image_every) or image_every < 1:
            raise InputError(f"image_every must be a positive integer of epochs, got {image_every}")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.images, self.image_every = images, int(image_every)
        self._writer: SummaryWriter | None = SummaryWriter(log_dir=str(self.log_dir))
        # Steps since the last flush: the sums' device copies, and (step, beta, lr, wall time, first of an epoch).
        self._sums: list[Tensor] = []
        self._steps: list[tuple[int, float, float, float, bool]] = []
        self._previous: tuple[float, float, float] | None = None  # the last step's sums, once read
        self._epoch_started = False  # whether the next step is the first of an epoch, whose sums fit zeroed
        self._skipped = 0

    def step(self, step: int, sums: Tensor, beta: float, lr: float) -> None:
        """Record a step: copies ``sums`` (``loss, points, skipped`` so far in the epoch) on its device, without a sync."""
        self._sums.append(sums.detach().clone())
        self._steps.append((int(step), float(beta), float(lr), time.time(), self._epoch_started))
        self._epoch_started = False

    def epoch(self, row: dict[str, Any], model: Any, guide: Any) -> None:
        """Write the epoch's steps, the finite numbers of its history ``row``, and image grids when due."""
        writer = self._open_writer()
        self._write_steps()
        epoch = int(row["epoch"])
        for key, value in row.items():
            number = _finite_number(value)
            if key != "epoch" and number is not None:
                writer.add_scalar(f"epoch/{key}", number, epoch)
        if self.images is not None and (epoch == 1 or epoch % self.image_every == 0):
            self._write_images(model, guide, epoch)
        self._epoch_started = True
        writer.flush()

    def close(self) -> None:
        """Write the steps not yet written (a run stopped mid-epoch) and close the event file; idempotent."""
        if self._writer is None:
            return
        try:
            self._write_steps()
        finally:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardMonitor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _open_writer(self) -> SummaryWriter:
        if self._writer is None:
            raise RuntimeError(f"the TensorBoard monitor of {self.log_dir} is closed")
        return self._writer

    def _write_steps(self) -> None:
        """Read the buffered copies of the sums (one host sync) and write each step's scalars."""
        if not self._steps:
            return
        writer = self._open_writer()
        sums = torch.stack([s.reshape(-1)[:3] for s in self._sums]).cpu().tolist()
        for (step, beta, lr, walltime, epoch_started), (loss, points, skipped) in zip(self._steps, sums, strict=True):
            previous = self._previous
            self._previous = (loss, points, skipped)
            if previous is None:  # the first step seen: its sums before it are unknown
                continue
            if epoch_started or points < previous[1] or skipped < previous[2]:  # fit zeroed the sums
                previous = (0.0, 0.0, 0.0)
            loss_added, points_added, skipped_added = loss - previous[0], points - previous[1], skipped - previous[2]
            self._skipped += round(skipped_added)
            if points_added > 0:
                writer.add_scalar("step/loss", loss_added / points_added, step, walltime=walltime)
            for tag, value in (("step/beta", beta), ("step/lr", lr)):
                if math.isfinite(value):
                    writer.add_scalar(tag, value, step, walltime=walltime)
            writer.add_scalar("step/skipped_steps", self._skipped, step, walltime=walltime)
        self._sums.clear()
        self._steps.clear()

    def _write_images(self, model: Any, guide: Any, epoch: int) -> None:
        writer = self._open_writer()
        with _evaluating(model, guide), kept_rng_state(), torch.no_grad():
            images = self.images(model, guide)
        for name, value in images.items():
            tag = name if name.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + name
            writer.add_image(tag, _as_picture(value, tag), epoch, dataformats="CHW")


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_picture(value: Any, tag: str) -> np.ndarray:
    """An image or a batch of them, as one ``[C, H, W]`` uint8 array (a batch tiled by :func:`image_grid`)."""
    if not isinstance(value, Tensor) or value.dim() not in (2, 3, 4):
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"the images callback gave {tag} as {shape}; give a tensor [n, H, W], [n, C, H, W] or [H, W]")
    value = value.detach().float().cpu()
    grid = value.unsqueeze(0) if value.dim() == 2 else image_grid(value)
    if grid.shape[0] not in (1, 3):
        raise InputError(f"the images callback gave {tag} with {grid.shape[0]} channels; TensorBoard shows 1 or 3")
    return (grid.nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@contextmanager
def _evaluating(*programs: Any) -> Iterator[None]:
    """Eval mode for the modules among ``programs`` (no batch-norm statistics updated), each submodule's mode put back."""
    modes = [(m, m.training) for p in programs if isinstance(p, nn.Module) for m in p.modules()]
    for program in programs:
        if isinstance(program, nn.Module):
            program.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
