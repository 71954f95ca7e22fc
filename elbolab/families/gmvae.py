"""The Gaussian-mixture VAE: a mixture prior with a per-point cluster, summed out exactly; clustering reported."""

from __future__ import annotations

__all__ = ["FAMILY"]

from torch import Tensor

from elbolab.families.family import ONE_LATENT_FIELDS, Family, Metrics, importance_metrics
from elbolab.guides import GuideConfig, build_guide
from elbolab.guides.config import SINGLE_SITE
from elbolab.models import GaussianMixtureVAE, ModelConfig


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> GaussianMixtureVAE:
    return GaussianMixtureVAE(x_dim, config.z_dim, config.clusters, config.hidden, likelihood=config.likelihood,
                              activation=config.activation, obs_scale=config.obs_scale)


def build_gmvae_guide(config: GuideConfig, model: GaussianMixtureVAE):
    """An encoder for z alone, with the model's hidden widths: the cluster is summed out, not guided."""
    return build_guide(config, model.x_dim, model.z_dim, model.config.hidden, model.config.activation)


def cluster_metrics(model: GaussianMixtureVAE, guide, x: Tensor, conditions: tuple[Tensor, ...], *, num_samples: int,
                    progress: bool | None, compile: bool = False, labels: Tensor | None = None) -> Metrics:
    """The VAE's metrics, and with labels the clustering accuracy (best matching of clusters to labels)."""
    # elbolab.analysis (ArviZ, matplotlib) and scipy are imported here, not by the CLI's start-up.
    from elbolab.analysis.clustering import cluster_probabilities, clustering_accuracy

    split, run = importance_metrics(model, guide, x, conditions, num_samples=num_samples, progress=progress,
                                    compile=compile)
    clusters = cluster_probabilities(model, guide, x).argmax(-1)
    split["clusters_used"] = float(clusters.unique().numel())
    if labels is not None:
        split["clustering_accuracy"] = clustering_accuracy(clusters.numpy(), labels.cpu().numpy())
    return split, run


FAMILY = Family(
    name="gmvae",
    summary="Gaussian-mixture VAE: c ~ uniform over --clusters, z ~ N(mu_c, sigma_c), x ~ p(x|z); c summed out",
    model_class=GaussianMixtureVAE,
    build=build,
    fields=(*ONE_LATENT_FIELDS, "clusters"),
    guides=SINGLE_SITE,
    build_guide=build_gmvae_guide,
    evaluate=cluster_metrics,
    no_diagnosis=None,
)
