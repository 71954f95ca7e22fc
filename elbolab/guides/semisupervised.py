"""The guide of the semi-supervised VAE (Kingma et al. 2014, M2): a classifier q(y | x) and an encoder q(z | x, y).

See :mod:`elbolab.models.semisupervised` for the model, the bound and the classification term.
"""

from __future__ import annotations

__all__ = ["SemiSupervisedGuide"]

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.config import is_real
from elbolab.errors import InputError
from elbolab.models.semisupervised import MISSING, SemiSupervisedVAE, beside, one_hot
from elbolab.nn import GaussianEncoder, mlp
from elbolab.param_store import register
from elbolab.programs import is_traced


class SemiSupervisedGuide(nn.Module):
    """M2's guide: the classifier ``q(y | x)`` and the encoder ``q(z | x, y)``; called as ``guide(x, labels)``.

    Arguments:
        model: the :class:`SemiSupervisedVAE` (its widths and number of classes).
        alpha: the weight of the classification loss on the labelled points (training mode only).
        hidden: hidden widths of the classifier and the encoder (default: the model's).

    ``labels`` are integers ``[N]`` with ``-1`` where the label is missing, or ``None`` (all
    missing); :meth:`classify` gives ``q(y | x)``.
    """

    def __init__(self, model: SemiSupervisedVAE, alpha: float = 50.0, hidden: Sequence[int] | None = None) -> None:
        super().__init__()
        if not is_real(alpha) or alpha < 0:
            raise InputError(f"alpha must be a finite number >= 0, got {alpha!r}")
        hidden = tuple(hidden or model.config.hidden)
        self.num_classes, self.alpha = model.num_classes, float(alpha)
        self.classifier = mlp(model.x_dim, hidden, model.num_classes, model.config.activation)
        self.encoder = GaussianEncoder(model.x_dim + model.num_classes, model.z_dim, hidden, model.config.activation)

    def classify(self, x: Tensor) -> Tensor:
        """``q(y | x)``: class probabilities ``[N, C]``."""
        return self.classifier(x).softmax(-1)

    def forward(self, x: Tensor, labels: Tensor | None = None, *, batch_size: int | None = None) -> None:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        log_q = self.classifier(x).log_softmax(-1)
        probs = log_q.exp()
        labelled = None
        if labels is not None:
            if labels.is_floating_point() or labels.shape != (x.shape[0],):
                raise InputError(f"the labels must be integers [N] with -1 where missing, got {labels.dtype} {tuple(labels.shape)}")
            if not is_traced() and labels.numel() and (labels.min() < MISSING or labels.max() >= self.num_classes):
                raise InputError(f"labels must lie in 0..{self.num_classes - 1}, or be -1 where missing")
            labelled = labels >= 0
            given = one_hot(labels.clamp(min=0), self.num_classes, probs.dtype)
            probs = torch.where(labelled.unsqueeze(-1), given, probs)
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(probs), infer={"enumerate": "parallel"})
            loc, scale = self.encoder(beside(x, one_hot(label, self.num_classes, x.dtype)))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.training and labelled is not None and self.alpha > 0:
                # alpha * -log q(y | x) of each labelled point, added to the loss as a guide log density.
                penalty = -self.alpha * (log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * labelled)
                pyro.sample("_classification_loss", dist.Delta(torch.zeros_like(penalty), log_density=penalty),
                            infer={"is_auxiliary": True})
