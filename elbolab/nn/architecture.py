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

from torch import nn

from elbolab.errors import InputError, closest_names
from elbolab.nn.conv import ConvDecoder, ConvEncoder
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

    def encoder(self, x_dim: int) -> nn.Module:
        """The encoder's trunk: ``[..., x_dim]`` -> ``[..., F]`` features, on which a guide puts its head."""
        if self.kind == "mlp":
            return mlp(x_dim, self.hidden, None, self.activation)
        self._check_width(x_dim)
        return ConvEncoder(self.image_shape, self.channels, self.kernel, self.residual_blocks, self.gated, self.activation)

    def decoder(self, in_dim: int, x_dim: int) -> nn.Module:
        """The decoder: ``[..., in_dim]`` -> ``[..., x_dim]`` parameters of ``p(x | .)``."""
        if self.kind == "mlp":
            return mlp(in_dim, tuple(reversed(self.hidden)), x_dim, self.activation)
        self._check_width(x_dim)
        return ConvDecoder(in_dim, self.image_shape, tuple(reversed(self.channels)), self.kernel, self.residual_blocks,
                           self.gated, self.activation)

    def _check_width(self, x_dim: int) -> None:
        height, width = self.image_shape
        if height * width != x_dim:
            raise InputError(f"image_shape {self.image_shape} has {height * width} pixels, but the data have {x_dim} columns")


def output_layer(decoder: nn.Module) -> nn.Module:
    """The decoder's last layer, whose ``bias`` (one per output) starts at the data's mean."""
    return decoder.output_layer if hasattr(decoder, "output_layer") else decoder[-1]
