"""The VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"): the prior as the guide's posterior at learned pseudo-inputs.

    p_lambda(z) = (1/K) sum_k q_phi(z | u_k)

with K pseudo-inputs ``u_k`` learned with the model. The aggregated posterior
``(1/N) sum_n q(z | x_n)`` is the prior that maximizes the ELBO averaged over the data
(Hoffman & Johnson 2016); the VampPrior approximates it with K << N points, and the shared
encoder ties prior and posterior together. Tomczak & Welling report -85.57 nats on the fixed
binarization of MNIST for a one-layer VAE, against -88.56 with the standard normal prior.

The prior needs the guide's encoder, which a Pyro model does not otherwise see:
:meth:`VampPrior.share_encoder` gives it one (the model families do it when they build the
guide). The encoder is referenced, not owned: its parameters stay the guide's, in the guide's
weights, and the model's state holds the pseudo-inputs alone.

Pseudo-inputs are ``u = sigmoid(w)``: in (0, 1) like the data, with a gradient everywhere (the
paper's hard-tanh has none at 0 and 1, where pseudo-inputs started at binary data would sit).
``init_from_data`` starts them at randomly chosen training points, the paper's option for faster
training.
"""

from __future__ import annotations

__all__ = ["VampPrior"]

from typing import Any

import torch
from torch import Tensor, nn

from elbolab.distributions import EqualGaussianMixture
from elbolab.errors import InputError


class VampPrior(nn.Module):
    """``p(z) = (1/K) sum_k q(z | u_k)``, a mixture of the guide's diagonal Gaussians at K pseudo-inputs.

    Arguments:
        x_dim: data width (the pseudo-inputs are data-shaped).
        pseudo_inputs: K.

    Example:
        >>> prior = VampPrior(784, 500)
        >>> prior.share_encoder(guide)  # a guide with encode(x) -> (loc, scale), e.g. GaussianGuide
        >>> prior.distribution().log_prob(z)  # [..., z_dim] -> [...]
    """

    def __init__(self, x_dim: int, pseudo_inputs: int = 500) -> None:
        super().__init__()
        if not isinstance(pseudo_inputs, int) or pseudo_inputs < 1:
            raise InputError(f"pseudo_inputs must be a positive integer, got {pseudo_inputs!r}")
        self.logits = nn.Parameter(0.01 * torch.randn(pseudo_inputs, x_dim))
        self._encoder: list[Any] = []  # a list, so that nn.Module does not adopt the guide as a submodule

    @property
    def pseudo_inputs(self) -> Tensor:
        """``u``, ``[K, x_dim]``, in (0, 1)."""
        return torch.sigmoid(self.logits)

    def share_encoder(self, guide: Any) -> None:
        """Use ``guide.encode(x) -> (loc, scale)``, a diagonal Gaussian ``q(z | x)``, as the components' encoder."""
        encode = getattr(guide, "encode", None)
        with torch.no_grad():
            probe = encode(self.pseudo_inputs[:1]) if callable(encode) else None
        if not (isinstance(probe, tuple) and len(probe) == 2 and probe[0].shape == probe[1].shape):
            raise InputError(
                f"the VampPrior mixes the guide's diagonal-Gaussian q(z|u_k); a {type(guide).__name__} does not "
                "give one (encode(x) -> (loc, scale)): use the gaussian guide"
            )
        self._encoder[:] = [guide]

    @torch.no_grad()
    def init_from_data(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Start the pseudo-inputs at K training points drawn without replacement (with repeats when N < K)."""
        rows = x.reshape(x.shape[0], -1)
        count = self.logits.shape[0]
        pick = torch.randperm(rows.shape[0], generator=generator)[:count]
        if pick.numel() < count:
            pick = pick.repeat(-(-count // pick.numel()))[:count]
        # logit(0.05) to logit(0.95): binary pixels start near, not at, the sigmoid's saturation.
        self.logits.copy_(torch.logit(rows[pick].float().clamp(0.05, 0.95)).to(self.logits))

    def distribution(self) -> EqualGaussianMixture:
        """The prior: batch shape ``[]``, event shape ``[z_dim]`` (expand it to the data plate)."""
        if not self._encoder:
            raise InputError(
                "the VampPrior has no encoder: call model.prior.share_encoder(guide) with the model's guide "
                "(the model families do it when they build the guide)"
            )
        loc, scale = self._encoder[0].encode(self.pseudo_inputs)
        return EqualGaussianMixture(loc, scale)
