"""Pyro models that follow the model contract (see DESIGN.md)."""

from elbolab.models.latent import Latent, LatentModel
from elbolab.models.vae import LIKELIHOODS, VAE, Autoencoder, Likelihood, ModelConfig

__all__ = [
    "LIKELIHOODS",
    "MODELS",
    "VAE",
    "Autoencoder",
    "Latent",
    "LatentModel",
    "Likelihood",
    "ModelConfig",
    "build_model",
]

MODELS = {"vae": VAE, "autoencoder": Autoencoder}


def build_model(config: ModelConfig, x_dim: int) -> VAE | Autoencoder:
    """The model a :class:`ModelConfig` describes, for data of width ``x_dim``."""
    return MODELS[config.name](
        x_dim, config.z_dim, config.hidden, config.likelihood, config.activation, config.obs_scale
    )
