"""Pyro's own ELBOs as elbolab objectives: trained by ``fit``, set beside elbolab's in ``compare``.

Any ``pyro.infer.ELBO`` instance given to ``fit`` (or named in a spec, ``"pyro:RenyiELBO:alpha=0:k=5"``)
is run by :class:`PyroObjective`, which gives it the ``differentiable_loss`` elbolab's step
calls. Pyro's objectives differ in what they offer, and each is run through its own code:

- ``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``, ``JitTrace_ELBO``,
  ``JitTraceMeanField_ELBO``, ``JitTraceEnum_ELBO``: their ``differentiable_loss``.
- ``TraceGraph_ELBO``: its loss and surrogate loss, ``loss + (surrogate - stop_gradient(surrogate))``,
  whose value is the loss and whose gradient is the surrogate's (score-function terms with
  Rao-Blackwellization, Pyro's estimator for non-reparameterized guides).
- ``RenyiELBO`` and ``JitTraceGraph_ELBO``: only ``loss_and_grads``, which back-propagates
  itself; the gradients are then in the parameters' ``.grad`` and the returned loss carries no
  graph. Such an objective cannot be compiled or run data-parallel, and says so.

Pyro finds the parameters of jit-compiled and Rényi objectives through ``pyro.param`` sites, so
every call runs inside a parameter-collecting trace, under which elbolab's modules register
themselves (:mod:`elbolab.param_store`). Two combinations would print a wrong number and are
refused by name: a model with enumerated sites under an objective that does not enumerate
(it would sample them from the prior, a looser bound, reported as if it summed them out), and
Pyro's ``RenyiELBO`` with several particles where the data plate is scaled (minibatches of a
model with global latents or a subsampling plate): its logsumexp over particles is taken of
log weights with the scale ``N / B`` inside, which is then no bound on anything.

Pyro's ``RenyiELBO`` keeps the plates every site shares as batch dims and takes its logsumexp
over particles per element: for a model whose sites all sit in the data plate it is the
per-point bound of elbolab's ``renyi`` (and ``iwae`` at ``alpha = 0``), the same numbers for the
same draws (``compare`` shows them side by side). What elbolab adds there is gradients: STL,
DReG, VIMCO for discrete guide sites, enumeration.
"""

from __future__ import annotations

__all__ = ["PYRO_ELBOS", "PyroObjective", "pyro_objective"]

from collections.abc import Callable
from typing import Any

import pyro.infer
import torch
from pyro import poutine
from torch import Tensor

from elbolab.contract import pair_contract
from elbolab.errors import InputError, closest_names

# The Pyro ELBOs a spec may name, and whether they sum out enumerated sites.
PYRO_ELBOS = {
    "Trace_ELBO": False,
    "TraceMeanField_ELBO": False,
    "TraceGraph_ELBO": False,
    "TraceEnum_ELBO": True,
    "RenyiELBO": False,
    "JitTrace_ELBO": False,
    "JitTraceMeanField_ELBO": False,
    "JitTraceGraph_ELBO": False,
    "JitTraceEnum_ELBO": True,
}


class PyroObjective:
    """A Pyro ELBO, run by its own code, with the ``differentiable_loss`` elbolab's step calls.

    Arguments:
        elbo: a ``pyro.infer.ELBO`` instance; or ``None`` with ``name``: built on the first call
            as ``pyro.infer.<name>(**options)``, with ``max_plate_nesting`` from the pair's
            contract (and ``vectorize_particles`` when ``num_particles > 1``).
        name, options: the class name of a Pyro ELBO (:data:`PYRO_ELBOS`) and its options.

    Example:
        >>> fit(model, guide, data, objective=pyro.infer.TraceGraph_ELBO())
        >>> fit(model, guide, data, objective="pyro:RenyiELBO:alpha=0:k=5")
    """

    supports_beta = False

    def __init__(self, elbo: pyro.infer.ELBO | None = None, name: str | None = None, **options: Any) -> None:
        if elbo is None and name not in PYRO_ELBOS:
            raise InputError(f"unknown Pyro objective {name!r}; {closest_names(str(name), PYRO_ELBOS)}")
        self.elbo, self.options = elbo, options
        self.name = type(elbo).__name__ if elbo is not None else name
        self.num_particles = elbo.num_particles if elbo is not None else int(options.get("num_particles", 1))
        # RenyiELBO and JitTraceGraph_ELBO have loss_and_grads only, which calls backward itself.
        self.computes_own_gradients = self.name in ("RenyiELBO", "JitTraceGraph_ELBO") or (
            elbo is not None and not hasattr(elbo, "differentiable_loss") and not hasattr(elbo, "_loss_and_surrogate_loss")
        )

    def _built(self, plate_nesting: int) -> pyro.infer.ELBO:
        if self.elbo is None:
            options = dict(self.options)
            options.setdefault("max_plate_nesting", plate_nesting)
            if options.get("num_particles", 1) > 1:
                options.setdefault("vectorize_particles", True)
            try:
                self.elbo = getattr(pyro.infer, self.name)(**options)
            except (TypeError, ValueError) as error:
                raise InputError(f"objective pyro:{self.name}: {error}") from None
        return self.elbo

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        """The Pyro ELBO's loss of the batch, differentiable (or with its gradients already in ``.grad``)."""
        contract = pair_contract(model, guide, args, kwargs)
        elbo = self._built(contract.plate_nesting)
        if contract.enumerated and not isinstance(elbo, pyro.infer.TraceEnum_ELBO):
            raise InputError(
                f"the model's site {contract.enumerated[0]!r} is marked for enumeration, and Pyro's {self.name} does not "
                "enumerate: it would sample the site from its prior, a looser bound. Use Pyro's TraceEnum_ELBO "
                "(max_plate_nesting set) or any elbolab objective, which sum it out"
            )
        if self.name == "RenyiELBO" and elbo.num_particles > 1 and contract.needs_scaling:
            raise InputError(
                "Pyro's RenyiELBO takes its logsumexp over particles of the whole batch's log weight, scale included; "
                "this model's data plate is scaled to the data set (global latents or a subsampling plate), and the "
                "result would bound nothing: use elbolab's renyi, which weighs each data point"
            )
        # Jit-compiled and Renyi objectives find parameters through param sites: elbolab's modules
        # emit them inside a parameter-collecting trace.
        with poutine.trace(param_only=True):
            if self.computes_own_gradients:
                value = elbo.loss_and_grads(model, guide, *args, **kwargs)
                # The gradients are in .grad already; the step's backward on this leaf adds none.
                return torch.tensor(float(value), dtype=args[0].dtype, device=args[0].device, requires_grad=True)
            if hasattr(elbo, "differentiable_loss"):
                return elbo.differentiable_loss(model, guide, *args, **kwargs)
            value, surrogate = elbo._loss_and_surrogate_loss(model, guide, args, kwargs)  # the ELBO, the surrogate loss
            loss = -(value.detach() if isinstance(value, Tensor) else torch.tensor(float(value)))
            return loss.to(surrogate) + surrogate - surrogate.detach()

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        """The loss as a float (Pyro's ``loss``)."""
        contract = pair_contract(model, guide, args, kwargs)
        with torch.no_grad(), poutine.trace(param_only=True):
            return float(self._built(contract.plate_nesting).loss(model, guide, *args, **kwargs))


def pyro_objective(name: str, **options: Any) -> PyroObjective:
    """``pyro:NAME`` of a spec: the Pyro ELBO ``NAME`` with ``options`` (``num_particles``, ``alpha``)."""
    return PyroObjective(None, name, **options)
