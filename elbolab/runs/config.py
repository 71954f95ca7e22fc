"""A run's config: the ``[data]``, ``[model]``, ``[guide]`` and ``[fit]`` sections and the data's shape.

What a TOML config file or the CLI's flags fill, what ``config.json`` in a run folder holds, and
what rebuilds a run's model and guide from it.
"""

from __future__ import annotations

__all__ = ["RunConfig"]

from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.data import DataConfig, Dataset
from elbolab.errors import InputError, closest_names
from elbolab.families import Family, checked_model_config, get_family
from elbolab.files import FORMAT_VERSION
from elbolab.guides import GuideConfig
from elbolab.inference import FitConfig
from elbolab.inference.objectives import parse_objective_spec
from elbolab.models import ModelConfig


@dataclass
class RunConfig:
    """Everything that defines a run: what a TOML config file or the CLI flags fill.

    Attributes:
        data, model, fit, guide: the four sections (a config without ``[guide]`` has the model's default guide).
        x_dim, image_shape: the shape of the training data, recorded when the run is fitted so
            that the model can be rebuilt without reading the data.
        y_dim: the number of classes a ``cvae`` is conditioned on, recorded likewise.

    The sections are checked against the model's family (:mod:`elbolab.families`): an option of
    another family, a guide or an objective the family does not take is an error; a guide family
    left unset becomes the family's default.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    x_dim: int | None = None
    image_shape: tuple[int, int] | None = None
    y_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("x_dim", "y_dim"):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and value >= 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        shape = self.image_shape
        if shape is not None and not (
            len(shape) == 2 and all(is_integer(v) and v >= 1 for v in shape) and shape[0] * shape[1] == self.x_dim
        ):
            raise InputError(f"image_shape must be two positive integers whose product is x_dim ({self.x_dim}), got {shape!r}")
        family = get_family(self.model.name)
        self.model = checked_model_config(self.model)
        self.data = self.data.for_likelihood(self.model.likelihood)  # "auto" becomes what it means here
        self.guide = replace(self.guide, family=family.check_guide(self.guide.family))
        family.check_objective(parse_objective_spec(self.fit.objective)[0])

    @property
    def family(self) -> Family:
        """The model family's entry in the registry."""
        return get_family(self.model.name)

    def with_data(self, data: Dataset) -> RunConfig:
        """This config with the training data's shape recorded (and, for a model on labels, its classes)."""
        return replace(self, x_dim=data.x_dim, image_shape=data.image_shape, y_dim=self.family.num_classes(data))

    def new_model(self, data: Dataset | None = None) -> nn.Module:
        """The run's model, freshly initialised (seed the RNG first); given the training data, its decoder starts at their mean."""
        if self.x_dim is None:
            raise InputError("the run's config has no x_dim: record the training data's shape first (with_data)")
        model = self.family.build(self.model, self.x_dim, self.y_dim, self.image_shape)
        if data is not None and hasattr(model, "init_output_bias"):
            model.init_output_bias(data.x)
        return model

    def new_guide(self, model: nn.Module) -> nn.Module | None:
        """The run's guide for its ``model``: the ``[guide]`` family (none for a model without latents)."""
        return self.family.new_guide(self.guide, model)

    def conditions(self, data: Dataset | None, training: bool = False) -> tuple[Tensor, ...]:
        """The per-point arguments the model takes after ``x`` for ``data``: one-hot labels, or none.

        ``training``: ``data`` is the training split (a semi-supervised model keeps some of its labels).
        """
        return self.family.conditions(data, self.y_dim, self.model, training, self.fit.seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "data": self.data.to_dict(),
            "model": self.model.to_dict(),
            "guide": self.guide.to_dict(),
            "fit": self.fit.to_dict(),
            "x_dim": self.x_dim,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "y_dim": self.y_dim,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", *, written: bool = False) -> RunConfig:
        """Build from nested dicts (a TOML file, config.json); unknown keys are errors.

        ``written=True`` reads a config elbolab wrote (a run folder's, a checkpoint's): a
        ``[model]`` option its family does not read is dropped rather than refused, because
        elbolab 0.1.0 accepted such options, ignored them, and recorded them.
        """
        raw = dict(raw)
        if written and isinstance(raw.get("model"), dict):
            raw["model"] = _without_options_of_other_families(raw["model"])
        version = raw.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            newer = "newer than this elbolab reads; upgrade elbolab to read it" if is_integer(version) and version > FORMAT_VERSION else "not supported"
            raise InputError(f"{source}: format version {version!r} is {newer} (this elbolab reads {FORMAT_VERSION})")
        sections = {"data": DataConfig, "model": ModelConfig, "guide": GuideConfig, "fit": FitConfig}
        shapes = ("x_dim", "image_shape", "y_dim")
        unknown = set(raw) - set(sections) - set(shapes)
        if unknown:
            key = sorted(unknown)[0]
            raise InputError(f"{source}: unknown key {key!r}; {closest_names(key, [*sections, *shapes])}")
        built = {
            name: section_cls.from_dict(raw.get(name, {}), source=f"{source} [{name}]")
            for name, section_cls in sections.items()
        }
        image_shape = raw.get("image_shape")
        if image_shape is not None and not isinstance(image_shape, list):
            raise InputError(f"{source}: image_shape must be a list [height, width], got {image_shape!r}")
        return cls(
            **built, x_dim=raw.get("x_dim"), image_shape=tuple(image_shape) if image_shape else None, y_dim=raw.get("y_dim")
        )


def _without_options_of_other_families(section: dict[str, Any]) -> dict[str, Any]:
    """A ``[model]`` section less the options of :class:`ModelConfig` that its family does not read."""
    family = get_family(section.get("name", ModelConfig().name))
    options = {option.name for option in fields(ModelConfig)}
    return {key: value for key, value in section.items() if key in family.fields or key not in options}
