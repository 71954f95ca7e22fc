"""Importance-sampled log-likelihood, for any model/guide pair that follows the contract.

    log p(x) ~= log (1/K) sum_k w_k,    w_k = p(x, z_k) / q(z_k | x),    z_k ~ q(z | x)

is the IWAE bound with K samples (Burda et al. 2016), a consistent estimator of log p(x) that
tightens as K grows. The same log-weights give the ELBO estimate ``mean_k log w_k``, the
expected reconstruction ``mean_k log p(x | z_k)`` and the effective sample size
``(sum w)^2 / sum w^2`` per data point (Kong 1992). Samples are vectorized in a particle plate
and processed in chunks over data points and samples (:func:`over_chunks`, the loop the estimators and
the InferenceData export share), so memory stays bounded for any K.
"""

from __future__ import annotations

__all__ = [
    "Chunk",
    "Evidence",
    "ImportanceEstimate",
    "chunk_elements",
    "evaluation_inputs",
    "importance_estimate",
    "log_evidence",
    "log_importance_weights",
    "log_likelihood",
    "over_chunks",
]

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
from pyro.poutine import Trace, replay, trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from elbolab.config import is_integer
from elbolab.contract import (
    Contract,
    DataPlateScale,
    check_traced_rows,
    floating_dtype,
    pair_contract,
)
from elbolab.data.checks import as_points
from elbolab.errors import InputError
from elbolab.inference.compiled import NotTraceable, PairTracer
from elbolab.inference.traces import log_weights_per_point, run_traced, site_log_prob

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
        global_latents: the model's latents outside the data plate. When there are any, every
            per-point quantity is conditional on global draws ``g ~ q(g)`` (one per sample):
            ``log_likelihood`` estimates the posterior predictive ``log E_q(g)[p(x_n | g)]``, not
            ``log p(x_n)``; :func:`log_evidence` estimates the whole data set's ``log p(X)``.
    """

    log_likelihood: Tensor
    elbo: Tensor
    reconstruction: Tensor
    ess: Tensor
    num_samples: int
    global_latents: tuple[str, ...] = ()


@torch.no_grad()
def importance_estimate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    progress: bool | None = False,
    compile: bool = False,
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
        compile: run each chunk's model and guide as a graph traced once per chunk shape and
            compiled (:class:`~elbolab.inference.compiled.PairTracer`): the same draws, the same
            estimates up to rounding; a pair that cannot be traced is evaluated eagerly, and
            the reason is printed on stderr.

    Returns:
        An :class:`ImportanceEstimate`.
    """
    x, args, contract = evaluation_inputs(model, guide, x, args)
    results: dict[str, list[Tensor]] = {k: [] for k in ("log_likelihood", "elbo", "reconstruction", "ess")}
    lse_w = lse_w2 = None
    sum_log_w = sum_log_lik = 0.0
    for log_w, log_lik, last in _weight_chunks(model, guide, x, args, contract, num_samples, batch_size, progress, compile):
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
    return ImportanceEstimate(
        **{k: torch.cat(v) for k, v in results.items()}, num_samples=int(num_samples), global_latents=contract.global_latents
    )


@torch.no_grad()
def log_importance_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 1000,
    batch_size: int | None = None,
    progress: bool | None = False,
    compile: bool = False,
) -> Tensor:
    """Every log importance weight ``log p(x_n, z_k) - log q(z_k | x_n)``, a CPU tensor ``[K, N]``.

    The raw material of per-data-point diagnostics (PSIS k-hat, effective sample size), which
    need all K weights of a point at once; :func:`importance_estimate` streams them instead.
    Arguments are those of :func:`importance_estimate`.
    """
    x, args, contract = evaluation_inputs(model, guide, x, args)
    columns, samples = [], []
    for log_w, _, last in _weight_chunks(model, guide, x, args, contract, num_samples, batch_size, progress, compile):
        samples.append(log_w.cpu())
        if last:
            columns.append(torch.cat(samples))
            samples = []
    return torch.cat(columns, dim=1)


def evaluation_inputs(
    model: Callable[..., Any], guide: Callable[..., Any], x: Any, args: tuple, what: str = "x"
) -> tuple[Tensor, tuple[Tensor, ...], Contract]:
    """The data and per-point arguments of an estimator, checked, and the pair's contract.

    ``x`` (a tensor or a numpy array) must hold finite values, one row per data point, and
    becomes a tensor of the model's floating dtype; every further argument needs one row per
    point. The pair is checked on the first rows (:func:`~elbolab.contract.pair_contract`).
    """
    if isinstance(x, Tensor | np.ndarray) and x.ndim == 1:
        # N scalar data points; the pair check refuses it if the model reads it as one point of N values.
        x = as_points(x[:, None], what, dtype=floating_dtype(model, guide))[:, 0]
    else:
        x = as_points(x, what, dtype=floating_dtype(model, guide))
    args = tuple(_per_point_arg(a, f"args[{i}]", x) for i, a in enumerate(args))
    head = (x[:16], *(a[:16] for a in args))
    contract = pair_contract(model, guide, head, {})
    if contract.subsamples_input:
        raise InputError(
            f"the model subsamples the data it is given (its plate {contract.data_plate!r} draws a subsample of the "
            f"rows of {what}), but an estimate weighs every data point: declare the plate on the batch, "
            f"pyro.plate({contract.data_plate!r}, len(x)), or with the full size, "
            f"pyro.plate({contract.data_plate!r}, N, subsample_size=len(x))"
        )
    return x, args, contract


def _per_point_arg(arg: Any, what: str, x: Tensor) -> Tensor:
    """A further per-point argument (labels, a condition): a tensor with one row per data point of ``x``."""
    if not isinstance(arg, Tensor):
        arg = torch.as_tensor(np.asarray(arg)) if isinstance(arg, np.ndarray) else arg
    if not isinstance(arg, Tensor) or arg.dim() == 0 or arg.shape[0] != x.shape[0]:
        shape = tuple(arg.shape) if isinstance(arg, Tensor) else type(arg).__name__
        raise InputError(f"{what} must be a tensor with one row per data point ({x.shape[0]}), got {shape}")
    if arg.is_floating_point():
        if not torch.isfinite(arg).all():
            raise InputError(f"{what} contains NaN or infinite values")
        arg = arg.to(x.dtype)
    return arg.to(x.device)


@dataclass(frozen=True)
class Chunk:
    """One chunk of an evaluation (see :func:`over_chunks`): ``samples`` samples of some data points.

    Attributes:
        start: the row of ``x`` of the chunk's first point.
        batch: ``x`` and the further per-point arguments, each the chunk's rows.
        rows: the row numbers ``start .. start + size - 1``, on the data's device (the subsample
            of the data plate).
        samples: samples (particles) of each point in this chunk.
        first, last: whether this is the first / last chunk of samples of these points.
    """

    start: int
    batch: tuple[Tensor, ...]
    rows: Tensor
    samples: int
    first: bool
    last: bool

    @property
    def size(self) -> int:
        """Data points in the chunk."""
        return self.batch[0].shape[0]


T = TypeVar("T")


def over_chunks(
    step: Callable[[Chunk], T],
    x: Tensor,
    args: tuple[Tensor, ...],
    num_samples: int,
    *,
    batch_size: int | None = None,
    split_samples: bool = True,
    progress: bool | None = False,
    desc: str = "log p(x)",
) -> Iterator[tuple[Chunk, T]]:
    """``(chunk, step(chunk))`` for chunks of ``num_samples`` samples of every point of ``x``, in order.

    The one loop of every estimator that draws many samples per data point. Running a model and
    guide on K samples of N points of width D holds about K x N x D elements at once (the
    decoder's output, log-densities and their intermediates), which for K in the thousands
    outgrows any memory; chunks keep it within :func:`chunk_elements` of the data's device
    (larger on a GPU, from its free memory). Batches of points come in order, and within a batch
    its chunks of samples (``last`` on the final one). ``split_samples=False`` keeps all
    ``num_samples`` of a point in one chunk, for callers that need every draw of a point at once.

    A step that runs out of memory (``torch.OutOfMemoryError``: the estimate of memory per
    element was too low for this model) is run again on half as many samples, or points with
    ``split_samples=False``, and the smaller size is kept; it is raised once a chunk is one sample
    of one point. ``step`` must therefore not change anything before it returns.

    Arguments:
        step: the work on one :class:`Chunk`; its result is yielded with the chunk.
        x: data ``[N, ...]``; ``args``: further per-point tensors, chunked with it.
        num_samples: samples per data point.
        batch_size: data points per chunk (default: as many as fit with 16 samples, or with all
            ``num_samples`` when samples are not split).
        split_samples: whether a point's samples may be spread over several chunks.
        progress, desc: a progress bar over data points (``None``: only on a terminal) and its label.
    """
    num_points = x.shape[0]
    width = max(1, math.prod(x.shape[1:]))
    elements = chunk_elements(x.device)
    if batch_size is None:
        batch_size = max(1, min(num_points, elements // ((16 if split_samples else num_samples) * width)))
    sample_chunk = max(1, min(num_samples, elements // (batch_size * width))) if split_samples else num_samples
    bar = tqdm(total=num_points, desc=desc, unit="pt", disable=_disable(progress), leave=False)
    start = 0
    while start < num_points:
        batch = (x[start : start + batch_size], *(a[start : start + batch_size] for a in args))
        rows = torch.arange(start, start + batch[0].shape[0], device=x.device)
        done = 0
        while done < num_samples:
            k = min(sample_chunk, num_samples - done)
            chunk = Chunk(start, batch, rows, k, first=done == 0, last=done + k == num_samples)
            try:
                result = step(chunk)
            except torch.OutOfMemoryError:
                if split_samples and k > 1:
                    sample_chunk = k // 2
                elif not split_samples and chunk.size > 1:
                    batch_size = chunk.size // 2
                    batch = tuple(a[:batch_size] for a in batch)
                    rows = rows[:batch_size]
                else:
                    raise
                if x.is_cuda:
                    torch.cuda.empty_cache()
                continue
            done += k
            yield chunk, result
        bar.update(batch[0].shape[0])
        start += batch[0].shape[0]
    bar.close()


def _weight_chunks(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    args: tuple[Tensor, ...],
    contract: Contract,
    num_samples: int,
    batch_size: int | None,
    progress: bool | None,
    compile: bool = False,
) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """``(log w [k, n], log p(x | z) [k, n], last)`` for the chunks of :func:`over_chunks`.

    The particles of a chunk are vectorized. Every chunk runs under a unit data-plate scale (a
    subsampling plate's training scale is undone) with the chunk's rows as the plate's subsample.
    Compiled (``compile``), the rows are checked against the observed sites' supports before,
    in one pass, instead of on each batch's first chunk.
    """
    if not is_integer(num_samples) or num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples}")
    nesting = contract.plate_nesting
    tracer = _evaluation_tracer(model, guide, x, args, contract) if compile else None

    def weights_of(model: Any, guide: Any, rows: Tensor, batch: tuple[Tensor, ...], samples: int) -> tuple[Tensor, Tensor]:
        with DataPlateScale(contract.plates, 1.0, rows):
            model_trace, guide_trace = run_traced(model, guide, batch, {}, samples, nesting, enumerated=bool(contract.enumerated))
        return model_trace, guide_trace

    def weights(chunk: Chunk) -> tuple[Tensor, Tensor]:
        nonlocal tracer
        if tracer is not None:
            key = (chunk.samples, *(tuple(t.shape) for t in chunk.batch))

            def program(model: Any, guide: Any, params: list[Tensor], rows: Tensor, *batch: Tensor) -> list[Tensor]:
                return list(log_weights_per_point(*weights_of(model, guide, rows, batch, chunk.samples), nesting, contract))

            try:
                log_w, log_lik = tracer.run(key, program, chunk.rows, *chunk.batch)
                return log_w, log_lik
            except NotTraceable as why:
                tracer = None
                print(f"log p(x): evaluating eagerly, not compiled: {why}", file=sys.stderr)
        model_trace, guide_trace = weights_of(model, guide, chunk.rows, chunk.batch, chunk.samples)
        if chunk.first and not compile:
            check_traced_rows(model_trace, contract, chunk.start)
        return log_weights_per_point(model_trace, guide_trace, nesting, contract)

    with pyro.validation_enabled(False):
        for chunk, (log_w, log_lik) in over_chunks(
            weights, x, args, int(num_samples), batch_size=batch_size, progress=progress
        ):
            yield log_w, log_lik, chunk.last


def _evaluation_tracer(model: Any, guide: Any, x: Tensor, args: tuple[Tensor, ...], contract: Contract) -> Any:
    """A :class:`~elbolab.inference.compiled.PairTracer` for the estimate, once the rows are checked; ``None`` if the pair rules it out."""
    # checks sizes its passes with this module's chunks: imported here, not at the top
    from elbolab.inference.checks import check_rows

    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # the estimate's draws as without compile
        check_rows(model, guide, x, args, contract)
    key = (id(model), id(guide))
    entry = _TRACERS.get(key)
    if entry is not None and entry[0] is model and entry[1] is guide and entry[2].holds_state_of(model, guide):
        _TRACERS.move_to_end(key)
        return entry[2]
    try:
        tracer = PairTracer(model, guide)
    except NotTraceable as why:
        print(f"log p(x): evaluating eagerly, not compiled: {why}", file=sys.stderr)
        return None
    _TRACERS[key] = (model, guide, tracer)
    while len(_TRACERS) > 4:
        _TRACERS.popitem(last=False)
    return tracer


# The last pairs' tracers, whose graphs (one per chunk shape) later estimates reuse: a model
# evaluated after each epoch, or on several splits, is traced and compiled once. The entries
# hold the model and guide, so that an id is not reused while its entry lives.
_TRACERS: OrderedDict[tuple[int, int], tuple[Any, Any, PairTracer]] = OrderedDict()


def log_likelihood(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    progress: bool | None = False,
    compile: bool = False,
) -> Tensor:
    """One importance-sampled ``log p(x)`` per data point, shape ``[N]`` (see :func:`importance_estimate`).

    Example:
        >>> log_likelihood(model, guide, test_x, num_samples=5000).mean()
    """
    return importance_estimate(
        model, guide, x, *args, num_samples=num_samples, batch_size=batch_size, progress=progress, compile=compile
    ).log_likelihood


def _disable(progress: bool | None) -> bool | None:
    # tqdm's disable=None means "off unless on a terminal".
    return None if progress is None else not progress


@dataclass(frozen=True)
class Evidence:
    """An estimate of the whole data set's ``log p(X)``, in nats.

    Attributes:
        log_evidence: the estimate of ``log p(X)``, summed over the data points.
        standard_error: its Monte Carlo standard error (delta method on the outer weights).
        num_points, num_samples, global_samples: N, K (local samples per point and global draw), S.
    """

    log_evidence: float
    standard_error: float
    num_points: int
    num_samples: int
    global_samples: int

    @property
    def per_point(self) -> float:
        """``log p(X) / N``: nats per data point."""
        return self.log_evidence / self.num_points


@torch.no_grad()
def log_evidence(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    x: Tensor,
    *args: Tensor,
    num_samples: int = 1000,
    global_samples: int = 100,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> Evidence:
    """Importance-sample the whole data set's ``log p(X)``, for models with global latents too.

    Nested importance sampling: S global draws ``g_s ~ q(g)`` outside, K local draws per point
    and global draw inside,

        p(X) ~= (1/S) sum_s [p(g_s) / q(g_s)] prod_n (1/K) sum_k p(x_n, z_nk | g_s) / q(z_nk | x_n, g_s),

    which is consistent as S and K grow and exact with exact posteriors as guides. Without global
    latents it is ``sum_n log p(x_n)`` from :func:`importance_estimate` (``global_samples`` unused).
    The standard error is the delta-method one, ``sqrt(sum_s (S wbar_s - 1)^2 / (S (S - 1)))``
    with ``wbar`` the normalized outer weights (per point, from its effective sample size,
    without globals).

    Arguments:
        model, guide: a pair following the contract; the guide's global sites must not depend on x.
        x: data ``[N, ...]``; ``*args``: further per-point tensors.
        num_samples: K; global_samples: S.
        batch_size, progress: as in :func:`importance_estimate`.

    Example:
        >>> evidence = log_evidence(model, guide, x, num_samples=500, global_samples=200)
        >>> evidence.per_point, evidence.standard_error
    """
    x, args, contract = evaluation_inputs(model, guide, x, args)
    if not is_integer(global_samples) or global_samples < 1:
        raise InputError(f"global_samples must be a positive integer, got {global_samples}")
    if not contract.global_latents:
        estimate = importance_estimate(model, guide, x, *args, num_samples=num_samples, batch_size=batch_size, progress=progress)
        k = estimate.num_samples
        variance = ((k / estimate.ess - 1).clamp(min=0) / max(k - 1, 1)).sum() if k > 1 else torch.tensor(math.nan)
        return Evidence(estimate.log_likelihood.double().sum().item(), variance.sqrt().item(), x.shape[0], k, 0)
    head = (x[:1], *(a[:1] for a in args))
    rows = torch.arange(1, device=x.device)
    totals = []
    for _ in tqdm(range(int(global_samples)), desc="log p(X)", unit="draw", disable=_disable(progress), leave=False):
        with DataPlateScale(contract.plates, 1.0, rows), trace() as guide_tracer:
            guide(*head)
        global_trace = Trace()
        log_q = 0.0
        for name, site in guide_tracer.trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site) and not site["is_observed"] and not _in_data_plate(site, contract):
                global_trace.nodes[name] = site
                log_q = log_q + site_log_prob(site).double().sum()
        with DataPlateScale(contract.plates, 1.0, rows), trace() as model_tracer, replay(trace=global_trace):
            model(*head)
        log_p = sum(
            site_log_prob(site).double().sum()
            for name, site in model_tracer.trace.nodes.items()
            if site["type"] == "sample" and name in contract.global_latents
        )
        inner = importance_estimate(
            model, replay(guide, trace=global_trace), x, *args, num_samples=num_samples, batch_size=batch_size
        )
        totals.append(log_p - log_q + inner.log_likelihood.double().sum())
    totals = torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in totals]).cpu()
    s = totals.shape[0]
    estimate = (totals.logsumexp(0) - math.log(s)).item()
    if s > 1:
        normalized = torch.softmax(totals, 0)
        error = ((s * normalized - 1).pow(2).sum() / (s * (s - 1))).sqrt().item()
    else:
        error = math.nan
    return Evidence(estimate, error, x.shape[0], int(num_samples), s)


def _in_data_plate(site: dict, contract: Contract) -> bool:
    return any(frame.name in contract.plates for frame in site["cond_indep_stack"])
