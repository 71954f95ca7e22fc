"""Pyro models that follow the model contract (see DESIGN.md)."""

from elbolab.errors import InputError
from elbolab.models.cvae import ConditionalVAE, as_condition
from elbolab.models.hierarchical import HierarchicalVAE
from elbolab.models.latent import Latent, LatentModel
from elbolab.models.vae import LIKELIHOODS, VAE, Autoencoder, Likelihood, ModelConfig
from elbolab.models.vqvae import VQVAE, Codebook, UniformCodebook

__all__ = [
    "LIKELIHOODS",
    "MODELS",
    "VAE",
    "VQVAE",
    "Autoencoder",
    "Codebook",
    "ConditionalVAE",
    "HierarchicalVAE",
    "Latent",
    "LatentModel",
    "Likelihood",
    "ModelConfig",
    "UniformCodebook",
    "as_condition",
    "build_model",
]

MODELS = {"vae": VAE, "cvae": ConditionalVAE, "hvae": HierarchicalVAE, "vqvae": VQVAE, "autoencoder": Autoencoder}


def build_model(config: ModelConfig, x_dim: int, y_dim: int | None = None) -> VAE | ConditionalVAE | HierarchicalVAE | VQVAE | Autoencoder:
    """The model a :class:`ModelConfig` describes, for data of width ``x_dim`` (and ``y_dim`` classes, for ``cvae``)."""
    c = config
    common = {"likelihood": c.likelihood, "activation": c.activation, "obs_scale": c.obs_scale}
    if c.name == "cvae":
        if y_dim is None:
            raise InputError("a cvae needs y_dim, the number of classes it is conditioned on")
        return ConditionalVAE(x_dim, y_dim, c.z_dim, c.hidden, **common)
    if c.name == "hvae":
        return HierarchicalVAE(x_dim, c.z_dims, c.hidden, c.hidden_upper, **common)
    if c.name == "vqvae":
        return VQVAE(x_dim, c.codebook_size, c.z_dim, c.num_codes, c.hidden, commitment=c.commitment, **common)
    return MODELS[c.name](x_dim, c.z_dim, c.hidden, **common)
