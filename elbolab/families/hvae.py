"""The hierarchical VAE (Burda et al. 2016; Sønderby et al. 2016): several stochastic layers z1 ... zL."""

from __future__ import annotations

__all__ = ["FAMILY"]

from dataclasses import replace

from elbolab.errors import InputError
from elbolab.families.family import ARCHITECTURE_FIELDS, COMMON_FIELDS, Family
from elbolab.guides import BottomUpGuide, GuideConfig, LadderGuide
from elbolab.models import HierarchicalVAE, ModelConfig


def with_layers(config: ModelConfig) -> ModelConfig:
    """Two stochastic layers of widths 50, 20 unless given, as in the IWAE paper; upper networks as wide as the lower."""
    config = replace(config, z_dims=config.z_dims or (50, 20), hidden_upper=config.hidden_upper or config.hidden)
    if len(config.z_dims) < 2:
        raise InputError(f"an hvae needs two or more stochastic layers in z_dims, got {config.z_dims}")
    return config


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> HierarchicalVAE:
    config = with_layers(config)
    return HierarchicalVAE(x_dim, config.z_dims, hidden_upper=config.hidden_upper, likelihood=config.likelihood,
                           obs_scale=config.obs_scale, architecture=config.architecture(image_shape))


def build_hvae_guide(config: GuideConfig, model: HierarchicalVAE):
    if config.family == "ladder":
        return LadderGuide(model)
    c = model.config
    trunk = c.architecture(model.image_shape).encoder(model.x_dim)
    return BottomUpGuide(model.x_dim, model.z_dims, c.hidden, c.hidden_upper, c.activation, trunk=trunk)


FAMILY = Family(
    name="hvae",
    summary="hierarchical VAE: several stochastic layers (--z-dims), drawn from the top down",
    model_class=HierarchicalVAE,
    build=build,
    fields=(*COMMON_FIELDS, "z_dims", "hidden_upper", *ARCHITECTURE_FIELDS),
    # Bottom-up first: on binarized MNIST under iwae (K = 5, 20 epochs) it beats the ladder guide by
    # 6 nats of test log-likelihood (benchmarks/RESULTS.md).
    guides=("bottom-up", "ladder"),
    build_guide=build_hvae_guide,
    normalize=with_layers,
)
