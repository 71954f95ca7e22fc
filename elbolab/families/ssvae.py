"""The semi-supervised VAE (Kingma et al. 2014, M2): labels for some training points, a classifier learned from all."""

from __future__ import annotations

__all__ = ["FAMILY"]

import torch
from torch import Tensor

from elbolab.families.family import ONE_LATENT_FIELDS, Family, Metrics, Samples, importance_metrics
from elbolab.guides import GuideConfig, SemiSupervisedGuide
from elbolab.models import ModelConfig, SemiSupervisedVAE, keep_labels
from elbolab.models.semisupervised import MISSING


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> SemiSupervisedVAE:
    return SemiSupervisedVAE(x_dim, num_classes or 2, config.z_dim, config.hidden, likelihood=config.likelihood,
                             activation=config.activation, obs_scale=config.obs_scale,
                             labels_per_class=config.labels_per_class, classification_weight=config.classification_weight)


def build_semi_supervised_guide(config: GuideConfig, model: SemiSupervisedVAE) -> SemiSupervisedGuide:
    return SemiSupervisedGuide(model, alpha=model.config.classification_weight)


def label_arguments(labels: Tensor, config: ModelConfig, training: bool, seed: int) -> Tensor:
    """The training split's labels, ``labels_per_class`` of each class kept (all with 0); elsewhere none (``-1``)."""
    if not training:
        return torch.full_like(labels, MISSING)
    return labels.clone() if config.labels_per_class == 0 else keep_labels(labels, config.labels_per_class, seed)


def classification_metrics(model: SemiSupervisedVAE, guide: SemiSupervisedGuide, x: Tensor, conditions: tuple[Tensor, ...],
                           *, num_samples: int, progress: bool | None, compile: bool = False,
                           labels: Tensor | None = None) -> Metrics:
    """log p(x) of the split's points as unlabelled (the VAE's metrics), and the classifier's accuracy on its labels."""
    split, run = importance_metrics(model, guide, x, conditions, num_samples=num_samples, progress=progress,
                                    compile=compile)
    if labels is not None:
        with torch.no_grad():
            predicted = torch.cat([guide.classify(chunk).argmax(-1) for chunk in x.split(4096)])
        split["accuracy"] = (predicted.cpu() == labels.cpu()).float().mean().item()
    return split, run


def samples_by_class(model: SemiSupervisedVAE, n: int, label: int | None, num_classes: int | None) -> Samples:
    if label is not None:
        return model.generate(n, y=label), f"{n} samples of class {label}", 8
    per_class = max(1, n // model.num_classes)
    rows = torch.cat([model.generate(per_class, y=c) for c in range(model.num_classes)])
    return rows, f"{per_class} samples per class (one class per row)", per_class


FAMILY = Family(
    name="ssvae",
    summary="semi-supervised VAE (M2): y ~ uniform, z ~ N(0, I), x ~ p(x|y,z); --labels-per-class labels kept",
    model_class=SemiSupervisedVAE,
    build=build,
    fields=(*ONE_LATENT_FIELDS, "labels_per_class", "classification_weight"),
    guides=("semi-supervised",),
    build_guide=build_semi_supervised_guide,
    conditioned_on_labels=True,
    evaluate=classification_metrics,
    sample=samples_by_class,
    no_diagnosis="diagnose reads guides of x alone, and the ssvae's guide also takes the labels; use elbolab evaluate, "
    "or importance_diagnostics(model, guide, x, labels) from Python",
    label_arguments=label_arguments,
)
