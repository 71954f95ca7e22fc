"""The model-family registry: every entry builds its own class, and what reads the registry follows it."""

import pytest

from elbolab.cli_arguments import build_parser
from elbolab.errors import InputError
from elbolab.families import (
    FAMILIES,
    GUIDE_FAMILIES,
    build_model,
    build_model_guide,
    family_of,
    get_family,
)
from elbolab.guides import GuideConfig
from elbolab.models import ModelConfig

OPTIONS = {"hvae": {"z_dims": (4, 2)}, "vqvae": {"codebook_size": 4, "num_codes": 2}}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_builds_its_class_and_pairs_it_with_its_default_guide(name):
    family = get_family(name)
    model = build_model(ModelConfig(name, hidden=(8,), **OPTIONS.get(name, {})), 16, y_dim=3)
    assert type(model) is family.model_class and family_of(model) is family
    guide = build_model_guide(GuideConfig(), model)
    assert (guide is None) == (family.guides == ("none",))
    for other in set(GUIDE_FAMILIES) - set(family.guides):
        with pytest.raises(InputError, match=f"not {other!r}|takes no guide"):
            build_model_guide(GuideConfig(other), model)


def test_an_option_is_refused_by_the_families_that_do_not_read_it():
    for name, family in FAMILIES.items():
        if "z_dims" not in family.fields:
            with pytest.raises(InputError, match=f"z_dims is not an option of the {name} model"):
                build_model(ModelConfig(name, hidden=(8,), z_dims=(4, 2)), 16, y_dim=3)


def test_the_command_line_offers_what_the_registry_holds():
    fit_parser = build_parser()._subparsers._group_actions[0].choices["fit"]
    choices = {action.dest: action.choices for action in fit_parser._actions}
    assert list(choices["model.name"]) == list(FAMILIES)
    assert set(choices["guide.family"]) == set(GUIDE_FAMILIES) - {"none"}


def test_an_unknown_family_is_refused_with_the_closest_name():
    with pytest.raises(InputError, match="did you mean 'vqvae'"):
        get_family("vqvea")
