"""The VQ-VAE's posterior: encode, snap to the nearest codebook vector, pass gradients straight through.

    z_e = f_phi(x),    k_m = argmin_i ||z_e,m - e_i||,    q(k | x) = one-hot at k

(van den Oord et al. 2017). The sample handed to the model is ``z_e + stop_gradient(e_k - z_e)``:
its value is the codebook vector ``e_k`` and its gradient is the decoder's gradient at ``e_k``
copied to ``z_e`` (the straight-through estimator, Bengio et al. 2013). During training the
commitment loss ``beta ||z_e - stop_gradient(e_k)||^2`` enters as the guide's log-density (a
``Delta`` with ``log_density``), so that every objective adds it to its loss; in evaluation mode
the log-density is 0 and the estimators see the exact one-hot posterior.
"""

from __future__ import annotations

__all__ = ["NearestCodeGuide"]

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.models.vqvae import VQVAE
from elbolab.param_store import register


class NearestCodeGuide(nn.Module):
    """Encoder and quantizer for a :class:`~elbolab.models.VQVAE`, sharing (and updating) its codebook.

    In training mode with gradients enabled, each call moves the codebook one EMA step towards
    the batch's encoder outputs (:meth:`Codebook.update`).

    Arguments:
        model: the VQ-VAE whose codes this guide infers; the encoder uses its hidden widths.
    """

    def __init__(self, model: VQVAE) -> None:
        super().__init__()
        config = model.config
        self.num_codes, self.code_dim, self.commitment = model.num_codes, model.code_dim, model.commitment
        self.encoder = config.architecture(model.image_shape).code_encoder(model.x_dim, self.code_dim, self.num_codes)
        self.codebook = model.codebook  # shared with the model

    def encode(self, x: Tensor) -> Tensor:
        """The continuous encoder outputs ``z_e``, ``[N, num_codes, code_dim]``."""
        return self.encoder(x).reshape(*x.shape[:-1], self.num_codes, self.code_dim)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The code indices ``k`` of each data point, ``[N, num_codes]`` (int64)."""
        return self.codebook.nearest(self.encode(x))

    def forward(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        z_e = self.encode(x)
        codes = self.codebook.nearest(z_e.detach())
        z_q = self.codebook.embeddings[codes]  # a copy: the update below moves the codebook in place
        if self.training and torch.is_grad_enabled():
            self.codebook.update(z_e, codes)
        commitment = 0.0
        if self.training and self.commitment:
            commitment = self.commitment * (z_e - z_q.detach()).pow(2).sum((-2, -1))
        z = z_e + (z_q - z_e).detach()
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Delta(z, log_density=commitment, event_dim=2))
