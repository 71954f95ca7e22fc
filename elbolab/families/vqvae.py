"""The VQ-VAE (van den Oord et al. 2017): M codes per point, each one of K learned codebook vectors."""

from __future__ import annotations

__all__ = ["FAMILY", "code_metrics"]

import math

import torch
from torch import Tensor

from elbolab.errors import InputError
from elbolab.families.family import ARCHITECTURE_FIELDS, ONE_LATENT_FIELDS, Family, Metrics
from elbolab.guides import GuideConfig, NearestCodeGuide
from elbolab.inference import importance_estimate
from elbolab.models import VQVAE, ModelConfig
from elbolab.models.vqvae import code_usage


def check_codebook(config: ModelConfig) -> ModelConfig:
    if config.codebook_size < 2:
        raise InputError(f"codebook_size must be at least 2, got {config.codebook_size}")
    return config


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> VQVAE:
    check_codebook(config)
    return VQVAE(x_dim, config.codebook_size, config.z_dim, config.num_codes, commitment=config.commitment,
                 likelihood=config.likelihood, obs_scale=config.obs_scale, architecture=config.architecture(image_shape))


def nearest_code_guide(config: GuideConfig, model: VQVAE) -> NearestCodeGuide:
    return NearestCodeGuide(model)


def code_metrics(model: VQVAE, guide: NearestCodeGuide, x: Tensor, conditions: tuple[Tensor, ...], *,
                 num_samples: int, progress: bool | None, compile: bool = False,
                       labels: Tensor | None = None) -> Metrics:
    """A VQ-VAE's evaluation: its exact ELBO, reconstruction error and the information in its codes.

    The posterior is one-hot, so one sample gives the ELBO exactly, and the importance-sampled
    log p(x) is that same ELBO (log p(x) >= ELBO is all one can say). ``code_bits_per_code`` is the
    entropy of the codes' empirical distribution over the split, in bits per code entry (at most
    log2 K, reached when every code is used equally); ``rate_bits`` is the KL of the one-hot
    posterior to the uniform prior, M log2 K bits per data point.
    """
    estimate = importance_estimate(model, guide, x, num_samples=1, progress=progress, compile=compile)
    codes = torch.cat([guide.codes(chunk) for chunk in x.split(4096)])
    usage = code_usage(torch.bincount(codes.reshape(-1), minlength=guide.codebook.size).float())
    elbo = estimate.elbo.mean().item()
    split = {
        "elbo": elbo,
        "reconstruction_loss": -estimate.reconstruction.mean().item(),
        "bits_per_dim": -elbo / (x.shape[1] * math.log(2)),
        "code_bits_per_code": usage["code_bits"],
        "perplexity": usage["perplexity"],
        "codes_used": usage["codes_used"],
    }
    return split, {"rate_bits": guide.num_codes * math.log2(guide.codebook.size)}


FAMILY = Family(
    name="vqvae",
    summary="vector-quantized VAE: --num-codes codes per point from a codebook of --codebook-size vectors",
    model_class=VQVAE,
    build=build,
    fields=(*ONE_LATENT_FIELDS, "codebook_size", "num_codes", "commitment", *ARCHITECTURE_FIELDS),
    guides=("nearest-code",),
    build_guide=nearest_code_guide,
    objectives=("elbo",),
    objective_refusal="the vqvae's posterior is one-hot (deterministic): every objective reduces to its ELBO, so it "
    "trains with --objective elbo",
    evaluate=code_metrics,
    normalize=check_codebook,
    no_diagnosis="its posterior is one-hot, every importance weight is the same, and there is nothing for k-hat to "
    "diagnose; use elbolab evaluate",
)
