"""Which networks a model's decoder and its guide's encoder are: a multilayer perceptron or convolutions.

One description, :class:`Architecture`, builds both sides, so that encoder and decoder mirror
each other (the decoder runs the encoder's widths, or channels, in reverse) and every guide
family puts its head on the same encoder trunk:

- ``mlp``: ``Linear -> activation`` per hidden width (Kingma & Welling 2014; Burda et al. 2016);
- ``conv``: stride-2 convolutions per channel width, optionally gated (van den Berg et al. 2018)
  and with residual blocks, and transposed convolutions back (:mod:`elbolab.nn.conv`); for image
  data only.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "Architecture", "output_layer"]

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from elbolab.errors import InputError, closest_names
from elbolab.nn.conv import ConvDecoder, ConvEncoder, ConvGridDecoder, grid_size
from elbolab.nn.mlp import mlp

ARCHITECTURES = ("mlp", "conv")


@dataclass(frozen=True)
class Architecture:
    """The networks of a model and its guide.

    Attributes:
        kind: ``"mlp"`` or ``"conv"``.
        hidden: MLP hidden widths, encoder-side (the decoder runs them reversed).
        activation: a key of :data:`elbolab.nn.ACTIVATIONS`.
        image_shape: ``(height, width)`` of the data's images; ``conv`` needs it.
        channels: ``conv``: channels of the encoder's stages, each halving the image (the
            decoder runs them reversed).
        kernel: ``conv``: the convolutions' kernel size (odd).
        residual_blocks: ``conv``: residual blocks after each stage.
        gated: ``conv``: gated convolutions, ``conv_h(x) * sigmoid(conv_g(x))``.
    """

    kind: str = "mlp"
    hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    image_shape: tuple[int, int] | None = None
    channels: tuple[int, ...] = (32, 64)
    kernel: int = 3
    residual_blocks: int = 0
    gated: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.kind!r}; {closest_names(self.kind, ARCHITECTURES)}")
        if self.kind == "conv" and self.image_shape is None:
            raise InputError("the conv architecture is for images, and these data have no image shape: use --arch mlp")

    def encoder(self, x_dim: int, side_dim: int = 0) -> nn.Module:
        """The encoder's trunk: ``[..., x_dim]`` -> ``[..., F]`` features, on which a guide puts its head.

        ``side_dim``: the inputs are ``[x, c]`` with ``side_dim`` columns of a condition ``c`` after
        the data (a conditional VAE's one-hot labels): the MLP reads both, the convolutions read
        ``x`` and the condition joins their features.
        """
        if self.kind == "mlp":
            return mlp(x_dim + side_dim, self.hidden, None, self.activation)
        self._check_width(x_dim)
        trunk = ConvEncoder(self.image_shape, self.channels, self.kernel, self.residual_blocks, self.gated, self.activation)
        return WithSideInputs(trunk, x_dim, side_dim) if side_dim else trunk

    def decoder(self, in_dim: int, x_dim: int) -> nn.Module:
        """The decoder: ``[..., in_dim]`` -> ``[..., x_dim]`` parameters of ``p(x | .)``."""
        if self.kind == "mlp":
            return mlp(in_dim, tuple(reversed(self.hidden)), x_dim, self.activation)
        self._check_width(x_dim)
        return ConvDecoder(in_dim, self.image_shape, tuple(reversed(self.channels)), self.kernel, self.residual_blocks,
                           self.gated, self.activation)

    def code_cells(self, num_codes: int) -> int:
        """How many code vectors a VQ-VAE's encoder gives per data point: ``num_codes`` for the MLP,
        the cells of the last stage's grid (h x w) for the convolutions, which give one code per cell."""
        if self.kind == "mlp":
            return num_codes
        height, width = grid_size(self.image_shape, len(self.channels))
        return height * width

    def code_encoder(self, x_dim: int, code_dim: int, num_codes: int) -> nn.Module:
        """A VQ-VAE's encoder: ``[..., x_dim]`` -> ``[..., M * code_dim]``, M code vectors (``code_cells``) one after another."""
        if self.kind == "mlp":
            return mlp(x_dim, self.hidden, num_codes * code_dim, self.activation)
        self._check_width(x_dim)
        trunk = ConvEncoder(self.image_shape, self.channels, self.kernel, self.residual_blocks, self.gated, self.activation)
        return GridCodeEncoder(trunk, code_dim)

    def code_decoder(self, code_dim: int, num_codes: int, x_dim: int) -> nn.Module:
        """A VQ-VAE's decoder: ``[..., M * code_dim]`` -> ``[..., x_dim]``; the convolutions read the codes as their grid."""
        if self.kind == "mlp":
            return mlp(num_codes * code_dim, tuple(reversed(self.hidden)), x_dim, self.activation)
        self._check_width(x_dim)
        return GridCodeDecoder(ConvGridDecoder(code_dim, self.image_shape, tuple(reversed(self.channels)), self.kernel,
                                               self.residual_blocks, self.gated, self.activation), code_dim)

    def _check_width(self, x_dim: int) -> None:
        height, width = self.image_shape
        if height * width != x_dim:
            raise InputError(f"image_shape {self.image_shape} has {height * width} pixels, but the data have {x_dim} columns")


class WithSideInputs(nn.Module):
    """``[x, c] -> [trunk(x), c]``: an image trunk on the first ``x_dim`` columns, the condition passed beside its features."""

    def __init__(self, trunk: nn.Module, x_dim: int, side_dim: int) -> None:
        super().__init__()
        self.trunk, self.x_dim, self.side_dim = trunk, x_dim, side_dim
        self.out_features = trunk.out_features + side_dim

    def forward(self, inputs: Tensor) -> Tensor:
        x, side = inputs.split((self.x_dim, self.side_dim), dim=-1)
        return torch.cat([self.trunk(x), side], dim=-1)


class GridCodeEncoder(nn.Module):
    """Convolutions, then a 1x1 convolution to ``code_dim`` channels: one code vector per cell of the
    last grid, as in the VQ-VAE paper (van den Oord et al. 2017, section 4.1), flattened cell by cell."""

    def __init__(self, trunk: ConvEncoder, code_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.to_codes = nn.Conv2d(trunk.grid_shape[0], code_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        grid = self.trunk.grid(x)  # [..., C, h, w]
        leading = grid.shape[:-3]
        codes = self.to_codes(grid.reshape(-1, *grid.shape[-3:]))  # [B, code_dim, h, w]
        return codes.permute(0, 2, 3, 1).reshape(*leading, -1)


class GridCodeDecoder(nn.Module):
    """``[..., h * w * code_dim]`` codes, cell by cell, read back as their ``[code_dim, h, w]`` grid and decoded."""

    def __init__(self, grid_decoder: ConvGridDecoder, code_dim: int) -> None:
        super().__init__()
        self.grid_decoder, self.code_dim = grid_decoder, code_dim
        self.output_layer = grid_decoder.output_layer

    def forward(self, codes: Tensor) -> Tensor:
        _, height, width = self.grid_decoder.grid_shape
        grid = codes.reshape(*codes.shape[:-1], height, width, self.code_dim)
        return self.grid_decoder(grid.movedim(-1, -3))


def output_layer(decoder: nn.Module) -> nn.Module | None:
    """The decoder's last layer, whose ``bias`` (one per output) starts at the data's mean: its
    ``output_layer``, or the last layer of an ``nn.Sequential`` (``None`` for a module with neither)."""
    if hasattr(decoder, "output_layer"):
        return decoder.output_layer
    return decoder[-1] if isinstance(decoder, nn.Sequential) and len(decoder) else None
