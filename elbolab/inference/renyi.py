"""The variational Renyi bound (Li & Turner 2016, "Renyi divergence variational inference").

    L_alpha(x) = 1 / (1 - alpha) * log E_q[ w^(1 - alpha) ],   w = p(x, z) / q(z | x)

estimated per data point with K samples as ``logmeanexp_k((1 - alpha) log w_k) / (1 - alpha)``.
``alpha = 0`` is the IWAE bound; ``alpha -> 1`` the ELBO (excluded: use ``elbo``); ``alpha < 0``
gives estimates above log p(x) in expectation for large K; ``alpha = -inf`` is VR-max,
``max_k log w_k``. The bound decreases as alpha increases. The logsumexp is taken per data point
and the data plate's subsample scale is applied after it; global latents enter as an ELBO term,
as in :mod:`elbolab.inference.iwae`. Unlike Pyro's ``RenyiELBO`` this has a
``differentiable_loss``, so it drives a torch optimizer.
"""

from __future__ import annotations

__all__ = ["Renyi"]

import math

from torch import Tensor

from elbolab.errors import InputError
from elbolab.inference.iwae import IWAE


class Renyi(IWAE):
    """Negative variational Renyi bound, summed over the data points of a batch.

    Arguments:
        alpha: the Renyi order, any real number but 1, or ``-inf`` (VR-max).
        num_particles: K, samples per data point.
        max_plate_nesting: plates the model nests; found by one trace when ``None``.
    """

    def __init__(self, alpha: float = 0.5, num_particles: int = 5, max_plate_nesting: int | None = None) -> None:
        alpha = float(alpha)
        if math.isnan(alpha) or alpha == 1.0 or alpha == math.inf:
            raise InputError(f"renyi: alpha must be a real number other than 1, or -inf; got {alpha} (alpha = 1 is elbo)")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.alpha = alpha

    def _bound(self, local: Tensor) -> Tensor:
        if self.alpha == -math.inf:
            return local.max(0).values
        one_minus_alpha = 1.0 - self.alpha
        return ((one_minus_alpha * local).logsumexp(0) - math.log(local.shape[0])) / one_minus_alpha
