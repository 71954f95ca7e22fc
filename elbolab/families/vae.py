"""The VAE (Kingma & Welling 2014): one Gaussian latent z, any single-site guide family."""

from __future__ import annotations

__all__ = ["FAMILY"]

from elbolab.families.family import ONE_LATENT_FIELDS, Family
from elbolab.guides import GuideConfig, build_guide
from elbolab.guides.config import SINGLE_SITE
from elbolab.models import VAE, ModelConfig


def build(config: ModelConfig, x_dim: int, num_classes: int | None) -> VAE:
    return VAE(x_dim, config.z_dim, config.hidden, likelihood=config.likelihood, activation=config.activation,
               obs_scale=config.obs_scale)


def build_vae_guide(config: GuideConfig, model: VAE):
    """An encoder with the model's hidden widths (the decoder runs them reversed), as in the VAE paper."""
    return build_guide(config, model.x_dim, model.z_dim, model.config.hidden, model.config.activation)


FAMILY = Family(
    name="vae",
    summary="variational autoencoder: z ~ N(0, I), x ~ p(x|z)",
    model_class=VAE,
    build=build,
    fields=ONE_LATENT_FIELDS,
    guides=SINGLE_SITE,  # any single-site family: the one latent is z
    build_guide=build_vae_guide,
)
