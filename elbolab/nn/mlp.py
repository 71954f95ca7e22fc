"""A multilayer perceptron, and the Gaussian encoder head every guide builds on.

The encoder's trunk may be any module mapping ``[N, D]`` to ``[N, F]`` features (a
convolutional one from :mod:`elbolab.nn.conv`): the head only needs ``F``.
"""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "GaussianEncoder", "mlp", "trunk_width"]

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbolab.errors import InputError, closest_names

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "leaky-relu": nn.LeakyReLU,
}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int | None, activation: str = "relu") -> nn.Sequential:
    """``Linear -> activation`` for each hidden width, then a final ``Linear`` to ``out_dim``.

    With ``out_dim=None`` the network ends on the last hidden activation (an encoder trunk).
    """
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; {closest_names(activation, ACTIVATIONS)}")
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


@torch.no_grad()
def trunk_width(trunk: nn.Module, x_dim: int) -> int:
    """The width F of the features a trunk gives for ``[1, x_dim]`` inputs (its ``out_features`` when it says)."""
    width = getattr(trunk, "out_features", None)
    if isinstance(width, int):
        return width
    parameter = next(trunk.parameters(), None)
    probe = torch.zeros(1, x_dim) if parameter is None else torch.zeros(1, x_dim, dtype=parameter.dtype, device=parameter.device)
    features = trunk(probe)
    if features.ndim != 2 or features.shape[0] != 1:
        raise InputError(f"an encoder trunk must map [N, {x_dim}] inputs to [N, F] features; it gave {tuple(features.shape)} for N = 1")
    return int(features.shape[-1])


class GaussianEncoder(nn.Module):
    """``x -> (loc, scale)`` of a diagonal Gaussian: an MLP trunk and one linear head.

    The scale is ``softplus(raw) + min_scale``: smooth, positive, and bounded away from zero so
    that ``log q`` never overflows (a clamped log-variance has zero gradient past the clamp).

    Arguments:
        x_dim: input width.
        z_dim: latent width.
        hidden: hidden widths of the trunk.
        activation: a key of :data:`ACTIVATIONS`.
        min_scale: lower bound of the scale.
        trunk: a module ``[N, x_dim] -> [N, F]`` to use as the trunk instead of the MLP of
            ``hidden`` (e.g. a :class:`~elbolab.nn.conv.ConvEncoder`).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        min_scale: float = 1e-4,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk if trunk is not None else mlp(x_dim, hidden, None, activation)
        self.head = nn.Linear(trunk_width(self.trunk, x_dim) if trunk is not None else (hidden[-1] if hidden else x_dim), 2 * z_dim)
        self.z_dim = z_dim
        self.min_scale = min_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.loc_scale(self.head(self.trunk(x)))

    def loc_scale(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of the head's output ``[N, 2 z_dim]``."""
        loc, raw_scale = out.split(self.z_dim, dim=-1)
        return loc, F.softplus(raw_scale) + self.min_scale
