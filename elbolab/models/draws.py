"""Decoded draws of any model that follows the contract: from its prior, or from a guide's posterior.

Shared by the built-in models' ``generate`` and ``reconstruct``: run the model with ``x=None``
(it then samples every latent from its prior, or takes them from a guide's trace by replay) and
read the observation site ``"x"``.
"""

from __future__ import annotations

__all__ = ["decode_latents", "decode_posterior_draws", "decode_prior_draws"]

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch import Tensor


@torch.no_grad()
def decode_prior_draws(model: Callable[..., Any], n: int, *args: Any, mean: bool = True) -> Tensor:
    """``n`` draws of the latents from the prior, decoded: the means of ``p(x | z)``, or samples of it.

    ``args`` follow ``x=None`` in the model's call, e.g. the conditioning labels of a conditional model.
    """
    return _observation(poutine.trace(model).get_trace(None, *args, batch_size=n), mean)


@torch.no_grad()
def decode_posterior_draws(
    model: Callable[..., Any], guide: Callable[..., Any], x: Tensor, *args: Any, mean: bool = True
) -> Tensor:
    """One draw of every latent from ``guide`` given ``x`` (and ``args``), decoded by ``model``: ``[N, x_dim]``."""
    guide_trace = poutine.trace(guide).get_trace(x, *args)
    replayed = poutine.replay(model, guide_trace)
    return _observation(poutine.trace(replayed).get_trace(None, *args, batch_size=x.shape[0]), mean)


@torch.no_grad()
def decode_latents(model: Callable[..., Any], latents: dict[str, Tensor], *args: Any, mean: bool = True) -> Tensor:
    """Decode given latent values: the model run with every site of ``latents`` fixed, ``[n, x_dim]``.

    ``latents`` maps latent site names to values ``[n, *shape]``, one row per data point to
    generate; a latent the model has but ``latents`` lacks is drawn from its prior.
    """
    n = next(iter(latents.values())).shape[0]
    conditioned = poutine.condition(model, data=latents)
    return _observation(poutine.trace(conditioned).get_trace(None, *args, batch_size=n), mean)


def _observation(trace: poutine.Trace, mean: bool) -> Tensor:
    site = trace.nodes["x"]
    return site["fn"].mean if mean else site["value"]
