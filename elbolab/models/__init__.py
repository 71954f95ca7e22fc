"""Pyro models that follow the model contract (docs/architecture.md); the families that name them are in :mod:`elbolab.families`."""

from elbolab.models.cvae import ConditionalVAE, as_condition
from elbolab.models.hierarchical import HierarchicalVAE
from elbolab.models.latent import Latent, LatentModel
from elbolab.models.mixture import GaussianMixtureVAE
from elbolab.models.semisupervised import SemiSupervisedVAE, keep_labels
from elbolab.models.vae import (
    LIKELIHOODS,
    VAE,
    Autoencoder,
    Likelihood,
    ModelConfig,
    check_likelihood,
)
from elbolab.models.vqvae import VQVAE, Codebook, UniformCodebook

__all__ = [
    "LIKELIHOODS",
    "VAE",
    "VQVAE",
    "Autoencoder",
    "Codebook",
    "ConditionalVAE",
    "GaussianMixtureVAE",
    "HierarchicalVAE",
    "Latent",
    "LatentModel",
    "Likelihood",
    "ModelConfig",
    "SemiSupervisedVAE",
    "UniformCodebook",
    "as_condition",
    "check_likelihood",
    "keep_labels",
]
