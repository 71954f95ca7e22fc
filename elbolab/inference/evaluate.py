"""Importance-sampled log-likelihood, for any model/guide pair that follows the contract.

    log p(x) ~= log (1/K) sum_k w_k,    w_k = p(x, z_k) / q(z_k | x),    z_k ~ q(z | x)

is the IWAE bound with K samples (Burda et al. 2016), a consistent estimator of log p(x) that
tightens as K grows. The same log-weights give the ELBO estimate ``mean_k log w_k``, the
expected reconstruction ``mean_k log p(x | z_k)`` and the effective sample size
``(sum w)^2 / sum w^2`` per data point (Kong 1992). Samples are vectorized in a particle plate
and processed in chunks over data points and samples, so memory stays bounded for any K.
"""

from __future__ import annotations

__all__ = ["ImportanceEstimate", "chunk_elements", "importance_estimate", "log_importance_weights", "log_likelihood"]

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbolab.config import is_integer
from elbolab.errors import InputError
from elbolab.inference.traces import log_weights_per_point, max_plate_nesting, run_traced

# Elements of one chunk's [samples, points, x_dim] block on the CPU; bounds evaluation memory
# to a few hundred MB for decoders a few times wider than the data.
CHUNK_ELEMENTS = 2**22
# On a GPU chunks are sized from its free memory instead: this share of it, at this many bytes per
# element of the block (the decoder's output, log-densities and their intermediates live at once).
# Fewer, larger chunks keep the GPU busy: 10,000 MNIST points x 5,000 samples take ~9,000 chunks
# of CHUNK_ELEMENTS but ~30 on an 80 GB GPU. A chunk that still runs out of memory is halved.
GPU_MEMORY_FRACTION = 0.25
BYTES_PER_ELEMENT = 16


def chunk_elements(device: torch.device) -> int:
    """Elements of one evaluation chunk on ``device``: :data:`CHUNK_ELEMENTS`, or more on a GPU with free memory."""
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(CHUNK_ELEMENTS, int(GPU_MEMORY_FRACTION * free / BYTES_PER_ELEMENT))


@dataclass(frozen=True)
class ImportanceEstimate:
    """Per-data-point estimates from one set of importance weights, each a CPU tensor ``[N]``.

    Attributes:
        log_likelihood: ``log mean_k w_k``, the IWAE bound with K = ``num_samples``.
        elbo: ``mean_k log w_k``, a Monte Carlo estimate of the ELBO.
        reconstruction: ``mean_k log p(x | z_k)``, the expected log-likelihood term.
        ess: effective sample size of the normalized weights, in ``[1, K]``.
        num_samples: K.
    """

    log_likelihood: Tensor
    elbo: Tensor
    reconstruction: Tensor
    ess: Tensor
    num_samples: int


@torch.no_grad()
def importance_estimate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> ImportanceEstimate:
    """Importance-sample ``log p(x)`` (and the ELBO, reconstruction and ESS) for every row of ``x``.

    Arguments:
        model: a model following the contract, called as ``model(x_batch, *args_batch)``.
        guide: a guide with the model's signature.
        x: data ``[N, ...]``, on the device of the model and guide.
        *args: further per-data-point tensors (e.g. labels), chunked along dim 0 with ``x``.
        num_samples: K, importance samples per data point.
        batch_size: data points per chunk (default: as many as keep a chunk within
            :func:`chunk_elements` at 16 samples).
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        An :class:`ImportanceEstimate`.
    """
    results: dict[str, list[Tensor]] = {k: [] for k in ("log_likelihood", "elbo", "reconstruction", "ess")}
    lse_w = lse_w2 = None
    sum_log_w = sum_log_lik = 0.0
    for log_w, log_lik, last in _weight_chunks(model, guide, x, args, num_samples, batch_size, progress):
        chunk_lse, chunk_lse2 = log_w.logsumexp(0), (2 * log_w).logsumexp(0)
        lse_w = chunk_lse if lse_w is None else torch.logaddexp(lse_w, chunk_lse)
        lse_w2 = chunk_lse2 if lse_w2 is None else torch.logaddexp(lse_w2, chunk_lse2)
        sum_log_w = sum_log_w + log_w.sum(0)
        sum_log_lik = sum_log_lik + log_lik.sum(0)
        if last:  # every sample of this batch of points is in: finish it
            results["log_likelihood"].append((lse_w - math.log(num_samples)).cpu())
            results["elbo"].append((sum_log_w / num_samples).cpu())
            results["reconstruction"].append((sum_log_lik / num_samples).cpu())
            results["ess"].append((2 * lse_w - lse_w2).exp().cpu())
            lse_w = lse_w2 = None
            sum_log_w = sum_log_lik = 0.0
    return ImportanceEstimate(**{k: torch.cat(v) for k, v in results.items()}, num_samples=int(num_samples))


@torch.no_grad()
def log_importance_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 1000,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> Tensor:
    """Every log importance weight ``log p(x_n, z_k) - log q(z_k | x_n)``, a CPU tensor ``[K, N]``.

    The raw material of per-data-point diagnostics (PSIS k-hat, effective sample size), which
    need all K weights of a point at once; :func:`importance_estimate` streams them instead.
    Arguments are those of :func:`importance_estimate`.
    """
    columns, samples = [], []
    for log_w, _, last in _weight_chunks(model, guide, x, args, num_samples, batch_size, progress):
        samples.append(log_w.cpu())
        if last:
            columns.append(torch.cat(samples))
            samples = []
    return torch.cat(columns, dim=1)


def _weight_chunks(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    args: tuple[Tensor, ...],
    num_samples: int,
    batch_size: int | None,
    progress: bool | None,
) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """``(log w [k, n], log p(x | z) [k, n], last)`` for chunks of samples of batches of points.

    Batches of points come in order; within a batch, chunks of samples, ``last`` on its final one.
    Chunks keep memory bounded by :func:`chunk_elements`; the particles of a chunk are vectorized.
    """
    if not is_integer(num_samples) or num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples}")
    num_points = x.shape[0]
    if num_points == 0:
        raise InputError("no data points to evaluate")
    width = max(1, math.prod(x.shape[1:]))
    elements = chunk_elements(x.device)
    if batch_size is None:
        batch_size = max(1, min(num_points, elements // (16 * width)))
    sample_chunk = max(1, min(num_samples, elements // (batch_size * width)))
    nesting = max_plate_nesting(model, guide, (x[:1], *(a[:1] for a in args)), {})
    bar = tqdm(total=num_points, desc="log p(x)", unit="pt", disable=_disable(progress), leave=False)
    with pyro.validation_enabled(False):
        for start in range(0, num_points, batch_size):
            batch = (x[start : start + batch_size], *(a[start : start + batch_size] for a in args))
            done = 0
            while done < num_samples:
                k = min(sample_chunk, num_samples - done)
                try:
                    model_trace, guide_trace = run_traced(model, guide, batch, {}, k, nesting)
                    log_w, log_lik = log_weights_per_point(model_trace, guide_trace, nesting)
                except torch.OutOfMemoryError:
                    if k == 1:
                        raise
                    sample_chunk = k // 2  # the estimate of memory per element was too low for this model
                    if x.is_cuda:
                        torch.cuda.empty_cache()
                    continue
                done += k
                yield log_w, log_lik, done == num_samples
            bar.update(batch[0].shape[0])
    bar.close()


def log_likelihood(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> Tensor:
    """One importance-sampled ``log p(x)`` per data point, shape ``[N]`` (see :func:`importance_estimate`).

    Example:
        >>> log_likelihood(model, guide, test_x, num_samples=5000).mean()
    """
    return importance_estimate(
        model, guide, x, *args, num_samples=num_samples, batch_size=batch_size, progress=progress
    ).log_likelihood


def _disable(progress: bool | None) -> bool | None:
    # tqdm's disable=None means "off unless on a terminal".
    return None if progress is None else not progress
