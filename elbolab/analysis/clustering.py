"""Clusters of a mixture-prior model, and how well they match known labels.

A model with a per-point cluster summed out (:class:`~elbolab.models.GaussianMixtureVAE`) has
a posterior over clusters ``p(c | x) = E_{p(z | x)}[p(c | z)]``; :func:`cluster_probabilities`
estimates it with draws of the guide. :func:`clustering_accuracy` is the unsupervised accuracy of
the clustering literature (e.g. VaDE, Jiang et al. 2017): the fraction of points whose cluster,
mapped to a label, is their label, under the best mapping. With no more clusters than labels
the mapping is one-to-one (the Hungarian algorithm, scipy's ``linear_sum_assignment``); with
more, each cluster takes its most frequent label (many-to-one), as is usual when the number of
clusters exceeds the number of classes.
"""

from __future__ import annotations

__all__ = ["cluster_probabilities", "clustering_accuracy"]

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elbolab.analysis.latent import latent_draws
from elbolab.errors import InputError


@torch.no_grad()
def cluster_probabilities(model: Any, guide: Callable[..., Any], x: Tensor, *, num_samples: int = 16) -> Tensor:
    """``p(c | x)`` per point, ``[N, clusters]``: ``p(c | z)`` averaged over ``num_samples`` draws ``z ~ q(z | x)``.

    ``model`` must have ``cluster_log_posterior(z)`` (as :class:`~elbolab.models.GaussianMixtureVAE` has).
    """
    if not callable(getattr(model, "cluster_log_posterior", None)):
        raise InputError(f"{type(model).__name__} has no clusters (no cluster_log_posterior(z)): use a GaussianMixtureVAE")
    z = latent_draws(guide, x, num_samples=num_samples)["z"]  # [S, N, z_dim]
    return model.cluster_log_posterior(z).exp().mean(0).cpu()


def clustering_accuracy(clusters: Any, labels: Any) -> float:
    """The fraction of points whose cluster maps to their label, under the best mapping (see the module docstring).

    Example:
        >>> clustering_accuracy([0, 0, 1, 1], [3, 3, 5, 5])
        1.0
    """
    clusters, labels = np.asarray(clusters).reshape(-1), np.asarray(labels).reshape(-1)
    if clusters.shape != labels.shape or clusters.size == 0:
        raise InputError(f"clustering_accuracy needs one cluster per label, got {clusters.size} clusters and {labels.size} labels")
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    label_ids, label_index = np.unique(labels, return_inverse=True)
    counts = np.zeros((cluster_ids.size, label_ids.size), dtype=np.int64)
    np.add.at(counts, (cluster_index, label_index), 1)
    if cluster_ids.size <= label_ids.size:
        from scipy.optimize import linear_sum_assignment  # 0.4 s to import: only when matching

        rows, columns = linear_sum_assignment(counts, maximize=True)
        matched = counts[rows, columns].sum()
    else:
        matched = counts.max(1).sum()
    return float(matched / clusters.size)
