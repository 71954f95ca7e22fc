"""The VAE (Kingma & Welling 2014): one Gaussian latent z, any single-site guide family."""

from __future__ import annotations

__all__ = ["FAMILY"]

from elbolab.families.family import ARCHITECTURE_FIELDS, ONE_LATENT_FIELDS, Family
from elbolab.guides import GuideConfig, build_guide
from elbolab.guides.config import SINGLE_SITE
from elbolab.models import VAE, ModelConfig


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> VAE:
    return VAE(x_dim, config.z_dim, likelihood=config.likelihood, obs_scale=config.obs_scale, prior=config.prior,
               pseudo_inputs=config.pseudo_inputs, architecture=config.architecture(image_shape))


def build_vae_guide(config: GuideConfig, model: VAE):
    """An encoder that mirrors the decoder (the MLP's hidden widths, or the convolutions' channels, in
    reverse), as in the VAE paper; a VampPrior mixes its q(z | u_k)."""
    trunk = model.config.architecture(model.image_shape).encoder(model.x_dim)
    guide = build_guide(config, model.x_dim, model.z_dim, model.config.hidden, model.config.activation, trunk=trunk)
    if model.prior is not None:
        model.prior.share_encoder(guide)
    return guide


FAMILY = Family(
    name="vae",
    summary="variational autoencoder: z ~ N(0, I), x ~ p(x|z)",
    model_class=VAE,
    build=build,
    fields=(*ONE_LATENT_FIELDS, *ARCHITECTURE_FIELDS, "prior", "pseudo_inputs"),
    guides=SINGLE_SITE,  # any single-site family: the one latent is z
    build_guide=build_vae_guide,
)
