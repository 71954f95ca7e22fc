"""The random generators a side computation must leave as it found them.

A monitor that draws during training (gradient SNR at chosen epochs, TensorBoard's sample grids)
must not change the draws of the training it watches: the run with the monitor has to be bitwise
the run without it. :func:`kept_rng_state` forks torch's generators (``torch.random.fork_rng``,
the CPU one and those of the CUDA devices already initialized) and saves Python's and NumPy's,
which ``fork_rng`` does not cover.
"""

from __future__ import annotations

__all__ = ["kept_rng_state"]

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def kept_rng_state() -> Iterator[None]:
    """Put torch's (CPU and initialized CUDA devices), Python's and NumPy's generators back as they were."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
