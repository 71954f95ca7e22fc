"""The registry of built-in model families: what ``--model NAME`` builds, trains, evaluates and samples.

One entry per family (see :class:`~elbolab.families.family.Family`); each lives in a file of its
own in this folder. Everything that depends on which family a run is -- the CLI's flags and
help, the run config's checks, rebuilding a run from its folder, ``evaluate``'s metrics,
``sample``'s draws -- reads the entry, so a new family is one file and one line below.

Layer: above :mod:`elbolab.inference` (a family's evaluation runs its estimators), below
:mod:`elbolab.runs` and the CLI.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "GUIDE_FAMILIES", "Family", "build_model", "build_model_guide", "checked_model_config", "family_of",
           "get_family"]

from dataclasses import fields

from torch import nn

from elbolab.errors import InputError, closest_names
from elbolab.families import autoencoder, cvae, gmvae, hvae, ssvae, vae, vqvae
from elbolab.families.family import Family
from elbolab.guides import GuideConfig
from elbolab.models import ModelConfig

FAMILIES: dict[str, Family] = {
    family.name: family for family in (vae.FAMILY, cvae.FAMILY, hvae.FAMILY, vqvae.FAMILY, gmvae.FAMILY, ssvae.FAMILY,
                                                  autoencoder.FAMILY)
}
# Every guide family some model takes ("none": a model without latents takes no guide).
GUIDE_FAMILIES = tuple(dict.fromkeys(guide for family in FAMILIES.values() for guide in family.guides))


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name is refused with the closest ones."""
    if name not in FAMILIES:
        raise InputError(f"unknown model {name!r}; {closest_names(name, FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    """The family whose model class ``model`` is an instance of."""
    for family in FAMILIES.values():
        if type(model) is family.model_class:
            return family
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise InputError(f"{type(model).__name__} is not the model of a built-in family ({', '.join(FAMILIES)})")


def checked_model_config(config: ModelConfig) -> ModelConfig:
    """``config`` with its family's defaults filled in; an option its family does not read is refused.

    A ``[model]`` option of another family (``z_dims`` for a vae, ``codebook_size`` for an hvae)
    would be silently ignored, so that the run is not the one its config describes.
    """
    family = get_family(config.name)
    defaults = ModelConfig()
    for option in fields(ModelConfig):
        if option.name in family.fields or getattr(config, option.name) == getattr(defaults, option.name):
            continue
        owners = [other.name for other in FAMILIES.values() if option.name in other.fields]
        raise InputError(
            f"{option.name} is not an option of the {family.name} model: it is one of the options of the "
            f"{', '.join(owners)} model{'s' if len(owners) > 1 else ''}"
        )
    return family.normalize(config)


def build_model(config: ModelConfig, x_dim: int, y_dim: int | None = None,
                image_shape: tuple[int, int] | None = None) -> nn.Module:
    """The model a :class:`~elbolab.models.ModelConfig` describes, for data of width ``x_dim`` (``y_dim`` classes,
    for a cvae; ``image_shape``, for convolutional networks)."""
    return get_family(config.name).build(checked_model_config(config), x_dim, y_dim, image_shape)


def build_model_guide(config: GuideConfig, model: nn.Module) -> nn.Module | None:
    """The guide of ``config``'s family (the model's default when unset) for a built-in ``model``."""
    return family_of(model).new_guide(config, model)
