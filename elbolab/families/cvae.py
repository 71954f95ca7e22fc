"""The conditional VAE (Sohn et al. 2015): p(x | z, y) with the data set's class labels y."""

from __future__ import annotations

__all__ = ["FAMILY"]

import torch

from elbolab.errors import InputError
from elbolab.families.family import ARCHITECTURE_FIELDS, ONE_LATENT_FIELDS, Family, Samples
from elbolab.guides import ConditionalGuide, GuideConfig, build_guide
from elbolab.guides.config import SINGLE_SITE
from elbolab.models import ConditionalVAE, ModelConfig


def build(config: ModelConfig, x_dim: int, num_classes: int | None, image_shape: tuple[int, int] | None = None) -> ConditionalVAE:
    if num_classes is None:
        raise InputError("a cvae needs the number of classes it is conditioned on (y_dim)")
    return ConditionalVAE(x_dim, num_classes, config.z_dim, likelihood=config.likelihood, obs_scale=config.obs_scale,
                          architecture=config.architecture(image_shape))


def build_cvae_guide(config: GuideConfig, model: ConditionalVAE) -> ConditionalGuide:
    """A single-site guide on the concatenation [x, one-hot y] (convolutions read x, and y joins their features)."""
    trunk = model.config.architecture(model.image_shape).encoder(model.x_dim, side_dim=model.y_dim)
    inner = build_guide(config, model.x_dim + model.y_dim, model.z_dim, model.config.hidden, model.config.activation,
                        trunk=trunk)
    return ConditionalGuide(inner, model.y_dim)


def class_samples(model: ConditionalVAE, n: int, label: int | None, num_classes: int | None) -> Samples:
    """``n`` draws of class ``label``, or (no label) ``n // classes`` of each class, one class per row."""
    if label is not None:
        if not 0 <= label < model.y_dim:
            raise InputError(f"--label {label} is not a class of this run: its labels are 0 to {model.y_dim - 1}")
        return model.generate(n, y=label), f"{n} samples of class {label}: means of p(x|z,y), z ~ p(z)", 8
    per_class = max(1, n // model.y_dim)
    labels = torch.arange(model.y_dim).repeat_interleave(per_class)
    title = f"{per_class} samples per class, one class per row (0 at the top): means of p(x|z,y)"
    return model.generate(len(labels), y=labels), title, per_class


FAMILY = Family(
    name="cvae",
    summary="conditional VAE on the data set's class labels: x ~ p(x|z,y)",
    model_class=ConditionalVAE,
    build=build,
    fields=(*ONE_LATENT_FIELDS, *ARCHITECTURE_FIELDS),
    guides=SINGLE_SITE,  # any single-site family: the one latent is z
    build_guide=build_cvae_guide,
    conditioned_on_labels=True,
    sample=class_samples,
    no_diagnosis="diagnose reads guides of x alone, and a cvae's guide also takes the labels; use elbolab evaluate, "
    "or importance_diagnostics(model, guide, x, y) from Python",
)
