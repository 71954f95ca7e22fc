"""The vector-quantized VAE: a discrete latent code, each entry one of K learned vectors.

    z = (e_{k_1}, ..., e_{k_M}),  k_m ~ Uniform{1..K}  (the prior),    x | z ~ p_theta(x | z)

(van den Oord, Vinyals & Kavukcuoglu 2017, "Neural discrete representation learning"). The
guide (:class:`~elbolab.guides.NearestCodeGuide`) encodes ``x`` to M continuous vectors and
snaps each to its nearest codebook vector: a deterministic, one-hot posterior ``q(k | x)``.
Its entropy is 0 and ``KL(q || p) = M log K``, so

    ELBO(x) = log p(x | z_q(x)) - M log K,

the reconstruction term up to a constant, as the paper says. Here the latent site ``"z"`` holds
the code *vectors* (the prior :class:`UniformCodebook` puts mass ``1/K`` on each codebook vector
per entry), so that the straight-through gradient (``z_e + stop_gradient(z_q - z_e)``) passes from
the decoder to the encoder through the model's input. The codebook is not trained by gradient:
it is an exponential moving average of the encoder outputs assigned to each code (the paper's
appendix A.1), with dead codes restarted at random encoder outputs (Dhariwal et al. 2020,
"Jukebox", section 2.3). Codebook usage is reported as perplexity, ``exp(entropy)`` of the code
frequencies: ``K`` when every code is used equally, 1 when one code takes all.
"""

from __future__ import annotations

__all__ = ["VQVAE", "Codebook", "UniformCodebook", "code_usage"]

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from elbolab.errors import InputError
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vae import Likelihood, ModelConfig, start_at_data_mean
from elbolab.nn import Architecture
from elbolab.nn.architecture import output_layer
from elbolab.param_store import register


class UniformCodebook(dist.TorchDistribution):
    """Uniform prior over codes: each of ``num_codes`` entries is one of the K codebook vectors.

    Event shape ``[num_codes, code_dim]``. ``log_prob`` is ``-num_codes log K`` for every value: the
    values it is evaluated at are codebook vectors (the guide's quantized codes, whose
    straight-through form differs from a codebook vector only by a gradient path).
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector

    def __init__(self, embeddings: Tensor, num_codes: int, batch_shape: Sequence[int] = (), validate_args: Any = None) -> None:
        self.embeddings = embeddings
        self.num_codes = num_codes
        super().__init__(torch.Size(batch_shape), torch.Size((num_codes, embeddings.shape[1])), validate_args=False)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> UniformCodebook:
        return UniformCodebook(self.embeddings, self.num_codes, torch.Size(batch_shape))

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + (self.num_codes,)
        codes = torch.randint(self.embeddings.shape[0], shape, device=self.embeddings.device)
        return self.embeddings[codes]

    def log_prob(self, value: Tensor) -> Tensor:
        batch = value.shape[: value.dim() - 2]
        return value.new_full(batch, -self.num_codes * math.log(self.embeddings.shape[0]))


class Codebook(nn.Module):
    """K vectors of width ``code_dim``, kept as buffers and updated by exponential moving averages.

    For the encoder outputs assigned to code ``i`` in a batch, count ``n_i`` and sum ``s_i``:

        N_i <- decay N_i + (1 - decay) n_i,    m_i <- decay m_i + (1 - decay) s_i,    e_i = m_i / N_i

    with ``N`` Laplace-smoothed by ``epsilon`` (van den Oord et al. 2017, appendix A.1). The first
    update starts the codes at random encoder outputs, so that none starts far from the data. A
    code that no encoder output chose during the last ``dead_after * K`` assignments (a code used
    at the uniform rate 1/K would have been chosen ``dead_after`` times in expectation) is dead: it
    is moved to a random encoder output of the batch and given the mean count, time to win
    assignments. The updates run on the device, without host synchronization.

    Arguments:
        codebook_size: K.
        code_dim: width of a code vector.
        decay: EMA decay (0.99 in the paper).
        dead_after: restart a code unused for this many times its uniform share of assignments
            (``0`` never restarts).
        epsilon: Laplace smoothing of the counts.
    """

    def __init__(
        self, codebook_size: int, code_dim: int, decay: float = 0.99, dead_after: float = 10.0, epsilon: float = 1e-5
    ) -> None:
        super().__init__()
        self.decay, self.dead_after, self.epsilon = decay, dead_after, epsilon
        embeddings = torch.randn(codebook_size, code_dim)
        self.register_buffer("embeddings", embeddings)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", embeddings.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("idle", torch.zeros(codebook_size))  # assignments since each code was last chosen
        # Assignments since the last usage() call: the codebook's usage over an epoch.
        self.register_buffer("counts", torch.zeros(codebook_size), persistent=False)

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def nearest(self, z_e: Tensor) -> Tensor:
        """Index of the nearest code vector for each vector of ``z_e [..., code_dim]``."""
        flat = z_e.reshape(-1, z_e.shape[-1])
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embeddings.T + self.embeddings.pow(2).sum(1)
        return distances.argmin(1).reshape(z_e.shape[:-1])

    @torch.no_grad()
    def update(self, z_e: Tensor, codes: Tensor) -> None:
        """One EMA step towards the encoder outputs ``z_e`` assigned to ``codes``, then dead-code restarts."""
        flat, codes = z_e.detach().reshape(-1, z_e.shape[-1]), codes.reshape(-1)
        random_outputs = flat[torch.randint(flat.shape[0], (self.size,), device=flat.device)]
        mean_count = torch.full_like(self.cluster_size, flat.shape[0] / self.size)
        # Data-dependent start, as a select rather than a branch: no host synchronization.
        start = ~self.initialized
        self.embeddings.copy_(torch.where(start, random_outputs, self.embeddings))
        self.cluster_size.copy_(torch.where(start, mean_count, self.cluster_size))
        self.embedding_sum.copy_(torch.where(start, random_outputs * mean_count.unsqueeze(1), self.embedding_sum))
        self.initialized.fill_(True)
        # A comparison, not F.one_hot, which reads the codes' range on the host to check it (a sync,
        # and a value a compiled step cannot trace).
        one_hot = (codes.unsqueeze(1) == torch.arange(self.size, device=codes.device)).to(flat.dtype)
        counts = one_hot.sum(0)
        self.counts += counts
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(one_hot.T @ flat, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.size * self.epsilon) * total
        self.embeddings.copy_(self.embedding_sum / smoothed.unsqueeze(1))
        self.idle.copy_(torch.where(counts > 0, torch.zeros_like(self.idle), self.idle + flat.shape[0]))
        if not self.dead_after:
            return
        mean = self.cluster_size.mean()
        dead = self.idle >= self.dead_after * self.size
        self.idle.masked_fill_(dead, 0.0)
        self.embeddings.copy_(torch.where(dead.unsqueeze(1), random_outputs, self.embeddings))
        self.embedding_sum.copy_(torch.where(dead.unsqueeze(1), random_outputs * mean, self.embedding_sum))
        self.cluster_size.copy_(torch.where(dead, mean, self.cluster_size))

    @torch.no_grad()
    def usage(self, reset: bool = True) -> dict[str, float]:
        """Perplexity and number of codes used among the assignments since the last reset."""
        counts = self.counts.clone()
        if reset:
            self.counts.zero_()
        return code_usage(counts)


def code_usage(counts: Tensor) -> dict[str, float]:
    """``{"perplexity": exp(H), "codes_used": #codes with a count, "code_bits": H / ln 2}`` of code counts."""
    total = counts.sum()
    if total == 0:
        return {"perplexity": math.nan, "codes_used": 0, "code_bits": math.nan}
    p = counts / total
    entropy = -(p * p.clamp_min(1e-30).log()).sum().item()
    return {"perplexity": math.exp(entropy), "codes_used": int((counts > 0).sum().item()), "code_bits": entropy / math.log(2)}


class VQVAE(nn.Module):
    """The VQ-VAE's generative model: uniform codes from a codebook, decoded to ``p(x | z)``.

    Follows the model contract: latent ``"z"`` (``[N, num_codes, code_dim]`` code vectors) and
    observation ``"x"`` inside ``pyro.plate("data", N)``; ``model(None, batch_size=n)`` decodes
    uniformly drawn codes. Pair it with :class:`~elbolab.guides.NearestCodeGuide`, which holds the
    encoder and updates this model's codebook.

    Arguments:
        x_dim: data width.
        codebook_size: K.
        code_dim: width of a code vector.
        num_codes: M, code vectors per data point.
        hidden: encoder hidden widths (the decoder runs them reversed).
        likelihood, activation, obs_scale: as for :class:`~elbolab.models.VAE`.
        commitment: beta, the weight of ``||z_e - stop_gradient(z_q)||^2`` (the guide applies it).
        decay: EMA decay of the codebook.
        architecture: the networks: an MLP of ``hidden`` (default), or convolutions
            (``ModelConfig(arch="conv").architecture(image_shape)``), whose codes form the last
            stage's spatial grid, one per cell, as in the VQ-VAE paper: ``num_codes`` is then the
            grid's h x w, and another value is refused.

    Example:
        >>> model = VQVAE(64, codebook_size=32, code_dim=4, num_codes=4, hidden=(128,))
        >>> guide = NearestCodeGuide(model)
    """

    def __init__(
        self,
        x_dim: int,
        codebook_size: int = 64,
        code_dim: int = 16,
        num_codes: int = 8,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        commitment: float = 0.25,
        decay: float = 0.99,
        architecture: Architecture | None = None,
    ) -> None:
        super().__init__()
        architecture = architecture or Architecture("mlp", tuple(hidden), activation)
        cells = architecture.code_cells(num_codes)
        if num_codes != cells and num_codes != ModelConfig.num_codes:
            raise InputError(f"num_codes is {num_codes}, but the conv encoder gives one code per cell of its "
                             f"{cells}-cell grid: leave num_codes out (or set it to {cells})")
        num_codes = cells
        self.config = ModelConfig(
            "vqvae", code_dim, architecture.hidden, likelihood, architecture.activation, obs_scale,
            codebook_size=codebook_size, num_codes=num_codes, commitment=commitment, arch=architecture.kind,
            channels=architecture.channels, kernel=architecture.kernel, residual_blocks=architecture.residual_blocks,
            gated=architecture.gated,
        )
        self.image_shape = architecture.image_shape
        if not 0 < decay < 1:
            raise InputError(f"decay must lie in (0, 1), got {decay}")
        self.x_dim, self.code_dim, self.num_codes, self.commitment = x_dim, code_dim, num_codes, commitment
        self.codebook = Codebook(codebook_size, code_dim, decay)
        self.decoder = architecture.code_decoder(code_dim, num_codes, x_dim)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> VQVAE:
        """Start the decoder at the data's per-pixel mean (see :meth:`VAE.init_output_bias`)."""
        start_at_data_mean(output_layer(self.decoder), x, self.config.likelihood)
        return self

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        n = x.shape[0] if x is not None else (batch_size or 1)
        with pyro.plate("data", n):
            z = pyro.sample("z", UniformCodebook(self.codebook.embeddings, self.num_codes))
            return pyro.sample("x", self.observation(self.decoder(z.flatten(-2))), obs=x)

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        """``n`` uniformly drawn codes, decoded: means of ``p(x | z)``, or samples with ``mean=False``."""
        return decode_prior_draws(self, n, mean=mean)

    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Quantize ``x`` with ``guide`` and decode its code: ``[N, x_dim]``."""
        if guide is None:
            raise InputError("VQVAE.reconstruct needs the guide (the encoder and quantizer)")
        return decode_posterior_draws(self, guide, x, mean=mean)

    def training_report(self) -> dict[str, float]:
        """Codebook usage since the last report (``fit`` adds it to each epoch's history row)."""
        usage = self.codebook.usage()
        return {"perplexity": usage["perplexity"], "codes_used": usage["codes_used"]}
