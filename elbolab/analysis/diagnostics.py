"""Which data points the amortized guide fails on: per-point PSIS k-hat and effective sample size.

For each data point n, K draws ``z_k ~ q(z | x_n)`` give log importance weights
``log w_nk = log p(x_n, z_k) - log q(z_k | x_n)``. From that one set:

- ``log_likelihood``: ``log mean_k w_nk``, the importance-sampled log p(x_n);
- ``elbo``: ``mean_k log w_nk``; ``gap``: their difference, a lower bound on KL(q || p(z | x_n));
- ``ess``: ``1 / sum_k wbar_nk^2`` with ``wbar`` the normalized weights, in ``[1, K]``;
- ``pareto_k``: the shape k-hat of a generalized Pareto distribution fitted to the largest weights
  by Pareto-smoothed importance sampling (Vehtari et al. 2015/2024, "Pareto smoothed importance
  sampling"), as used to check variational posteriors by Yao et al. (2018, "Yes, but did it
  work?: Evaluating variational inference"). The weights' distribution has finite variance only
  for k < 0.5, and finite mean only for k < 1. Thresholds: k-hat < 0.5, q is close to the
  posterior of x_n and importance sampling from it is reliable; 0.5 <= k-hat < 0.7, usable, with
  slower convergence; k-hat >= 0.7, the guide misses mass of the posterior for that point (its
  tails are too light), estimates of log p(x_n) from it cannot be trusted, and the encoder fails
  on it.

The Pareto fit is ArviZ's (``arviz.psislw``). Every ArviZ call of elbolab lives in this module, so
that moving to ArviZ 1.x, which changes these APIs, is a change to one file.
"""

from __future__ import annotations

__all__ = ["K_HAT_BAD", "K_HAT_GOOD", "importance_diagnostics"]

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from elbolab.inference import log_importance_weights

K_HAT_GOOD = 0.5  # below: importance sampling from q is reliable for this point
K_HAT_BAD = 0.7  # above: the guide cannot be trusted for this point

# Log weights that vary by less than this (nats, standard deviation) are equal up to float
# rounding: q is the posterior, the weights are bounded and k-hat is -inf (a Pareto fit to
# rounding noise would report any value).
EQUAL_WEIGHTS_STD = 1e-3


def importance_diagnostics(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 1000,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> pd.DataFrame:
    """One row per data point: ``log_likelihood``, ``elbo``, ``gap``, ``ess``, ``pareto_k``.

    Arguments:
        model, guide: a model following the contract and its guide.
        x: data ``[N, ...]`` on the model's device; ``*args``: further per-point tensors.
        num_samples: K, importance samples per point (ArviZ's Pareto fit needs a few hundred).
        batch_size, progress: as in :func:`~elbolab.inference.importance_estimate`.

    Returns:
        A DataFrame indexed by data point (0 .. N-1); see the module docstring for the columns
        and the k-hat thresholds :data:`K_HAT_GOOD` and :data:`K_HAT_BAD`.

    Example:
        >>> table = importance_diagnostics(model, guide, test_x, num_samples=1000)
        >>> table[table.pareto_k > K_HAT_BAD]  # the points the encoder fails on
    """
    log_w = log_importance_weights(
        model, guide, x, *args, num_samples=num_samples, batch_size=batch_size, progress=progress
    ).double()  # [K, N]
    log_likelihood = log_w.logsumexp(0) - math.log(num_samples)
    elbo = log_w.mean(0)
    ess = (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp()
    return pd.DataFrame({
        "log_likelihood": log_likelihood.numpy(),
        "elbo": elbo.numpy(),
        "gap": (log_likelihood - elbo).numpy(),
        "ess": ess.numpy(),
        "pareto_k": _pareto_k(log_w.T.numpy()),
    })


def _pareto_k(log_weights: np.ndarray) -> np.ndarray:
    """PSIS k-hat of each row of ``[N, K]`` log weights (independent draws: relative efficiency 1)."""
    import arviz  # here, not at import time: arviz is slow to import and prints a FutureWarning

    with warnings.catch_warnings():
        # ArviZ warns once per call when some k-hat is high: the table reports it point by point.
        warnings.simplefilter("ignore")
        _, k_hat = arviz.psislw(log_weights, reff=1.0)
    k_hat = np.asarray(k_hat, dtype=float)
    k_hat[log_weights.std(axis=1) < EQUAL_WEIGHTS_STD] = -np.inf
    return k_hat
