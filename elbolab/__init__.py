"""elbolab: latent-variable generative models in Pyro -- VAEs, ELBO objectives, log p(x), diagnostics."""

from elbolab.data import DataConfig, Dataset, load_dataset
from elbolab.errors import InputError
from elbolab.guides import (
    AutoAmortizedGuide,
    BottomUpGuide,
    ConditionalGuide,
    FlowGuide,
    GaussianGuide,
    LadderGuide,
    MixtureGuide,
    NearestCodeGuide,
)
from elbolab.inference import (
    ELBO,
    FitConfig,
    fit,
    get_objective,
    importance_estimate,
    log_likelihood,
)
from elbolab.models import (
    VAE,
    VQVAE,
    Autoencoder,
    ConditionalVAE,
    HierarchicalVAE,
    Latent,
    LatentModel,
    ModelConfig,
)
from elbolab.runs import Run, RunConfig, load_run, save_run
from elbolab.version import __version__

__all__ = [
    "ELBO",
    "VAE",
    "VQVAE",
    "AutoAmortizedGuide",
    "Autoencoder",
    "BottomUpGuide",
    "ConditionalGuide",
    "ConditionalVAE",
    "DataConfig",
    "Dataset",
    "FitConfig",
    "FlowGuide",
    "GaussianGuide",
    "HierarchicalVAE",
    "InputError",
    "LadderGuide",
    "Latent",
    "LatentModel",
    "MixtureGuide",
    "ModelConfig",
    "NearestCodeGuide",
    "Run",
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
