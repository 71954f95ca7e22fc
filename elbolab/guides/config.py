"""The ``[guide]`` section of a run's config, and the guide elbolab pairs with a built-in model.

Which families a model takes: one-latent models (``vae``, ``cvae``) any of the single-site families
(Gaussian, mixture, flow; the conditional VAE's wrapped in a :class:`ConditionalGuide`); the
hierarchical VAE a ladder or a bottom-up guide; the VQ-VAE its nearest-code quantizer.
"""

from __future__ import annotations

__all__ = ["GUIDE_CLASSES", "GUIDE_FAMILIES", "MODEL_GUIDES", "GuideConfig", "build_guide", "build_model_guide"]

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from elbolab.config import dataclass_from_dict, is_integer
from elbolab.errors import InputError, closest_names
from elbolab.guides.conditional import ConditionalGuide
from elbolab.guides.flow import FLOWS, FlowGuide
from elbolab.guides.gaussian import GaussianGuide
from elbolab.guides.hierarchical import BottomUpGuide, LadderGuide
from elbolab.guides.mixture import MixtureGuide
from elbolab.guides.quantizer import NearestCodeGuide
from elbolab.models import VQVAE, ConditionalVAE, HierarchicalVAE

# family name -> guide class; every class takes (x_dim, z_dim, hidden=..., activation=..., **its options)
GUIDE_CLASSES: dict[str, type[nn.Module]] = {"gaussian": GaussianGuide, "mixture": MixtureGuide, "flow": FlowGuide}
SINGLE_SITE = tuple(GUIDE_CLASSES)
# model name -> the guide families it takes, its default first
MODEL_GUIDES: dict[str, tuple[str, ...]] = {
    "vae": SINGLE_SITE,
    "cvae": SINGLE_SITE,
    # Bottom-up first: on binarized MNIST under iwae (K = 5, 20 epochs) it beats the ladder guide by
    # 6 nats of test log-likelihood (benchmarks/RESULTS.md).
    "hvae": ("bottom-up", "ladder"),
    "vqvae": ("nearest-code",),
    "autoencoder": ("none",),
}
GUIDE_FAMILIES = tuple(dict.fromkeys(family for families in MODEL_GUIDES.values() for family in families))


@dataclass
class GuideConfig:
    """Which variational family q(z | x) is: the ``[guide]`` section.

    Attributes:
        family: ``"gaussian"`` (diagonal), ``"mixture"``, ``"flow"``, ``"ladder"``, ``"bottom-up"``,
            ``"nearest-code"``, or ``None`` for the model's default (see :data:`MODEL_GUIDES`).
        components: mixture only: number of diagonal-Gaussian components.
        flow: flow only: one of :data:`elbolab.guides.FLOWS`.
        flow_depth: flow only: number of flow layers.
    """

    family: str | None = None
    components: int = 5
    flow: str = "iaf"
    flow_depth: int = 4

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in GUIDE_FAMILIES:
            raise InputError(f"unknown guide {self.family!r}; {closest_names(self.family, GUIDE_FAMILIES)}")
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


def build_guide(config: GuideConfig, x_dim: int, z_dim: int, hidden: tuple[int, ...], activation: str = "relu") -> nn.Module:
    """The guide of ``config``'s family for a model with one latent site ``"z"`` of width ``z_dim``.

    The encoder has the model's hidden widths (the decoder runs them reversed), as in the VAE paper.
    """
    options = {
        "gaussian": {},
        "mixture": {"components": config.components},
        "flow": {"flow": config.flow, "depth": config.flow_depth},
    }[config.family]
    return GUIDE_CLASSES[config.family](x_dim, z_dim, hidden=hidden, activation=activation, **options)


def build_model_guide(config: GuideConfig, model: nn.Module) -> nn.Module | None:
    """The guide of ``config``'s family for a built-in model (``None`` for the autoencoder).

    Single-site families get an encoder with the model's hidden widths (the decoder runs them
    reversed), as in the VAE paper; the ladder and nearest-code guides share networks with the model.
    """
    model_config = model.config
    family = config.family or MODEL_GUIDES[model_config.name][0]
    if family not in MODEL_GUIDES[model_config.name]:
        raise InputError(
            f"the {model_config.name} model takes the guides {', '.join(MODEL_GUIDES[model_config.name])}, not {family!r}"
        )
    if family == "none":
        return None
    if isinstance(model, HierarchicalVAE):
        if family == "ladder":
            return LadderGuide(model)
        return BottomUpGuide(model.x_dim, model.z_dims, model_config.hidden, model_config.hidden_upper, model_config.activation)
    if isinstance(model, VQVAE):
        return NearestCodeGuide(model)
    options = replace(config, family=family)
    if isinstance(model, ConditionalVAE):
        inner = build_guide(options, model.x_dim + model.y_dim, model.z_dim, model_config.hidden, model_config.activation)
        return ConditionalGuide(inner, model.y_dim)
    return build_guide(options, model.x_dim, model.z_dim, model_config.hidden, model_config.activation)
