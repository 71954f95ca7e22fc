"""Distributions that elbolab needs and torch/Pyro do not provide in the form it needs.

- :class:`BernoulliRow`: an observation distribution whose log density over a whole data row is
  one fused kernel.
- :class:`DiagonalGaussianMixture`: a mixture of diagonal Gaussians whose samples carry unbiased
  pathwise gradients for every parameter, mixture weights included.
- :class:`EqualGaussianMixture`: an equal-weight mixture of many diagonal Gaussians (the
  VampPrior's) whose density is two matrix products, not a ``[..., C, D]`` tensor.

``dist.Bernoulli(logits=out).to_event(1)`` computes ``-BCE(logits, x)`` elementwise and sums it:
the negation, its backward and the ``Independent`` wrapper each touch a ``[K, N, D]`` tensor.
With K = 50 importance samples of 784 binary pixels that is a tenth of an IWAE training step on
CPU (benchmarks/RESULTS.md, "The cost of K particles"). :class:`BernoulliRow` sums first and
negates the ``[K, N]`` result: same density, same gradients, fewer passes over memory.
"""

from __future__ import annotations

__all__ = ["BernoulliRow", "DiagonalGaussianMixture", "EqualGaussianMixture", "without_event_dims"]

import math
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Size, Tensor
from torch.distributions import constraints

NO_SHAPE = Size()


def without_event_dims(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """The distribution under every ``Independent`` (``.to_event(...)``) wrapping ``fn``."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


class BernoulliRow(dist.TorchDistribution):
    """Independent Bernoulli pixels of one data row, from logits: event shape ``[D]``.

        log p(x | logits) = sum_d [ x_d logits_d - softplus(logits_d) ]

    Equal to ``dist.Bernoulli(logits=logits).to_event(1)`` (tested), for ``x`` in ``{0, 1}`` and
    also for ``x`` in ``[0, 1]`` (the cross-entropy that grayscale data is often trained with).

    Arguments:
        logits: ``[..., D]`` log-odds of each pixel being 1.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @property
    def variance(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        return p * (1 - p)

    def expand(self, batch_shape: Size, _instance: BernoulliRow | None = None) -> BernoulliRow:
        new = BernoulliRow(self.logits.expand(*batch_shape, *self.event_shape), validate_args=False)
        new._validate_args = self._validate_args  # checks of the value still apply after a plate expands it
        return new

    def sample(self, sample_shape: Size = NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits).expand(shape))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if value.shape != logits.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1).neg()

    def entropy(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        return F.binary_cross_entropy_with_logits(self.logits, p, reduction="none").sum(-1)


class DiagonalGaussianMixture(dist.TorchDistribution):
    """``q(z) = sum_c pi_c N(z; mu_c, diag sigma_c^2)`` with implicit reparameterization gradients.

    Samples are drawn as usual (a component, then a Gaussian draw) and made differentiable by the
    implicit function theorem (Graves 2016, "Stochastic backpropagation through mixture density
    distributions"; Figurnov et al. 2018, "Implicit reparameterization gradients"). The
    multivariate distributional transform ``u_d = F_d(z_d | z_<d)``, with the conditional CDFs

        F_d(z) = sum_c w_cd(z_<d) Phi((z_d - mu_cd) / sigma_cd),
        w_cd ∝ pi_c prod_{j<d} N(z_j; mu_cj, sigma_cj),

    maps z to independent uniforms; holding u fixed, ``dz/dphi = -J^{-1} dF/dphi`` with ``J = dF/dz``
    lower triangular (diagonal: the conditional densities; below it: the responsibilities'
    dependence on earlier coordinates). The sample is returned as
    ``z - J^{-1} (F - stop_gradient(F))``: its value is z, its gradient the exact pathwise one, for
    the means, the scales and the weights alike, with one batched triangular solve.

    Pyro's ``MixtureOfDiagNormals`` also has pathwise gradients, but its gradient for the
    weights is biased for functions that are not linear in z: for the three-component example of
    ``tests/test_distributions.py`` and 400,000 samples, its estimate of ``d/dlogits E[z_0^2]``
    was off by 0.54 where the exact gradient's largest entry is 0.76; this estimator's by 0.005.

    Arguments:
        logits: ``[..., C]`` unnormalized log weights of the C components.
        loc: ``[..., C, D]`` component means.
        scale: ``[..., C, D]`` component standard deviations.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "logits": constraints.real_vector,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, validate_args: bool | None = None) -> None:
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(loc.shape[:-2], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Size, _instance: DiagonalGaussianMixture | None = None) -> DiagonalGaussianMixture:
        shape = tuple(batch_shape)
        new = DiagonalGaussianMixture(
            self.logits.expand(*shape, -1), self.loc.expand(*shape, -1, -1), self.scale.expand(*shape, -1, -1),
            validate_args=False,
        )
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return (self.logits.softmax(-1).unsqueeze(-1) * self.loc).sum(-2)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        components = _normal_log_prob(value.unsqueeze(-2), self.loc, self.scale).sum(-1)  # [..., C]
        return (self.logits.log_softmax(-1) + components).logsumexp(-1)

    def rsample(self, sample_shape: Size = NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)  # [*sample, *batch, D]
        logits = self.logits.expand(*shape[:-1], -1)
        loc, scale = self.loc.expand(*shape[:-1], -1, -1), self.scale.expand(*shape[:-1], -1, -1)
        with torch.no_grad():
            component = torch.distributions.Categorical(logits=logits).sample()
            pick = component[..., None, None].expand(*shape[:-1], 1, shape[-1])
            z = loc.gather(-2, pick).squeeze(-2) + scale.gather(-2, pick).squeeze(-2) * torch.randn(shape, dtype=loc.dtype, device=loc.device)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (logits, loc, scale))):
            return z  # nothing to differentiate (evaluation): skip the implicit gradient
        cdf, jacobian = _conditional_cdfs(z, logits, loc, scale)
        # value z; gradient -J^{-1} dF/dphi (implicit function theorem), J held constant.
        shift = torch.linalg.solve_triangular(jacobian, (cdf - cdf.detach()).unsqueeze(-1), upper=False)
        return z - shift.squeeze(-1)

    def sample(self, sample_shape: Size = NO_SHAPE) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class EqualGaussianMixture(dist.TorchDistribution):
    """``p(z) = (1/C) sum_c N(z; mu_c, diag sigma_c^2)``: C components of equal weight, shared by the batch.

    The log density of every component expands into matrix products over the D coordinates,

        log N(z; mu_c, sigma_c) = -1/2 z^2 . a_c + z . (mu_c a_c) - 1/2 mu_c^2 . a_c - sum_d log sigma_cd - D/2 log 2 pi,
        a_c = 1 / sigma_c^2,

    so that ``[M, D] x [D, C]`` products give the ``[M, C]`` component densities of M points
    without the ``[M, C, D]`` differences (with the VampPrior's 500 components, 25 times the
    memory of an IWAE batch). The products run in float64: the three terms are each of order
    ``(z / sigma)^2`` and cancel to order 1, which float32 would round off for small scales.

    Samples (a component drawn uniformly, then a Gaussian draw) are for generation and carry no
    gradient: in a model, the guide samples z and the prior only scores it.

    Arguments:
        loc: ``[C, D]`` component means.
        scale: ``[C, D]`` component standard deviations.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, loc: Tensor, scale: Tensor, batch_shape: Size = NO_SHAPE, validate_args: bool | None = None) -> None:
        if loc.ndim != 2 or loc.shape != scale.shape:
            raise ValueError(f"loc and scale must both be [components, D], got {tuple(loc.shape)} and {tuple(scale.shape)}")
        self.loc, self.scale = loc, scale
        super().__init__(Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Size, _instance: EqualGaussianMixture | None = None) -> EqualGaussianMixture:
        new = EqualGaussianMixture(self.loc, self.scale, Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return self.loc.mean(0).expand(self._extended_shape())

    def component_log_prob(self, value: Tensor) -> Tensor:
        """``log N(value; mu_c, sigma_c)`` of every component: ``[..., C]`` for ``value`` ``[..., D]``."""
        shape = value.shape[:-1]
        z = value.reshape(-1, value.shape[-1]).double()
        precision = self.scale.double().pow(-2)  # [C, D]
        weighted_loc = self.loc.double() * precision
        constant = -0.5 * (self.loc.double() * weighted_loc).sum(-1) - self.scale.double().log().sum(-1)
        quadratic = -0.5 * (z * z) @ precision.T + z @ weighted_loc.T  # [M, C]
        log_prob = quadratic + constant - value.shape[-1] * _HALF_LOG_2PI
        return log_prob.to(value.dtype).reshape(*shape, -1)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        components = self.component_log_prob(value)
        return components.logsumexp(-1) - math.log(components.shape[-1])

    def sample(self, sample_shape: Size = NO_SHAPE) -> Tensor:
        shape = self._extended_shape(sample_shape)  # [*sample, *batch, D]
        with torch.no_grad():
            component = torch.randint(self.loc.shape[0], shape[:-1], device=self.loc.device)
            noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc[component] + self.scale[component] * noise


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(value: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    return -0.5 * ((value - loc) / scale).pow(2) - scale.log() - _HALF_LOG_2PI


def _conditional_cdfs(z: Tensor, logits: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``F_d(z_d | z_<d)`` as a function of the parameters ``[..., D]``, and ``J = dF/dz`` (detached) ``[..., D, D]``."""
    z = z.detach().unsqueeze(-2)  # [..., 1, D]
    standardized = (z - loc) / scale  # [..., C, D]
    log_density = -0.5 * standardized.pow(2) - scale.log() - _HALF_LOG_2PI
    # Responsibilities of each component for coordinate d, given the coordinates before it.
    earlier = log_density.cumsum(-1) - log_density
    responsibility = (logits.log_softmax(-1).unsqueeze(-1) + earlier).softmax(-2)  # [..., C, D]
    component_cdf = torch.special.ndtr(standardized)
    cdf = (responsibility * component_cdf).sum(-2)  # [..., D]
    with torch.no_grad():
        w, phi = responsibility, component_cdf
        score = -standardized / scale  # d log N(z_j | c) / d z_j, [..., C, D]
        # dF_d/dz_j (j < d) = sum_c w_cd Phi_cd (s_cj - sum_c' w_c'd s_c'j)
        below = torch.einsum("...cd,...cj->...dj", w * phi, score) - cdf.detach().unsqueeze(-1) * torch.einsum(
            "...cd,...cj->...dj", w, score
        )
        diagonal = (w * log_density.exp()).sum(-2)  # the conditional densities q(z_d | z_<d)
        jacobian = below.tril(-1) + torch.diag_embed(diagonal.clamp_min(torch.finfo(z.dtype).tiny))
    return cdf, jacobian
