"""The model contract, checked: one trace of a model and its guide, compared site by site.

Every objective and estimator of elbolab reads log densities off a guide's trace and the model's
trace replayed on it. Those numbers mean what they should only when the pair agrees: the guide
samples every latent site of the model and no site the model lacks, each at the value shape the
model expects, inside the model's support; the data plate and the observed sites are the ones
the estimator takes them to be. :func:`pair_contract` traces the pair once (per model, guide and
data shape), refuses a disagreement with an :class:`~elbolab.errors.InputError` naming the sites,
and returns a :class:`Contract` that says where the data plate and each kind of site are.

The data plate is found, not assumed: the plate (vectorized, around every observed site) whose
size is the batch's, or the one a model names with a ``data_plate`` attribute
(``model.data_plate = "batch"``). A model may declare it on the batch, ``pyro.plate("data", B)``,
or with Pyro's subsampling, ``pyro.plate("data", N, subsample_size=len(x))``, stating the full size.

:class:`DataPlateScale` gives every site inside the data plate one total scale, whichever idiom
the model uses and whether or not the guide's plate subsamples: ``N / B`` in training (so that a
minibatch loss is an unbiased estimate of the whole data set's objective, with global latents
counted once per pass), ``1`` in evaluation. It also hands the data plate its subsample indices
(the batch's rows), so that every batch size works.
"""

from __future__ import annotations

__all__ = [
    "Contract",
    "DataPlateScale",
    "check_observed_rows",
    "check_pair",
    "check_traced_rows",
    "find_data_plate",
    "floating_dtype",
    "pair_contract",
    "refuse_not_reparameterized",
    "trace_model",
]

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro import validation_enabled as pyro_validation
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from elbolab.data.checks import describe_support
from elbolab.errors import InputError

PARTICLE_PLATE = "particles"


@dataclass(frozen=True)
class Contract:
    """Where a model/guide pair keeps its data plate and its sites, as :func:`check_pair` found them.

    Attributes:
        data_plate: the name of the model's plate over the data points.
        guide_plate: the name of the guide's plate at the same dim (usually the same name), or
            ``None`` when the guide samples no per-point site.
        full_size: the number of data points the model's data plate states when it subsamples
            (``pyro.plate(name, N, subsample_size=B)``), else ``None``.
        subsampled_guide: whether the guide's plate over the data points subsamples.
        subsamples_input: whether the model subsamples the data it is given (Pyro's idiom for a
            whole data set, ``pyro.plate("data", len(x), subsample_size=B)`` with ``x[index]``
            inside): fine for an objective, refused by ``fit`` (which passes minibatches itself)
            and by the estimators (which weigh every point).
        observed: the model's observed sites, in order.
        local_latents: latent sites inside the data plate, one value per data point.
        global_latents: latent sites outside it, shared by every data point.
        auxiliary: guide sites marked ``infer={"is_auxiliary": True}`` (an auto guide's joint variable).
        enumerated: the model's discrete latents inside the data plate that the guide does not
            sample and that are marked ``infer={"enumerate": "parallel"}`` (or by Pyro's
            ``config_enumerate``): every objective and estimator sums them out exactly, per data point.
        not_reparameterized: guide sites whose distribution has no reparameterized sampler.
        plate_nesting: how many plates deep model and guide nest (where a particle plate goes).
        input_support: ``(site, support)`` when the model's one observed site observes its input
            ``x`` itself, rows first: the data's rows can then be checked against the support
            directly, without running the networks.
    """

    data_plate: str
    guide_plate: str | None
    full_size: int | None
    subsampled_guide: bool
    subsamples_input: bool
    observed: tuple[str, ...]
    local_latents: tuple[str, ...]
    global_latents: tuple[str, ...]
    auxiliary: tuple[str, ...]
    not_reparameterized: tuple[str, ...]
    plate_nesting: int
    input_support: tuple[str, Any] | None = None
    enumerated: tuple[str, ...] = ()

    @property
    def plates(self) -> frozenset[str]:
        """The names of the data plates of model and guide."""
        return frozenset(name for name in (self.data_plate, self.guide_plate) if name is not None)

    @property
    def needs_scaling(self) -> bool:
        """Whether a minibatch objective must scale the data plate: global latents or subsampling."""
        return bool(self.global_latents) or self.full_size is not None or self.subsampled_guide


class DataPlateScale(Messenger):
    """Give every sample site inside the data plate the total scale ``scale``; supply its subsample indices.

    A site inside a subsampling plate already carries ``full_size / subsample_size`` (Pyro's plate
    puts it there); that factor is replaced, not multiplied. ``indices`` (the batch's rows in the
    data set) become the subsample of a data plate that would draw its own at random.

    Example:
        >>> with DataPlateScale(contract.plates, num_points / batch_points, batch_index):
        ...     loss = objective.differentiable_loss(model, guide, batch)
    """

    def __init__(self, plates: frozenset[str], scale: float, indices: Tensor | None = None) -> None:
        super().__init__()
        self.plates, self.scale, self.indices = plates, float(scale), indices

    def _pyro_sample(self, msg: dict) -> None:
        if site_is_subsample(msg):
            if (
                msg["name"] in self.plates
                and msg["value"] is None
                and self.indices is not None
                and msg["fn"].subsample_size in (None, len(self.indices))
            ):
                msg["value"] = self.indices
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name in self.plates:
                subsampled = frame.full_size is not None and frame.full_size != frame.size
                factor = self.scale * frame.size / frame.full_size if subsampled else self.scale
                if factor != 1.0:
                    msg["scale"] = factor * msg["scale"]
                return


def _describe(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _shape_of(args: tuple) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in args)


def _run(what: str, program: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        program(*args, **kwargs)
    except InputError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError, NotImplementedError) as error:
        if "subsample_size does not match" in str(error):
            raise InputError(
                f"the {what}'s data plate fixes its subsample_size, but elbolab passes batches of other sizes "
                f"(here {args[0].shape[0]} points): write pyro.plate(NAME, N, subsample_size=len(x))"
            ) from None
        raise InputError(f"the {what} fails on input of shape {_shape_of(args)}: {_describe(error)}") from None


def check_pair(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> Contract:
    """Trace ``guide(*args)`` and ``model(*args)`` replayed on it once; compare their sites.

    Refused, each with an :class:`~elbolab.errors.InputError` naming the sites: a latent of the
    model that the guide does not sample, unless it is a discrete site inside the data plate marked
    for parallel enumeration (which the objectives sum out; see :func:`_check_enumerated`); a guide site the model does not have or observes; a latent inside the data plate in
    one program and outside it in the other; a guide value of another shape than the model's
    site, or outside its support; observed data outside their site's support (non-binary data
    under a Bernoulli likelihood, with the rows named); a model without observed sites or
    without a plate over the batch. Runs without gradients and leaves the random generators as
    it found them.
    """
    kwargs = kwargs or {}
    if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
        raise InputError("elbolab calls model(x, *args) with a batch of data x [N, ...] first; got no tensor")
    batch_size = args[0].shape[0]
    devices = [a.device for a in args if isinstance(a, Tensor) and a.is_cuda][:1]
    indices = torch.arange(batch_size, device=args[0].device)
    with torch.no_grad(), torch.random.fork_rng(devices=devices), poutine.block(), _Indices(indices):
        with poutine.trace() as guide_tracer:
            _run("guide", guide, args, kwargs)
        with poutine.trace() as model_tracer, poutine.replay(trace=guide_tracer.trace):
            _run("model (replayed on the guide's samples: " + _sample_shapes(guide_tracer.trace) + ")", model, args, kwargs)
    contract = _compare(model, model_tracer.trace, guide_tracer.trace, batch_size)
    if len(contract.observed) == 1:
        site = model_tracer.trace.nodes[contract.observed[0]]
        position = site["value"].dim() - len(site["fn"].event_shape) + next(
            f.dim for f in site["cond_indep_stack"] if f.name == contract.data_plate
        )
        if site["value"] is args[0] and position == 0:
            contract = dataclasses.replace(contract, input_support=(contract.observed[0], site["fn"].support))
    return contract


def _sample_shapes(trace: poutine.Trace) -> str:
    shapes = [f"{name} {tuple(site['value'].shape)}" for name, site in _sample_sites(trace) if isinstance(site["value"], Tensor)]
    return ", ".join(shapes) or "none"


class _Indices(Messenger):
    """Supplies ``arange(B)`` as the subsample of every plate that would draw its own (for the check's trace)."""

    def __init__(self, indices: Tensor) -> None:
        super().__init__()
        self.indices = indices

    def _pyro_sample(self, msg: dict) -> None:
        # A plate that does not subsample keeps its own size: a plate nested in the data plate
        # (of the points' parts, say) is not the batch's.
        if site_is_subsample(msg) and msg["value"] is None and _draws_batch(msg["fn"], len(self.indices)):
            msg["value"] = self.indices


def _draws_batch(subsample: Any, batch_size: int) -> bool:
    """Whether a plate's subsample (Pyro's ``_Subsample``) would be the batch's ``batch_size`` rows."""
    if subsample.subsample_size is None:
        return subsample.size == batch_size
    return subsample.subsample_size == batch_size


def _sample_sites(trace: poutine.Trace) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


def _plates(site: dict) -> list[Any]:
    return [frame for frame in site["cond_indep_stack"] if frame.vectorized and frame.name != PARTICLE_PLATE]


def _names(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in names) or "none"


def find_data_plate(model: Callable[..., Any], model_trace: poutine.Trace, batch_size: int) -> Any:
    """The frame (``name``, ``dim``, ``size``, ``full_size``) of the model's data plate in a trace of ``model``.

    Named by ``model.data_plate``, or else the plate around every observed site whose size is
    the batch's (``"data"`` among several); an :class:`InputError` says what was looked for and
    found when there is none or no single one.
    """
    observed = [(n, s) for n, s in _sample_sites(model_trace) if s["is_observed"]]
    if not observed:
        raise InputError("the model observes no data: no sample site has obs=..., so there is nothing to weigh")
    return _find_data_plate(model, observed, batch_size)


def trace_model(model: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> poutine.Trace:
    """One trace of ``model(*args)`` alone, as :func:`check_pair` runs it: no gradients, generators untouched."""
    devices = [a.device for a in args if isinstance(a, Tensor) and a.is_cuda][:1]
    indices = torch.arange(args[0].shape[0], device=args[0].device)
    with torch.no_grad(), torch.random.fork_rng(devices=devices), poutine.block(), _Indices(indices):
        with poutine.trace() as tracer:
            _run("model", model, args, kwargs or {})
    return tracer.trace


def _find_data_plate(model: Callable[..., Any], observed: list[tuple[str, dict]], batch_size: int) -> Any:
    named = getattr(model, "data_plate", None)
    common = None
    for _, site in observed:
        frames = {frame.name: frame for frame in _plates(site)}
        common = frames if common is None else {k: v for k, v in common.items() if k in frames}
    common = common or {}
    if named is not None:
        if named not in common:
            raise InputError(
                f"the model names its data plate {named!r} (model.data_plate), but the observed site(s) "
                f"{_names([n for n, _ in observed])} sit in plates {_names(sorted(common))}"
            )
        return common[named]
    over_batch = [frame for frame in common.values() if frame.size == batch_size]
    if not over_batch:  # Pyro's idiom for a whole data set: the plate subsamples the x it is given
        over_batch = [frame for frame in common.values() if frame.full_size == batch_size]
    if len(over_batch) > 1:
        over_batch = [frame for frame in over_batch if frame.name == "data"] or over_batch
    if len(over_batch) == 1:
        return over_batch[0]
    found = ", ".join(f"{name!r} (size {frame.size})" for name, frame in common.items()) or "none"
    fixed = [f for f in common.values() if f.full_size is not None and f.full_size != f.size]
    if not over_batch and fixed:
        raise InputError(
            f"the model's data plate {fixed[0].name!r} draws subsample_size={fixed[0].size} of its {fixed[0].full_size} "
            f"points, but is given a batch of {batch_size}: write pyro.plate({fixed[0].name!r}, N, subsample_size=len(x)) "
            "so that every batch size works"
        )
    if not over_batch:
        raise InputError(
            f"found no plate over the batch of {batch_size} data points around the observed site(s) "
            f"{_names([n for n, _ in observed])}: elbolab looks for pyro.plate(NAME, {batch_size}) (or "
            f"pyro.plate(NAME, N, subsample_size={batch_size})) around every observed site, and found plates {found}"
        )
    raise InputError(
        f"several plates of size {batch_size} surround the observed sites ({found}); name the data plate "
        "with model.data_plate = NAME"
    )


def _compare(model: Callable[..., Any], model_trace: poutine.Trace, guide_trace: poutine.Trace, batch_size: int) -> Contract:
    model_sites = dict(_sample_sites(model_trace))
    guide_sites = dict(_sample_sites(guide_trace))
    observed = [(n, s) for n, s in model_sites.items() if s["is_observed"]]
    latents = [(n, s) for n, s in model_sites.items() if not s["is_observed"]]
    if not observed:
        raise InputError("the model observes no data: no sample site has obs=..., so there is nothing to weigh")
    auxiliary = [n for n, s in guide_sites.items() if s["infer"].get("is_auxiliary")]
    guide_latents = [n for n, s in guide_sites.items() if not s["infer"].get("is_auxiliary") and not s["is_observed"]]
    frame = _find_data_plate(model, observed, batch_size)
    enumerated = [(n, s) for n, s in latents if s["infer"].get("enumerate") and n not in guide_sites]
    for name, site in enumerated:
        _check_enumerated(name, site, frame.name)
    summed_out = {n for n, _ in enumerated}
    latents = [(n, s) for n, s in latents if n not in summed_out]
    for name, _ in latents:
        if name not in guide_sites or guide_sites[name]["infer"].get("is_auxiliary"):
            raise InputError(
                f"the model's latent site {name!r} is not sampled by the guide (the guide samples "
                f"{_names(guide_latents)}): a guide must sample every latent site of the model, under the same name"
            )
    for name in guide_latents:
        if name not in model_sites:
            raise InputError(
                f"the guide samples {name!r}, which is not a site of the model (the model's latents: "
                f"{_names([n for n, _ in latents])}); rename the guide's site or the model's"
            )
        if model_sites[name]["is_observed"]:
            raise InputError(f"the guide samples {name!r}, which the model observes (obs=...); a guide samples latents only")

    data_plate, data_dim = frame.name, frame.dim
    full_size = frame.full_size if frame.full_size is not None and frame.full_size != frame.size else None
    for name, site in observed:
        _check_observed(name, site, data_dim)

    guide_plate, subsampled_guide = None, False
    local, global_ = [], []
    for name, site in latents:
        q_site = guide_sites[name]
        in_model = any(f.name == data_plate for f in _plates(site))
        q_frames = [f for f in _plates(q_site) if f.dim == data_dim and f.size == frame.size]
        if in_model != bool(q_frames):
            where = "inside" if in_model else "outside"
            other = "outside" if in_model else "inside"
            raise InputError(
                f"latent site {name!r} sits {where} the model's data plate {data_plate!r} but {other} the guide's "
                f"plate over the data points (dim {data_dim}): a per-point latent must be per-point in both"
            )
        if q_frames:
            if guide_plate is not None and q_frames[0].name != guide_plate:
                raise InputError(f"the guide's per-point sites sit in two plates, {guide_plate!r} and {q_frames[0].name!r}")
            guide_plate = q_frames[0].name
            subsampled_guide = q_frames[0].full_size not in (None, q_frames[0].size)
        (local if in_model else global_).append(name)
        expected = tuple(site["fn"].batch_shape + site["fn"].event_shape)
        got = tuple(q_site["value"].shape)
        if got != expected:
            raise InputError(
                f"latent site {name!r}: the guide's value has shape {got}, the model's site {expected} "
                f"(batch shape {tuple(site['fn'].batch_shape)}, event shape {tuple(site['fn'].event_shape)})"
            )
        _check_in_support({**site, "value": q_site["value"]}, f"the guide's draws of {name!r}")
    not_reparameterized = tuple(
        n for n in guide_latents + auxiliary if not getattr(guide_sites[n]["fn"], "has_rsample", False)
    )
    return Contract(
        data_plate=data_plate,
        guide_plate=guide_plate,
        full_size=full_size,
        subsampled_guide=subsampled_guide,
        subsamples_input=frame.size != batch_size,
        observed=tuple(n for n, _ in observed),
        local_latents=tuple(local),
        global_latents=tuple(global_),
        auxiliary=tuple(auxiliary),
        not_reparameterized=not_reparameterized,
        enumerated=tuple(n for n, _ in enumerated),
        plate_nesting=max(
            (-f.dim for trace in (model_sites, guide_sites) for s in trace.values() for f in _plates(s)), default=0
        ),
    )


def _check_enumerated(name: str, site: dict, data_plate: str) -> None:
    """Refuse a site marked for enumeration that elbolab cannot sum out exactly per data point.

    Summed out are discrete sites with an enumerable support, marked ``"parallel"``, inside the
    data plate and in no plate nested in it: their values are laid out on dims left of every
    plate (and of the particle plate), and a point's weight is the logsumexp over those dims of
    the sum of its sites' log densities. A discrete latent outside the data plate would couple
    every point's sum; one inside a nested plate would need a sum per nested element before the
    product over them.
    """
    how = site["infer"].get("enumerate")
    if how != "parallel":
        raise InputError(
            f"the model's discrete site {name!r} is marked infer={{'enumerate': {how!r}}}; elbolab sums out "
            "sites marked 'parallel' (config_enumerate's default): mark it so"
        )
    if not getattr(site["fn"], "has_enumerate_support", False):
        raise InputError(
            f"the model's site {name!r} ({type(site['fn']).__name__}) is marked for enumeration, but its "
            "distribution has no finite support to enumerate"
        )
    plates = [f.name for f in _plates(site)]
    if data_plate not in plates:
        raise InputError(
            f"the model's discrete site {name!r} is marked for enumeration but sits outside the data plate "
            f"{data_plate!r} (a global discrete latent): elbolab sums out per-point discrete latents only; "
            "sample it in the guide, or train with Pyro's TraceEnum_ELBO"
        )
    if len(plates) > 1:
        raise InputError(
            f"the model's discrete site {name!r} is marked for enumeration inside plates {plates}; elbolab sums "
            f"out discrete latents directly inside the data plate {data_plate!r}, not in plates nested in it"
        )


def _check_observed(name: str, site: dict, data_dim: int, offset: int = 0) -> None:
    """Refuse data outside the support of the site that observes them, naming the rows (counted from ``offset``)."""
    value = site["value"]
    if not isinstance(value, Tensor):
        return
    position = value.dim() - len(site["fn"].event_shape) + data_dim  # the plate's dim counts from the batch shape's right
    if position < 0:
        return
    rows = value.movedim(position, 0)
    try:
        # Moving the data dim first keeps the event dims last, where the support reads them.
        inside = site["fn"].support.check(rows).reshape(rows.shape[0], -1).all(1)
    except (RuntimeError, NotImplementedError):
        return  # a support that cannot check this value (a dependent one): leave it to the density
    if bool(inside.all()):
        return
    bad = (~inside).nonzero().flatten() + offset
    shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
    plural = "s" if bad.numel() > 1 else ""
    raise InputError(
        f"the data has values outside the support of site {name!r}, {describe_support(site['fn'].support)}, "
        f"in {bad.numel()} row{plural} (row{plural} {shown})"
    )


def check_observed_rows(
    model: Callable[..., Any], guide: Callable[..., Any], args: tuple, contract: Contract, offset: int = 0
) -> None:
    """Refuse rows of the data (``args[0]`` and what the model observes of it) outside their sites' supports.

    :func:`pair_contract` checks structure once per pair; the data change from call to call, so
    every entry point checks its rows with this (or on traces it runs anyway).
    """
    devices = [a.device for a in args if isinstance(a, Tensor) and a.is_cuda][:1]
    indices = torch.arange(offset, offset + args[0].shape[0], device=args[0].device)
    with torch.no_grad(), torch.random.fork_rng(devices=devices), poutine.block(), _Indices(indices):
        with poutine.trace() as guide_tracer:
            _run("guide", guide, args, {})
        with poutine.trace() as model_tracer, poutine.replay(trace=guide_tracer.trace), pyro_validation(False):
            _run("model", model, args, {})
    check_traced_rows(model_tracer.trace, contract, offset)


def check_traced_rows(model_trace: poutine.Trace, contract: Contract, offset: int = 0) -> None:
    """:func:`check_observed_rows` on a model trace already run (an estimator's chunk)."""
    for name in contract.observed:
        site = model_trace.nodes[name]
        data_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == contract.data_plate)
        _check_observed(name, site, data_dim, offset)


def _check_in_support(site: dict, what: str) -> None:
    """Refuse guide draws outside the support of the model's site."""
    fn, value = site["fn"], site["value"]
    try:
        inside = bool(fn.support.check(value).all())
    except (RuntimeError, ValueError, NotImplementedError):
        return
    if not inside:
        raise InputError(f"{what} lie outside the model's support for it, {describe_support(fn.support)}")


# The last pairs checked: (model, guide, their input layout) -> contract. The entries hold the
# model and guide themselves, so that an id is never reused while its entry lives.
_CHECKED: OrderedDict[tuple, tuple[Any, Any, Contract]] = OrderedDict()
_CHECKED_MAX = 16


def pair_contract(model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> Contract:
    """:func:`check_pair`, once per model, guide and input layout (shapes beyond the batch, dtypes)."""
    layout = tuple((tuple(a.shape[1:]), a.dtype, a.device) if isinstance(a, Tensor) else type(a) for a in args)
    key = (id(model), id(guide), layout, tuple(sorted((kwargs or {}).keys())))
    entry = _CHECKED.get(key)
    if entry is not None:
        _CHECKED.move_to_end(key)
        return entry[2]
    contract = check_pair(model, guide, args, kwargs)
    _CHECKED[key] = (model, guide, contract)
    while len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)
    return contract


def floating_dtype(*programs: Any) -> torch.dtype:
    """The dtype data must have to feed these programs: their first floating parameter's, else torch's default."""
    for program in programs:
        if isinstance(program, nn.Module):
            for tensor in itertools.chain(program.parameters(), program.buffers()):
                if tensor.is_floating_point():
                    return tensor.dtype
    return torch.get_default_dtype()


def refuse_not_reparameterized(contract: Contract, objective: str) -> None:
    """An objective with pathwise gradients refuses guide sites it cannot differentiate through."""
    if contract.not_reparameterized:
        name = contract.not_reparameterized[0]
        raise InputError(
            f"{objective} differentiates through the guide's samples, and the guide's site {name!r} has no "
            "reparameterized sampler (a discrete or score-function site): its gradient would be silently biased"
        )

