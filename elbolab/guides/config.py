"""The ``[guide]`` section of a run's config, and the single-site guide families.

Which guide families a built-in model takes, and how its guide is built from this section, is
its family's entry in :mod:`elbolab.families`.
"""

from __future__ import annotations

__all__ = ["GUIDE_CLASSES", "SINGLE_SITE", "GuideConfig", "build_guide"]

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from elbolab.config import dataclass_from_dict, is_integer
from elbolab.errors import InputError, closest_names
from elbolab.guides.flow import FLOWS, FlowGuide
from elbolab.guides.gaussian import GaussianGuide
from elbolab.guides.mixture import MixtureGuide

# family name -> guide class; every class takes (x_dim, z_dim, hidden=..., activation=..., **its options)
GUIDE_CLASSES: dict[str, type[nn.Module]] = {"gaussian": GaussianGuide, "mixture": MixtureGuide, "flow": FlowGuide}
SINGLE_SITE = tuple(GUIDE_CLASSES)  # families for a model with one latent site


@dataclass
class GuideConfig:
    """Which variational family q(z | x) is: the ``[guide]`` section.

    Attributes:
        family: ``"gaussian"`` (diagonal), ``"mixture"``, ``"flow"``, ``"ladder"``, ``"bottom-up"``,
            ``"nearest-code"``, or ``None`` for the model's default (its family's first guide);
            which a model takes is its family's (:mod:`elbolab.families`), which checks the name.
        components: mixture only: number of diagonal-Gaussian components.
        flow: flow only: one of :data:`elbolab.guides.FLOWS`.
        flow_depth: flow only: number of flow layers.
    """

    family: str | None = None
    components: int = 5
    flow: str = "iaf"
    flow_depth: int = 4

    def __post_init__(self) -> None:
        if self.family is not None and not isinstance(self.family, str):
            raise InputError(f"guide family must be a name, got {self.family!r}")
        if self.flow not in FLOWS:
            raise InputError(f"unknown flow {self.flow!r}; {closest_names(self.flow, FLOWS)}")
        for name in ("components", "flow_depth"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> GuideConfig:
        return dataclass_from_dict(cls, values, source)


def build_guide(config: GuideConfig, x_dim: int, z_dim: int, hidden: tuple[int, ...], activation: str = "relu",
                trunk: nn.Module | None = None) -> nn.Module:
    """The guide of ``config``'s family for a model with one latent site ``"z"`` of width ``z_dim``.

    The encoder has the model's hidden widths (the decoder runs them reversed), as in the VAE paper,
    or is ``trunk`` (``[N, x_dim] -> [N, F]``, a convolutional one) with the family's head on it.
    """
    options = {
        "gaussian": {},
        "mixture": {"components": config.components},
        "flow": {"flow": config.flow, "flow_depth": config.flow_depth},
    }[config.family]
    return GUIDE_CLASSES[config.family](x_dim, z_dim, hidden=hidden, activation=activation, trunk=trunk, **options)
