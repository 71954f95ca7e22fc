"""fit's budget of training minutes: it stops after the last epoch that fits, and such a run resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from elbolab.errors import InputError
from elbolab.guides import GaussianGuide
from elbolab.inference import FitConfig, fit
from elbolab.models import VAE


def pair() -> tuple[VAE, GaussianGuide]:
    return VAE(64, 2, hidden=(16,)), GaussianGuide(64, 2, hidden=(16,))


def test_a_spent_budget_ends_training_early_and_the_run_resumes(digits, tmp_path: Path, capsys) -> None:
    # A budget of 6 ms: no epoch of digits is that short, so the first one spends it.
    model, guide = pair()
    checkpoint = tmp_path / "state.safetensors"
    result = fit(model, guide, digits, epochs=5, max_minutes=1e-4, batch_size=256, progress=True, checkpoint=checkpoint)
    assert list(result.history["epoch"]) == [1]
    assert "the budget of 0.0001 minutes is spent after 1 of 5 epochs" in capsys.readouterr().err
    # Resumed with room to spare, it trains the remaining epochs.
    model, guide = pair()
    resumed = fit(model, guide, digits, epochs=5, max_minutes=60, batch_size=256, progress=False,
                  checkpoint=checkpoint, resume=True)
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4, 5]


def test_a_generous_budget_changes_nothing(digits) -> None:
    model, guide = pair()
    assert len(fit(model, guide, digits, epochs=3, max_minutes=60, batch_size=256, progress=False).history) == 3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "ten"])
def test_a_budget_must_be_a_positive_number(bad) -> None:
    with pytest.raises(InputError, match="max_minutes must be a positive number of minutes"):
        FitConfig(max_minutes=bad)
