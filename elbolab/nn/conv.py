"""Convolutional encoders and decoders for single-channel images stored as flattened rows.

Data rows are images of ``image_shape = (H, W)`` flattened row-major to ``x_dim = H * W``, so
that a convolutional network drops in where an MLP did: the encoder maps ``[..., H*W]`` to
``[..., F]`` features, the decoder maps ``z`` of shape ``[..., z_dim]`` (leading dims may be
``[K, N]`` particles) to ``[..., H*W]`` decoder outputs that :class:`elbolab.models.Likelihood`
turns into ``p(x | z)``.

Each encoder stage is a stride-2 convolution with kernel ``k`` (odd) and padding ``k // 2``,
which maps a side of size ``s`` to ``ceil(s / 2)``::

    floor((s + 2 (k // 2) - k) / 2) + 1 = floor((s - 1) / 2) + 1 = ceil(s / 2)

Each decoder stage is the matching stride-2 transposed convolution, whose output side is
``2 s - 1 + output_padding``; ``output_padding = 1`` when the encoder's side was even and ``0``
when odd retraces the encoder exactly (28 -> 14 -> 7 -> 14 -> 28, 7 -> 4 -> 2 -> 4 -> 7).
Ceil halving never reaches 0, so every number of stages gives valid shapes; past a 1-pixel side
a stage keeps it at 1.

With ``gated=True`` every convolution is a gated convolution (van den Berg, Hasenclever,
Tomczak & Welling 2018, "Sylvester normalizing flows for variational inference", their
``GatedConv2d`` and ``GatedConvTranspose2d``)::

    h = conv_h(x) * sigmoid(conv_g(x))

with no further activation: the gate is the nonlinearity.
"""

from __future__ import annotations

__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "ConvGridDecoder",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "PixelBias",
    "grid_size",
]

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.errors import InputError, closest_names
from elbolab.nn.mlp import ACTIVATIONS


def _image_shape(image_shape: Any) -> tuple[int, int]:
    try:
        values = tuple(image_shape)
    except TypeError:
        values = None
    if values is None or len(values) != 2 or not all(is_integer(v) and v >= 1 for v in values):
        raise InputError(f"image_shape must be two positive integers (H, W), got {image_shape!r}")
    return int(values[0]), int(values[1])


def _positive_int(name: str, value: Any) -> int:
    if not is_integer(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_options(channels: Any, kernel: Any, residual: Any, activation: Any) -> tuple[int, ...]:
    try:
        widths = tuple(channels)
    except TypeError:
        raise InputError(f"channels must be one or more positive widths, got {channels!r}") from None
    if not widths or not all(is_integer(c) and c >= 1 for c in widths):
        raise InputError(f"channels must be one or more positive widths, got {channels!r}")
    if not is_integer(kernel) or kernel < 1 or kernel % 2 == 0:
        # An even kernel with padding k // 2 maps s to floor(s / 2) + 1, not ceil(s / 2).
        raise InputError(f"kernel must be an odd positive integer, got {kernel!r}")
    if not is_integer(residual) or residual < 0:
        raise InputError(f"residual must be an integer >= 0 (blocks per stage), got {residual!r}")
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; {closest_names(str(activation), ACTIVATIONS)}")
    return tuple(int(c) for c in widths)


def _side_sizes(image_shape: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """``(h, w)`` before the first stage and after each: ``stages + 1`` entries."""
    sizes = [image_shape]
    for _ in range(stages):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


def grid_size(image_shape: Sequence[int], stages: int) -> tuple[int, int]:
    """The spatial grid ``(h, w)`` after ``stages`` stride-2 stages: each side ceil-halved ``stages`` times.

    Example:
        >>> grid_size((28, 28), 2), grid_size((28, 20), 3), grid_size((8, 8), 4)
        ((7, 7), (4, 3), (1, 1))
    """
    shape = _image_shape(image_shape)
    if not is_integer(stages) or stages < 0:
        raise InputError(f"stages must be an integer >= 0, got {stages!r}")
    return _side_sizes(shape, int(stages))[-1]


class _Gated(nn.Module):
    """``conv_h(x) * sigmoid(conv_g(x))``, for two convolutions ``h`` and ``g`` of the same shape."""

    h: nn.Module
    g: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConv2d(_Gated):
    """A gated convolution ``conv_h(x) * sigmoid(conv_g(x))`` (van den Berg et al. 2018).

    The arguments are those of :class:`torch.nn.Conv2d`, given to both convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)


class GatedConvTranspose2d(_Gated):
    """A gated transposed convolution ``convT_h(x) * sigmoid(convT_g(x))`` (van den Berg et al. 2018).

    The arguments are those of :class:`torch.nn.ConvTranspose2d`, given to both convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        output_padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.h = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding)
        self.g = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding)


class _Residual(nn.Module):
    """``x + conv(act(conv(act(x))))`` with 3x3 same-padding convolutions; gated: ``x + gconv(gconv(x))``.

    The pre-activation form (He et al. 2016, "Identity mappings in deep residual networks") keeps
    the skip path an identity.
    """

    def __init__(self, width: int, gated: bool, activation: str) -> None:
        super().__init__()
        if gated:
            self.branch = nn.Sequential(GatedConv2d(width, width, 3, 1, 1), GatedConv2d(width, width, 3, 1, 1))
        else:
            act = ACTIVATIONS[activation]
            self.branch = nn.Sequential(
                act(), nn.Conv2d(width, width, 3, 1, 1), act(), nn.Conv2d(width, width, 3, 1, 1)
            )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def _stage(conv: nn.Module, width: int, residual: int, gated: bool, activation: str) -> nn.Sequential:
    """A stage: its (gated or plain) convolution, the activation unless gated, then residual blocks."""
    layers = [conv] if gated else [conv, ACTIVATIONS[activation]()]
    layers += [_Residual(width, gated, activation) for _ in range(residual)]
    return nn.Sequential(*layers)


def _check_width(who: str, x: Tensor, width: int, what: str) -> None:
    if x.dim() < 1 or x.shape[-1] != width:
        got = f"width {x.shape[-1]}" if x.dim() >= 1 else "a 0-dim tensor"
        raise InputError(f"{who} expects inputs [..., {width}] ({what}), got {got} (shape {list(x.shape)})")


class ConvEncoder(nn.Module):
    """An encoder trunk: ``[..., H*W]`` images -> ``[..., out_features]`` features.

    One stage per entry of ``channels``: a stride-2 convolution (kernel ``kernel``, padding
    ``kernel // 2``, so each side ``s -> ceil(s / 2)``) to that width and the activation, then
    ``residual`` residual blocks at that width. With ``gated=True`` every convolution is a
    :class:`GatedConv2d` and no activation follows it.

    Arguments:
        image_shape: ``(H, W)``; inputs are rows of width ``H * W``, flattened row-major.
        channels: the width of each stage.
        kernel: odd kernel size of the strided convolutions.
        residual: residual blocks after each stage's convolution.
        gated: gated convolutions (van den Berg et al. 2018) instead of convolution + activation.
        activation: a key of :data:`elbolab.nn.ACTIVATIONS` (used when not gated).

    Attributes:
        grid_shape: ``(C_last, h, w)``, the feature grid :meth:`grid` returns per input.
        out_features: ``C_last * h * w``, the width :meth:`forward` returns.

    Example:
        >>> encoder = ConvEncoder((28, 28), channels=(8, 16))
        >>> encoder.grid_shape, encoder(torch.zeros(5, 784)).shape
        ((16, 7, 7), torch.Size([5, 784]))
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        kernel: int = 3,
        residual: int = 0,
        gated: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.image_shape = _image_shape(image_shape)
        widths = _check_options(channels, kernel, residual, activation)
        kernel, residual = int(kernel), int(residual)
        self.x_dim = self.image_shape[0] * self.image_shape[1]
        stages = []
        for width_in, width in zip((1, *widths[:-1]), widths, strict=True):
            conv = (GatedConv2d if gated else nn.Conv2d)(width_in, width, kernel, 2, kernel // 2)
            stages.append(_stage(conv, width, residual, gated, activation))
        self.stages = nn.Sequential(*stages)
        h, w = _side_sizes(self.image_shape, len(widths))[-1]
        self.grid_shape: tuple[int, int, int] = (widths[-1], h, w)
        self.out_features: int = widths[-1] * h * w

    def grid(self, x: Tensor) -> Tensor:
        """The features before flattening: ``[..., H*W] -> [..., C_last, h, w]``."""
        _check_width("ConvEncoder", x, self.x_dim, f"images of shape {self.image_shape} flattened")
        leading = x.shape[:-1]
        # An explicit batch size, since reshape(-1, ...) cannot infer it for an empty batch.
        out = self.stages(x.reshape(math.prod(leading), 1, *self.image_shape))
        return out.reshape(*leading, *self.grid_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.grid(x).flatten(-3)


class PixelBias(nn.Module):
    """A learned per-pixel bias added to ``[..., x_dim]`` outputs: a decoder's ``output_layer``.

    It has the ``bias`` of shape ``[x_dim]`` that a final :class:`torch.nn.Linear` would have, so
    that :func:`elbolab.models.vae.start_at_data_mean` starts a convolutional decoder at the
    data's per-pixel mean as it does an MLP decoder.
    """

    def __init__(self, x_dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(x_dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class _Upsampler(nn.Module):
    """The stages shared by both decoders: ``[B, channels[0], h, w] -> [B, H*W]``.

    Stage ``j`` is a stride-2 transposed convolution from ``channels[j]`` to ``channels[j + 1]``
    (the last to ``channels[-1]``) whose ``output_padding`` retraces the encoder's sides, the
    activation unless gated, and residual blocks; then a 1-channel 3x3 convolution without bias
    and the per-pixel :class:`PixelBias` (a pixel's bias should not be shared across the image).
    """

    def __init__(
        self,
        image_shape: tuple[int, int],
        widths: tuple[int, ...],
        kernel: int,
        residual: int,
        gated: bool,
        activation: str,
    ) -> None:
        super().__init__()
        self.image_shape = image_shape
        self.x_dim = image_shape[0] * image_shape[1]
        # Encoder sides, smallest first: stage j maps sides[j] to sides[j + 1].
        sides = _side_sizes(image_shape, len(widths))[::-1]
        self.stage_grid = sides[0]
        stages = []
        for j, (width_in, width) in enumerate(zip(widths, (*widths[1:], widths[-1]), strict=True)):
            # The output side is 2 s - 1 + output_padding: +1 when the target side is even.
            output_padding = (1 - sides[j + 1][0] % 2, 1 - sides[j + 1][1] % 2)
            transposed = GatedConvTranspose2d if gated else nn.ConvTranspose2d
            conv = transposed(width_in, width, kernel, 2, kernel // 2, output_padding)
            stages.append(_stage(conv, width, residual, gated, activation))
        self.stages = nn.Sequential(*stages)
        self.to_pixels = nn.Conv2d(widths[-1], 1, 3, 1, 1, bias=False)
        self.output_layer = PixelBias(self.x_dim)

    def decode(self, grid: Tensor) -> Tensor:
        return self.output_layer(self.to_pixels(self.stages(grid)).flatten(1))


class ConvDecoder(_Upsampler):
    """A decoder: ``z`` of shape ``[..., z_dim]`` -> ``[..., H*W]`` outputs (logits or means).

    A Linear from ``z_dim`` to ``channels[0] * h * w`` and the activation, reshaped to the grid
    ``[channels[0], h, w]`` of a :class:`ConvEncoder` with ``len(channels)`` stages on
    ``image_shape``; then one stride-2 transposed-convolution stage per entry of ``channels``
    (gated when ``gated``; residual blocks as in the encoder), retracing the encoder's sides
    exactly; a 1-channel 3x3 convolution without bias; and ``output_layer``, a per-pixel bias
    of shape ``[H*W]`` for :func:`elbolab.models.vae.start_at_data_mean`. No final activation.

    Arguments:
        z_dim: latent width.
        image_shape: ``(H, W)`` of the images; outputs are rows of width ``H * W``.
        channels: the width entering each stage (an encoder's ``channels`` reversed).
        kernel, residual, gated, activation: as for :class:`ConvEncoder`.

    Attributes:
        grid_shape: ``(channels[0], h, w)``, the grid the Linear's output is reshaped to.
        output_layer: the :class:`PixelBias`.

    Example:
        >>> decoder = ConvDecoder(10, (28, 20), channels=(16, 8))
        >>> decoder(torch.zeros(3, 5, 10)).shape
        torch.Size([3, 5, 560])
    """

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 32),
        kernel: int = 3,
        residual: int = 0,
        gated: bool = False,
        activation: str = "relu",
    ) -> None:
        shape = _image_shape(image_shape)
        widths = _check_options(channels, kernel, residual, activation)
        z_dim = _positive_int("z_dim", z_dim)
        super().__init__(shape, widths, int(kernel), int(residual), gated, activation)
        self.z_dim = z_dim
        h, w = self.stage_grid
        self.grid_shape: tuple[int, int, int] = (widths[0], h, w)
        # The Linear is not a convolution, so it keeps its activation when the stages are gated.
        self.entry = nn.Sequential(nn.Linear(self.z_dim, widths[0] * h * w), ACTIVATIONS[activation]())

    def forward(self, z: Tensor) -> Tensor:
        _check_width("ConvDecoder", z, self.z_dim, "z_dim")
        leading = z.shape[:-1]
        batch = math.prod(leading)
        grid = self.entry(z.reshape(batch, self.z_dim)).reshape(batch, *self.grid_shape)
        return self.decode(grid).reshape(*leading, self.x_dim)


class ConvGridDecoder(_Upsampler):
    """A decoder from a spatial grid: ``[..., in_channels, h, w]`` -> ``[..., H*W]`` outputs.

    For a VQ-VAE whose codes form a grid: ``(h, w)`` is the grid of a :class:`ConvEncoder` with
    ``len(channels)`` stages on ``image_shape``, so ``ConvGridDecoder(encoder.grid_shape[0],
    ...)`` decodes ``encoder.grid(x)``. A 3x3 same-padding convolution from ``in_channels`` to
    ``channels[0]`` and the activation replace :class:`ConvDecoder`'s Linear; the rest is the same.

    Arguments:
        in_channels: channels of the input grid (the code width).
        image_shape, channels, kernel, residual, gated, activation: as for :class:`ConvDecoder`.

    Attributes:
        grid_shape: ``(in_channels, h, w)``, the input grid per data point.
        output_layer: the :class:`PixelBias`.

    Example:
        >>> encoder = ConvEncoder((28, 28), channels=(8, 16))
        >>> decoder = ConvGridDecoder(16, (28, 28), channels=(16, 8))
        >>> decoder(encoder.grid(torch.zeros(5, 784))).shape
        torch.Size([5, 784])
    """

    def __init__(
        self,
        in_channels: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 32),
        kernel: int = 3,
        residual: int = 0,
        gated: bool = False,
        activation: str = "relu",
    ) -> None:
        shape = _image_shape(image_shape)
        widths = _check_options(channels, kernel, residual, activation)
        in_channels = _positive_int("in_channels", in_channels)
        super().__init__(shape, widths, int(kernel), int(residual), gated, activation)
        self.grid_shape: tuple[int, int, int] = (in_channels, *self.stage_grid)
        self.entry = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1), ACTIVATIONS[activation]())

    def forward(self, grid: Tensor) -> Tensor:
        if tuple(grid.shape[-3:]) != self.grid_shape or grid.dim() < 3:
            raise InputError(
                f"ConvGridDecoder expects grids [..., {', '.join(map(str, self.grid_shape))}] "
                f"(in_channels, h, w for image_shape {self.image_shape}), got shape {list(grid.shape)}"
            )
        leading = grid.shape[:-3]
        out = self.decode(self.entry(grid.reshape(math.prod(leading), *self.grid_shape)))
        return out.reshape(*leading, self.x_dim)
