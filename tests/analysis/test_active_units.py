"""Active units (Burda et al. 2016): informative latent dimensions counted, collapsed ones not."""

import pyro
import pyro.distributions as dist
import torch

from elbolab.analysis import active_units


def guide_with_one_informative_unit(x, *, batch_size=None):
    """Unit 0's posterior mean follows x (variance 4 across points); units 1-2 are N(0, 1) for every x."""
    loc = torch.zeros(x.shape[0], 3)
    loc[:, 0] = 2 * x[:, 0]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_collapsed_units_are_not_counted_despite_monte_carlo_noise():
    torch.manual_seed(0)
    x = torch.randn(500, 1)
    # Without the noise correction, E_q[z|x] from 64 draws varies by about 1/64 > 0.01 across
    # points even for a unit whose posterior ignores x: all three units would count.
    assert active_units(guide_with_one_informative_unit, x) == 1
    assert active_units(guide_with_one_informative_unit, x, threshold=5.0) == 0
