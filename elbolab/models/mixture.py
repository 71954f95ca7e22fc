"""A VAE with a Gaussian-mixture prior: a per-point cluster, summed out exactly.

    c ~ Categorical(pi),    z | c ~ N(mu_c, diag(sigma_c^2)),    x | z ~ p(x | decoder(z))

The generative model of VaDE (Jiang et al. 2017, "Variational deep embedding") and of the
Gaussian-mixture VAEs after Dilokthanakul et al. (2016). The cluster ``c`` is marked for
parallel enumeration, so every objective and estimator of elbolab sums it out per data point,

    log p(x, z) = log sum_c pi_c N(z; mu_c, sigma_c^2) + log p(x | z),

and the guide is one for ``z`` alone (any single-site guide: Gaussian, mixture, flow). The
posterior over clusters needs no network of its own: ``p(c | x) = E_{p(z | x)}[p(c | z)]``, with
``p(c | z)`` in closed form (:meth:`GaussianMixtureVAE.cluster_log_posterior`), estimated with draws of
the guide (VaDE's ``q(c | x)``). The mixture weights ``pi`` are uniform and fixed: learned
weights let components die early in training, and the clustering then uses fewer clusters.
"""

from __future__ import annotations

__all__ = ["GaussianMixtureVAE"]

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood, ModelConfig
from elbolab.nn import mlp
from elbolab.param_store import register


class GaussianMixtureVAE(nn.Module):
    """A VAE whose prior is a mixture of ``clusters`` diagonal Gaussians, with the cluster enumerated.

    Follows the model contract: the cluster ``"c"`` (enumerated), the latent ``"z"`` and the
    observation ``"x"`` inside ``pyro.plate("data", N)``; ``model(None, batch_size=n)`` generates.
    Pair it with a guide for ``"z"``, e.g. :class:`~elbolab.guides.GaussianGuide`.

    Arguments:
        x_dim: data width.
        z_dim: latent width.
        clusters: the number of clusters (mixture components).
        hidden: hidden widths (listed encoder-side; the decoder runs them reversed).
        likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"continuous-bernoulli"``.
        activation: decoder activation.
        obs_scale: Gaussian only: fixed observation scale, or ``None`` to learn one per pixel.
        spread: the standard deviation of the components' initial means (drawn from the
            current torch generator), so that they start apart.

    Example:
        >>> model = GaussianMixtureVAE(784, 10, clusters=10)
        >>> fit(model, GaussianGuide(784, 10), data)
        >>> cluster_assignments(model, guide, x)  # elbolab.analysis
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        clusters: int = 10,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        spread: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(clusters, int) or clusters < 2:
            raise InputError(f"clusters must be an integer of at least 2, got {clusters!r}")
        self.config = ModelConfig("gmvae", z_dim, tuple(hidden), likelihood, activation, obs_scale, clusters=clusters)
        self.x_dim, self.z_dim, self.clusters = x_dim, z_dim, clusters
        self.component_means = nn.Parameter(spread * torch.randn(clusters, z_dim))
        self.component_log_scales = nn.Parameter(torch.zeros(clusters, z_dim))
        self.register_buffer("mixture_logits", torch.zeros(clusters), persistent=False)
        self.decoder = mlp(z_dim, tuple(reversed(self.config.hidden)), x_dim, activation)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        n = x.shape[0] if x is not None else (batch_size or 1)
        with pyro.plate("data", n):
            # Enumerated, c is [C, 1, ..., 1] on a dim left of every plate, and so are the
            # component's mean and scale; the decoder runs once, on z, whatever c is.
            c = pyro.sample("c", dist.Categorical(logits=self.mixture_logits), infer={"enumerate": "parallel"})
            prior = dist.Normal(self.component_means[c], self.component_log_scales[c].exp()).to_event(1)
            z = pyro.sample("z", prior)
            return pyro.sample("x", self.observation(self.decoder(z)), obs=x)

    def cluster_log_posterior(self, z: Tensor) -> Tensor:
        """``log p(c | z)`` for every cluster, ``[..., clusters]``, from ``z`` ``[..., z_dim]``."""
        components = dist.Normal(self.component_means, self.component_log_scales.exp()).to_event(1)
        joint = components.log_prob(z.unsqueeze(-2)) + self.mixture_logits.log_softmax(-1)
        return joint - joint.logsumexp(-1, keepdim=True)

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        """``n`` draws ``c ~ pi, z ~ p(z | c)``, decoded: the means of ``p(x | z)``, or samples with ``mean=False``."""
        return decode_prior_draws(self, n, mean=mean)

    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Encode ``x`` with ``guide`` (one draw of ``q(z | x)``) and decode it: ``[N, x_dim]``."""
        if guide is None:
            raise InputError("GaussianMixtureVAE.reconstruct needs the guide that encodes x")
        return decode_posterior_draws(self, guide, x, mean=mean)
