"""elbolab: latent-variable generative models in Pyro -- VAEs, ELBO objectives, log p(x), diagnostics."""

__version__ = "0.1.0"

from elbolab.data import DataConfig, Dataset, load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
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
from elbolab.models import VAE, Autoencoder, ModelConfig

__all__ = [
    "ELBO",
    "VAE",
    "Autoencoder",
    "DataConfig",
    "Dataset",
    "FitConfig",
    "GaussianGuide",
    "InputError",
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
