"""What a built-in model family is: everything elbolab knows about ``--model NAME``, in one entry.

A family ties a model class to the ``[model]`` options it reads, the guide families it pairs
with (its default first), the objectives it trains under, whether it is conditioned on labels,
what ``evaluate`` reports for it and how ``sample`` draws from it. The registry
(:data:`elbolab.families.FAMILIES`) holds one entry per family; the CLI, the run config and
the run folder read it, and nothing outside ``elbolab/families/`` branches on a family's name.

Adding a family is one file in this folder that builds a :class:`Family`, and one line in the
registry (see docs/architecture.md).
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE_FIELDS", "COMMON_FIELDS", "ONE_LATENT_FIELDS", "Family", "Metrics", "Samples", "importance_metrics", "prior_samples"]

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from elbolab.data import Dataset
from elbolab.errors import InputError
from elbolab.guides import GuideConfig
from elbolab.inference import importance_estimate
from elbolab.models import ModelConfig, as_condition

# The [model] options every family reads; a family adds its own (see Family.fields).
COMMON_FIELDS = ("name", "hidden", "likelihood", "activation", "obs_scale")
# ... and those of a model with one latent (or code) vector of width z_dim.
ONE_LATENT_FIELDS = (*COMMON_FIELDS, "z_dim")
# ... and those of a family whose networks may be convolutional (ModelConfig.architecture).
ARCHITECTURE_FIELDS = ("arch", "channels", "kernel", "residual_blocks", "gated")

# (metrics of the split, named without the split; metrics of the run, e.g. the number of samples)
Metrics = tuple[dict[str, float], dict[str, Any]]
# (draws [n, x_dim], a title for their grid, the grid's number of columns)
Samples = tuple[Tensor, str, int]


def importance_metrics(model: Any, guide: Any, x: Tensor, conditions: tuple[Tensor, ...], *, num_samples: int,
                       progress: bool | None, compile: bool = False,
                       labels: Tensor | None = None) -> Metrics:
    """ELBO, importance-sampled log p(x) (K = ``num_samples``), reconstruction loss and ESS/K, per data point."""
    estimate = importance_estimate(model, guide, x, *conditions, num_samples=num_samples, progress=progress,
                                   compile=compile)
    split = {
        "elbo": estimate.elbo.mean().item(),
        "log_likelihood": estimate.log_likelihood.mean().item(),
        "reconstruction_loss": -estimate.reconstruction.mean().item(),
        "ess_fraction": (estimate.ess.mean() / num_samples).item(),
    }
    return split, {"num_samples": num_samples}


def prior_samples(model: Any, n: int, label: int | None, num_classes: int | None) -> Samples:
    """``n`` decoded draws of the model's prior."""
    return model.generate(n), f"{n} samples from p(z)p(x|z): means of p(x|z)", 8


@dataclass(frozen=True)
class Family:
    """One built-in model family.

    Attributes:
        name: the ``[model] name`` (``--model``).
        summary: one line for ``--help``.
        model_class: the model's class; :func:`~elbolab.families.family_of` finds a model's family by it.
        build: ``build(config, x_dim, num_classes, image_shape)`` -> a freshly initialised model.
        fields: the :class:`~elbolab.models.ModelConfig` fields it reads; another field set away
            from its default is refused (it would be silently ignored; see
            :func:`~elbolab.families.checked_model_config`).
        guides: the guide families it takes (``GuideConfig.family``), its default first.
        build_guide: ``build_guide(guide_config, model)`` -> its guide (``None`` for no latents).
        objectives: the objectives it trains under, or ``None`` for every objective of an ELBO.
        objective_refusal: why it takes only ``objectives``, and which to use: the refusal of another.
        conditioned_on_labels: whether the model takes one-hot class labels after ``x``.
        evaluate: ``evaluate(model, guide, x, conditions, num_samples=, progress=, compile=, labels=)`` ->
            :data:`Metrics`; ``labels`` are the split's class labels (``None`` when it has none), for
            metrics that compare with them (a mixture model's clustering accuracy).
        sample: ``sample(model, n, label, num_classes)`` -> :data:`Samples`, or ``None`` when it cannot generate.
        no_diagnosis: why ``elbolab diagnose`` cannot read it, or ``None`` when it can.
        normalize: fills the family's defaults into a config and checks what only it needs.
        label_arguments: ``label_arguments(labels, model_config, training, seed)`` -> the label
            argument of a model conditioned on labels, when it is not their one-hot matrix (a
            semi-supervised model's labels with the missing ones ``-1``).
    """

    name: str
    summary: str
    model_class: type[nn.Module]
    build: Callable[[ModelConfig, int, int | None, tuple[int, int] | None], nn.Module]
    fields: tuple[str, ...]
    guides: tuple[str, ...]
    build_guide: Callable[[GuideConfig, nn.Module], nn.Module | None]
    objectives: tuple[str, ...] | None = None
    objective_refusal: str = ""
    conditioned_on_labels: bool = False
    evaluate: Callable[..., Metrics] = importance_metrics
    sample: Callable[[Any, int, int | None, int | None], Samples] | None = prior_samples
    no_diagnosis: str | None = None
    normalize: Callable[[ModelConfig], ModelConfig] = lambda config: config
    label_arguments: Callable[[Tensor, ModelConfig, bool, int], Tensor] | None = None

    def check_guide(self, guide: str | None) -> str:
        """The guide family to use: the default when ``guide`` is ``None``; one it does not take is refused."""
        if guide is None:
            return self.guides[0]
        if self.guides == ("none",) and guide != "none":
            raise InputError(f"the {self.name} has no latent variables and takes no guide; leave out {guide!r}")
        if guide not in self.guides:
            raise InputError(f"the {self.name} model takes the guides {', '.join(self.guides)}, not {guide!r}")
        return guide

    def check_objective(self, objective: str) -> None:
        """Refuse an objective (a registry name) the family does not train under."""
        if self.objectives is None and objective == "reconstruction":
            raise InputError(
                f"the {self.name} model has latent variables, and reconstruction is the autoencoder's loss, not a "
                "bound on log p(x): choose an objective of its ELBO"
            )
        if self.objectives is not None and objective not in self.objectives:
            raise InputError(self.objective_refusal)

    def check_comparable(self) -> None:
        """Refuse ``elbolab compare`` for a family that trains under one objective only."""
        if self.objectives is not None and len(self.objectives) == 1:
            raise InputError(f"the {self.name} has no objectives to compare: it trains under {self.objectives[0]} "
                             "alone; use another --model")

    def new_guide(self, config: GuideConfig, model: nn.Module) -> nn.Module | None:
        """The guide of ``config``'s family (the default when unset) for ``model``."""
        return self.build_guide(replace(config, family=self.check_guide(config.family)), model)

    def num_classes(self, data: Dataset) -> int | None:
        """The number of classes a model conditioned on labels is built for, read from the training data."""
        if not self.conditioned_on_labels:
            return None
        return int(self._labels(data).max()) + 1

    def conditions(self, data: Dataset | None, num_classes: int | None, model: ModelConfig | None = None,
                   training: bool = False, seed: int = 0) -> tuple[Tensor, ...]:
        """The per-point arguments the model takes after ``x``: one-hot labels, the labels a semi-supervised
        model trains with (``training``: the run's share of them, chosen with ``seed``; otherwise none), or nothing."""
        if data is None or not self.conditioned_on_labels:
            return ()
        if self.label_arguments is not None:
            return (self.label_arguments(self._labels(data), model or ModelConfig(self.name), training, seed),)
        return (as_condition(self._labels(data), num_classes),)

    def reconstruct(self, model: Any, guide: Any, x: Tensor, conditions: tuple[Tensor, ...]) -> Tensor:
        """Means of p(x | z) at one draw of q(z | x, ...): the reconstructions figure."""
        with torch.no_grad(), pyro.validation_enabled(False):
            if conditions:
                return model.reconstruct(x, *conditions, guide)
            return model.reconstruct(x, guide)

    def samples(self, model: Any, n: int, label: int | None, num_classes: int | None) -> Samples:
        """``n`` decoded prior draws (of class ``label``, where the model takes labels)."""
        if self.sample is None:
            raise InputError(f"the {self.name} has no prior over its codes and cannot generate")
        if label is not None and not self.conditioned_on_labels:
            raise InputError(f"--label is for a model conditioned on class labels; this run's model is a {self.name}")
        with torch.no_grad(), pyro.validation_enabled(False):
            return self.sample(model, n, label, num_classes)

    def _labels(self, data: Dataset) -> Tensor:
        if data.y is None:
            raise InputError(f"the {self.name} model is conditioned on class labels, and {data.name} has none")
        return data.y
