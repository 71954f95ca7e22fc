"""The deterministic autoencoder: no latent variables, trained on its reconstruction loss alone."""

from __future__ import annotations

__all__ = ["FAMILY"]

from typing import Any

import pyro
import torch
from torch import Tensor

from elbolab.families.family import ONE_LATENT_FIELDS, Family, Metrics
from elbolab.guides import GuideConfig
from elbolab.inference.objectives import Reconstruction
from elbolab.models import Autoencoder, ModelConfig


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> Autoencoder:
    return Autoencoder(x_dim, config.z_dim, config.hidden, likelihood=config.likelihood,
                       activation=config.activation, obs_scale=config.obs_scale)


def no_guide(config: GuideConfig, model: Autoencoder) -> None:
    return None


def reconstruction_metrics(model: Autoencoder, guide: Any, x: Tensor, conditions: tuple[Tensor, ...], *,
                           num_samples: int, progress: bool | None, compile: bool = False,
                       labels: Tensor | None = None) -> Metrics:
    """-log p(x | decoder(encoder(x))) per data point: there is no ELBO and no log p(x) to report (one pass, eager)."""
    with torch.no_grad(), pyro.validation_enabled(False):
        loss = sum(Reconstruction().differentiable_loss(model, None, chunk).item() for chunk in x.split(1000))
    return {"reconstruction_loss": loss / x.shape[0]}, {}


FAMILY = Family(
    name="autoencoder",
    summary="deterministic autoencoder (no latent variables; for contrast)",
    model_class=Autoencoder,
    build=build,
    fields=ONE_LATENT_FIELDS,
    guides=("none",),
    build_guide=no_guide,
    objectives=("reconstruction",),
    objective_refusal="the autoencoder has no latent variables and no ELBO: use --objective reconstruction",
    evaluate=reconstruction_metrics,
    sample=None,
    no_diagnosis="it has no posterior q(z|x) to diagnose",
)
