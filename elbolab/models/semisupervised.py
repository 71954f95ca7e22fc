"""The semi-supervised VAE (Kingma, Rezende, Mohamed & Welling 2014, model M2; Pyro's ``ss_vae`` example).

    y ~ Categorical(1 / C),   z ~ N(0, I),   x | y, z ~ p(x | decoder([z, onehot(y)]))
    q(y | x) = Categorical(classifier(x)),   q(z | x, y) = N(encoder([x, onehot(y)]))

A label is given for some points and missing for the others. Both kinds go through one program
and one batch: the labels are the guide's second argument, an integer per point with ``-1``
where it is missing, and the guide's ``q(y | x)`` is the one-hot label where there is one. With
``y`` enumerated in the guide (its site is marked ``infer={"enumerate": "parallel"}``, which
Pyro's ``TraceEnum_ELBO`` sums over) the ELBO of each point is M2's:

    labelled:   L(x, y) = E_q(z | x, y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]
    unlabelled: U(x)    = sum_y q(y | x) L(x, y) + H(q(y | x))

since ``q`` is one at the given label (and ``log q = 0`` there). elbolab's own objectives sample
``y`` from ``q(y | x)`` and give it score-function gradients (a learned baseline under ``elbo``,
VIMCO under ``iwae``); every estimator samples it too (importance sampling with the proposal
``q(y | x) q(z | x, y)``), so that ``log_likelihood`` of unlabelled points estimates ``log p(x)``
and of labelled ones ``log p(x, y)``.

The classifier learns from the unlabelled points through ``U(x)`` and, as in the paper, from the
labelled ones through an extra term ``alpha * -log q(y | x)``, which the guide adds while it is in
training mode (:meth:`torch.nn.Module.train`, as ``fit`` sets it; :class:`~elbolab.guides.SemiSupervisedGuide`) as the log density of an
auxiliary site: the loss that ``fit`` reports then includes it, and no estimate (in evaluation
mode) does.
"""

from __future__ import annotations

__all__ = ["MISSING", "SemiSupervisedVAE", "beside", "keep_labels", "one_hot"]

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.config import is_integer
from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood, ModelConfig
from elbolab.nn import mlp
from elbolab.param_store import register

MISSING = -1


def one_hot(index: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot`` as a comparison: no read of the values on the host, so that a traced step can hold it."""
    return (index.unsqueeze(-1) == torch.arange(num_classes, device=index.device)).to(dtype)


def beside(a: Tensor, b: Tensor) -> Tensor:
    """``[a, b]`` on the last dim, their leading dims broadcast (an enumerated label has its own dims)."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], dim=-1)


def keep_labels(y: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """``y`` with all but ``per_class`` labels of each class (chosen with ``seed``) set to ``-1`` (missing)."""
    if not is_integer(per_class) or per_class < 1:
        raise InputError(f"labels per class must be a positive integer, got {per_class!r}")
    generator = torch.Generator().manual_seed(seed)
    kept = torch.full_like(y, MISSING)
    for label in y.unique():
        rows = (y == label).nonzero().flatten()
        if rows.numel() < per_class:
            raise InputError(f"class {int(label)} has {rows.numel()} points, fewer than the {per_class} labels per class asked for")
        chosen = rows[torch.randperm(rows.numel(), generator=generator)[:per_class]]
        kept[chosen] = y[chosen]
    return kept


class SemiSupervisedVAE(nn.Module):
    """M2's generative model ``p(y) p(z) p(x | y, z)``, a Pyro program taking ``(x, y)`` (``y`` for the guide).

    The label site ``"y"`` is latent for every point: the guide supplies it (the given label, or a
    draw of its classifier). Pair it with :class:`SemiSupervisedGuide`.

    Arguments:
        x_dim: data width.
        num_classes: C, the number of labels.
        z_dim: latent width.
        hidden, likelihood, activation, obs_scale: as for :class:`~elbolab.models.VAE`.

    Example:
        >>> model = SemiSupervisedVAE(784, 10, 50, hidden=(500,))
        >>> guide = SemiSupervisedGuide(model, alpha=50.0)  # elbolab.guides
        >>> fit(model, guide, data, args=(keep_labels(data.y, 100),), objective="pyro:TraceEnum_ELBO")
    """

    def __init__(
        self,
        x_dim: int,
        num_classes: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        labels_per_class: int = 10,
        classification_weight: float = 50.0,
    ) -> None:
        super().__init__()
        if not is_integer(num_classes) or num_classes < 2:
            raise InputError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        # labels_per_class and classification_weight are the run's (the data's labels kept, the guide's alpha).
        self.config = ModelConfig("ssvae", z_dim, tuple(hidden), likelihood, activation, obs_scale,
                                  labels_per_class=labels_per_class, classification_weight=classification_weight)
        self.x_dim, self.num_classes, self.z_dim = x_dim, int(num_classes), z_dim
        self.decoder = mlp(z_dim + self.num_classes, tuple(reversed(self.config.hidden)), x_dim, activation)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        self.register_buffer("prior_loc", torch.zeros(z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(z_dim), persistent=False)
        self.register_buffer("label_logits", torch.zeros(self.num_classes), persistent=False)

    def forward(self, x: Tensor | None = None, y: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        n = x.shape[0] if x is not None else (batch_size or (y.shape[0] if y is not None else 1))
        with pyro.plate("data", n):
            label = pyro.sample("y", dist.Categorical(logits=self.label_logits))
            z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
            inputs = beside(z, one_hot(label, self.num_classes, z.dtype))
            return pyro.sample("x", self.observation(self.decoder(inputs)), obs=x)

    def reconstruct(self, x: Tensor, labels: Tensor | None = None, guide: Any = None, *, mean: bool = True) -> Tensor:
        """Encode ``x`` with ``guide`` (one draw of ``q(y | x)``, or the given labels, and of ``q(z | x, y)``) and decode it."""
        if guide is None:
            raise InputError("SemiSupervisedVAE.reconstruct needs the guide that encodes x")
        return decode_posterior_draws(self, guide, x, labels, mean=mean)

    def generate(self, n: int, y: int | None = None, *, mean: bool = True) -> Tensor:
        """``n`` draws ``z ~ p(z)`` decoded with label ``y`` (a label drawn from ``p(y)`` each when ``None``)."""
        program = self if y is None else pyro.poutine.condition(self, data={"y": torch.full((n,), int(y))})
        return decode_prior_draws(program, n, mean=mean)
