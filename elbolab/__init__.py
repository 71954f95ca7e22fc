"""elbolab: latent-variable generative models in Pyro -- VAEs, ELBO objectives, log p(x), diagnostics."""

__version__ = "0.1.0"

from elbolab.data import DataConfig, Dataset, load_dataset
from elbolab.errors import InputError
from elbolab.guides import AutoAmortizedGuide, FlowGuide, GaussianGuide, MixtureGuide
from elbolab.inference import (
    ELBO,
    FitConfig,
    RunConfig,
    fit,
    get_objective,
    importance_estimate,
    load_run,
    log_likelihood,
    save_run,
)
from elbolab.models import VAE, Autoencoder, Latent, LatentModel, ModelConfig

__all__ = [
    "ELBO",
    "VAE",
    "AutoAmortizedGuide",
    "Autoencoder",
    "DataConfig",
    "Dataset",
    "FitConfig",
    "FlowGuide",
    "GaussianGuide",
    "InputError",
    "Latent",
    "LatentModel",
    "MixtureGuide",
    "ModelConfig",
    "RunConfig",
    "__version__",
    "fit",
    "get_objective",
    "importance_estimate",
    "load_dataset",
    "load_run",
    "log_likelihood",
    "save_run",
]
