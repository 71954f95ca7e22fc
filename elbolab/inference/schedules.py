"""Schedules of the KL weight beta over training.

KL warm-up (Bowman et al. 2016, "Generating sentences from a continuous space"; Sonderby et al.
2016, "Ladder variational autoencoders"): beta rises linearly from 0 to its final value over the
first steps, so that the decoder learns to use z before the KL term pulls q(z | x) onto the
prior -- a guard against posterior collapse.
"""

from __future__ import annotations

__all__ = ["kl_warmup"]


def kl_warmup(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """``beta * min(1, step / warmup_steps)``; ``beta`` itself when ``warmup_steps`` is 0.

    Example:
        >>> [kl_warmup(s, 4) for s in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)
