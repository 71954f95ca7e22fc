"""The variational autoencoder as a Pyro model, and the deterministic autoencoder it is contrasted with.

    z ~ N(0, I),    x | z ~ p_theta(x | z)        (Kingma & Welling 2014)

The decoder maps ``z`` to the parameters of ``p(x | z)``: Bernoulli logits for binary data, a
Gaussian mean (with a fixed or a learned per-pixel scale), or the logits of a continuous
Bernoulli (Loaiza-Ganem & Cunningham 2019), which is normalized on [0, 1] and so gives a true
likelihood for grayscale data. The encoder is not part of the model: it is the guide.
"""

from __future__ import annotations

__all__ = ["LIKELIHOODS", "PRIORS", "VAE", "Autoencoder", "Likelihood", "ModelConfig", "check_likelihood", "start_at_data_mean"]

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import Tensor, nn

from elbolab.config import dataclass_from_dict, is_integer, is_real
from elbolab.data import Dataset
from elbolab.distributions import BernoulliRow
from elbolab.errors import InputError, closest_names
from elbolab.models.draws import decode_posterior_draws, decode_prior_draws
from elbolab.models.vamp import VampPrior
from elbolab.nn import ACTIVATIONS, mlp
from elbolab.nn.architecture import ARCHITECTURES, Architecture, output_layer
from elbolab.param_store import register

LIKELIHOODS = ("bernoulli", "gaussian", "continuous-bernoulli")
PRIORS = ("standard", "vamp")


def check_likelihood(likelihood: str, data: Dataset) -> None:
    """Refuse a likelihood whose support does not hold the data: Bernoulli needs binary data, the
    Gaussian real values (not binarized ones), the continuous Bernoulli values in [0, 1]."""
    if likelihood == "bernoulli" and data.kind != "binary":
        raise InputError(
            f"the bernoulli likelihood needs binary data, but {data.name} is grayscale: "
            "pass --binarize dynamic or threshold, or --likelihood continuous-bernoulli or gaussian"
        )
    if likelihood == "gaussian" and data.kind == "binary":
        raise InputError(f"the gaussian likelihood is for real-valued data, but {data.name} is binarized: pass --binarize none")
    if likelihood == "continuous-bernoulli" and (data.x.min() < 0 or data.x.max() > 1):
        raise InputError(f"the continuous-bernoulli likelihood needs data in [0, 1]; {data.name} is not")


@dataclass
class ModelConfig:
    """The ``[model]`` section of a run's config: the options of every built-in model class.

    Each class reads some of them; which, and which name each family has, is the registry's
    (:mod:`elbolab.families`), which also checks a config against its family.

    Attributes:
        name: the model family (a key of :data:`elbolab.families.FAMILIES`).
        z_dim: latent (code) width; for ``vqvae`` the width of each codebook vector.
        hidden: encoder hidden widths; the decoder uses them reversed.
        likelihood: one of :data:`LIKELIHOODS`.
        activation: a key of :data:`elbolab.nn.ACTIVATIONS`.
        obs_scale: Gaussian likelihood only: a fixed scale, or ``None`` to learn one per pixel.
        z_dims: ``hvae`` only: widths of the stochastic layers, the one next to the data first
            (default ``(50, 20)``).
        hidden_upper: ``hvae`` only: hidden widths of the networks between stochastic layers
            (default: ``hidden``).
        codebook_size: ``vqvae`` only: K, the number of codebook vectors.
        num_codes: ``vqvae`` only: codes per data point, each one of K vectors.
        commitment: ``vqvae`` only: beta, the weight of the commitment loss.
        clusters: ``gmvae`` only: the number of clusters (components) of the mixture prior.
        labels_per_class: ``ssvae`` only: the labels kept per class of the training set (the
            others are missing), or 0 to keep every label.
        classification_weight: ``ssvae`` only: alpha, the weight of the classifier's loss on the
            labelled points.
        arch: ``"mlp"`` or ``"conv"`` (images only): the decoder's and the encoder's networks
            (:class:`~elbolab.nn.architecture.Architecture`).
        channels: ``conv`` only: channels of the encoder's stride-2 stages (the decoder's, reversed).
        kernel: ``conv`` only: kernel size of the convolutions (odd).
        residual_blocks: ``conv`` only: residual blocks after each stage.
        gated: ``conv`` only: gated convolutions (van den Berg et al. 2018).
        prior: ``"standard"`` (N(0, I)) or ``"vamp"``, the VampPrior (:mod:`elbolab.models.vamp`).
        pseudo_inputs: ``vamp`` only: K, the learned pseudo-inputs.
    """

    name: str = "vae"
    z_dim: int = 20
    hidden: tuple[int, ...] = (400,)
    likelihood: str = "bernoulli"
    activation: str = "relu"
    obs_scale: float | None = None
    z_dims: tuple[int, ...] = ()
    hidden_upper: tuple[int, ...] = ()
    codebook_size: int = 64
    num_codes: int = 8
    commitment: float = 0.25
    clusters: int = 10
    labels_per_class: int = 10
    classification_weight: float = 50.0
    arch: str = "mlp"
    channels: tuple[int, ...] = (32, 64)
    kernel: int = 3
    residual_blocks: int = 0
    gated: bool = False
    prior: str = "standard"
    pseudo_inputs: int = 500

    def __post_init__(self) -> None:
        self.hidden = _widths("hidden", self.hidden, allow_empty=False)
        self.z_dims = _widths("z_dims", self.z_dims, allow_empty=True)
        self.hidden_upper = _widths("hidden_upper", self.hidden_upper, allow_empty=True)
        self.channels = _widths("channels", self.channels, allow_empty=False)
        for name, choices in (("arch", ARCHITECTURES), ("prior", PRIORS)):
            if getattr(self, name) not in choices:
                raise InputError(f"unknown {name} {getattr(self, name)!r}; {closest_names(str(getattr(self, name)), choices)}")
        if not is_integer(self.kernel) or self.kernel < 1 or self.kernel % 2 == 0:
            raise InputError(f"kernel must be an odd positive integer, got {self.kernel!r}")
        if not is_integer(self.residual_blocks) or self.residual_blocks < 0:
            raise InputError(f"residual_blocks must be an integer >= 0, got {self.residual_blocks!r}")
        if not isinstance(self.gated, bool):
            raise InputError(f"gated must be true or false, got {self.gated!r}")
        self._refuse_options_of_another_choice("arch", "conv", ("channels", "kernel", "residual_blocks", "gated"))
        self._refuse_options_of_another_choice("prior", "vamp", ("pseudo_inputs",))
        _check_positive_int("z_dim", self.z_dim)
        if self.likelihood not in LIKELIHOODS:
            raise InputError(
                f"unknown likelihood {self.likelihood!r}; {closest_names(self.likelihood, LIKELIHOODS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"unknown activation {self.activation!r}; {closest_names(self.activation, ACTIVATIONS)}"
            )
        if self.obs_scale is not None and not (is_real(self.obs_scale) and self.obs_scale > 0):
            raise InputError(f"obs_scale must be positive, got {self.obs_scale}")
        if self.obs_scale is not None and self.likelihood != "gaussian":
            raise InputError(f"obs_scale is the scale of the gaussian likelihood; the {self.likelihood} likelihood has none")
        for name in ("codebook_size", "num_codes", "clusters", "pseudo_inputs"):
            _check_positive_int(name, getattr(self, name))
        if not is_integer(self.labels_per_class) or self.labels_per_class < 0:
            raise InputError(f"labels_per_class must be an integer >= 0 (0: every label), got {self.labels_per_class!r}")
        if not (is_real(self.classification_weight) and self.classification_weight >= 0):
            raise InputError(f"classification_weight must be a finite number >= 0, got {self.classification_weight}")
        if not (is_real(self.commitment) and self.commitment >= 0):
            raise InputError(f"commitment must be a finite number >= 0, got {self.commitment}")

    def _refuse_options_of_another_choice(self, switch: str, choice: str, options: tuple[str, ...]) -> None:
        """Refuse an option set away from its default that only ``switch = choice`` reads: it would be ignored."""
        if getattr(self, switch) == choice:
            return
        defaults = {option.name: option.default for option in fields(self)}
        for name in options:
            if getattr(self, name) != defaults[name]:
                raise InputError(f"{name} is an option of {switch} {choice}, and {switch} is {getattr(self, switch)}: "
                                 f"set {switch} to {choice} (--{switch} {choice}) or leave {name} out")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {name: list(getattr(self, name)) for name in ("hidden", "z_dims", "hidden_upper", "channels")}

    def architecture(self, image_shape: tuple[int, int] | None) -> Architecture:
        """The networks these options describe, for data of ``image_shape``."""
        return Architecture(self.arch, self.hidden, self.activation, image_shape, self.channels, self.kernel,
                            self.residual_blocks, self.gated)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ModelConfig:
        return dataclass_from_dict(cls, values, source)


def _check_positive_int(name: str, value: Any) -> None:
    if not is_integer(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _widths(name: str, values: Any, *, allow_empty: bool) -> tuple[int, ...]:
    try:
        widths = tuple(values)
    except TypeError:
        raise InputError(f"{name} must be a list of positive widths, got {values!r}") from None
    for width in widths:
        _check_positive_int(f"every width of {name}", width)
    if not widths and not allow_empty:
        raise InputError(f"{name} must be one or more positive widths, got {values!r}")
    return tuple(int(width) for width in widths)


@torch.no_grad()
def start_at_data_mean(output_layer: nn.Linear, x: Tensor, likelihood: str) -> None:
    """Set a decoder's output bias so that ``p(x | .)`` has the per-pixel mean of ``x`` at zero input.

    The pixel log-odds for the Bernoulli likelihoods, the pixel mean for the Gaussian.
    """
    mean = x.reshape(x.shape[0], -1).float().mean(0).to(output_layer.bias.device)
    if likelihood == "gaussian":
        output_layer.bias.copy_(mean)
    else:
        output_layer.bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))


class Likelihood(nn.Module):
    """Decoder output -> the distribution ``p(x | z)`` over one data row (event dim 1).

    Arguments:
        x_dim: data width.
        likelihood: one of :data:`LIKELIHOODS`.
        obs_scale: Gaussian only: a fixed positive scale, or ``None`` for a learned per-pixel
            scale ``softplus(s) + 1e-3`` (the floor keeps the density bounded on near-constant
            pixels). Refused with any other likelihood, which has no scale.

    Example:
        >>> Likelihood(784, "gaussian", obs_scale=0.1)(torch.zeros(5, 784)).event_shape
        torch.Size([784])
        >>> Likelihood(784, "bernouli")
        Traceback (most recent call last):
        elbolab.errors.InputError: unknown likelihood 'bernouli'; did you mean 'bernoulli'? valid names: ...
    """

    def __init__(self, x_dim: int, likelihood: str, obs_scale: float | None = None) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise InputError(f"unknown likelihood {likelihood!r}; {closest_names(str(likelihood), LIKELIHOODS)}")
        if obs_scale is not None and likelihood != "gaussian":
            raise InputError(
                f"obs_scale is an option of the gaussian likelihood; the {likelihood} likelihood has no scale "
                f"(got obs_scale={obs_scale!r})"
            )
        if obs_scale is not None and not (is_real(obs_scale) and obs_scale > 0):
            raise InputError(f"obs_scale must be a finite number > 0, got {obs_scale!r}")
        self.likelihood = likelihood
        self.obs_scale = obs_scale
        if likelihood == "gaussian" and obs_scale is None:
            self.raw_scale = nn.Parameter(torch.zeros(x_dim))

    def forward(self, out: Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return BernoulliRow(out)  # = dist.Bernoulli(logits=out).to_event(1), fused
        if self.likelihood == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=out).to_event(1)
        scale = self.obs_scale if self.obs_scale is not None else F.softplus(self.raw_scale) + 1e-3
        return dist.Normal(out, scale).to_event(1)


class VAE(nn.Module):
    """The variational autoencoder's generative model ``p(z) p(x | z)``, a Pyro program.

    Follows the model contract: latent ``"z"`` and observation ``"x"`` inside
    ``pyro.plate("data", N)``; ``model(None, batch_size=n)`` generates. Pair it with a guide for
    ``"z"``, e.g. :class:`~elbolab.guides.GaussianGuide`.

    Arguments:
        x_dim: data width.
        z_dim: latent width.
        hidden: hidden widths (listed encoder-side; the decoder runs them reversed).
        likelihood: ``"bernoulli"``, ``"gaussian"`` or ``"continuous-bernoulli"``.
        activation: decoder activation.
        obs_scale: Gaussian only: fixed observation scale, or ``None`` to learn one per pixel.
        prior: ``"standard"``, N(0, I), or ``"vamp"``, the VampPrior (Tomczak & Welling 2018),
            which mixes the guide's q(z | u_k) at ``pseudo_inputs`` learned inputs: give it the
            guide with ``model.prior.share_encoder(guide)``.
        pseudo_inputs: ``vamp`` only: their number K.
        decoder: a module ``[..., z_dim] -> [..., x_dim]`` to use as the decoder instead of the
            one ``hidden`` (or ``architecture``) describes, e.g. a user's own network.
        architecture: the decoder's networks, e.g. ``ModelConfig(arch="conv").architecture((28, 28))``
            for a transposed-convolution decoder; when given, it replaces ``hidden`` and
            ``activation``. Default: an MLP of ``hidden``.

    Example:
        >>> model = VAE(784, 20, hidden=(400,))
        >>> images = model.generate(16)  # [16, 784] Bernoulli means
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
        prior: str = "standard",
        pseudo_inputs: int = 500,
        decoder: nn.Module | None = None,
        architecture: Architecture | None = None,
    ) -> None:
        super().__init__()
        architecture = architecture or Architecture("mlp", tuple(hidden), activation)
        self.config = ModelConfig("vae", z_dim, architecture.hidden, likelihood, architecture.activation, obs_scale,
                                  arch=architecture.kind, channels=architecture.channels, kernel=architecture.kernel,
                                  residual_blocks=architecture.residual_blocks, gated=architecture.gated,
                                  prior=prior, pseudo_inputs=pseudo_inputs)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.image_shape = architecture.image_shape
        self.decoder = decoder if decoder is not None else architecture.decoder(z_dim, x_dim)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)
        self.prior = VampPrior(x_dim, pseudo_inputs) if prior == "vamp" else None
        # Buffers, so that the prior follows the module to its device.
        self.register_buffer("prior_loc", torch.zeros(z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(z_dim), persistent=False)

    @torch.no_grad()
    def init_output_bias(self, x: Tensor) -> VAE:
        """Start the decoder at the data's per-pixel mean (returns ``self``); a VampPrior's pseudo-inputs at training points.

        A decoder of the user's own starts there when its last layer (``decoder.output_layer``, or
        the last of an ``nn.Sequential``) has one bias per pixel; otherwise it is left as it is.

        Sets the output layer's bias so that ``p(x | z)`` has the mean of ``x`` when the rest of
        the decoder outputs zero: the pixel log-odds for the Bernoulli likelihoods, the pixel
        mean for the Gaussian (Hinton 2010, "A practical guide to training restricted Boltzmann
        machines", section 8.1, for the visible biases). Training then starts from the marginal
        statistics instead of spending its first epochs learning them: on binarized MNIST this
        is worth several nats after 10 epochs.
        """
        layer = output_layer(self.decoder)  # a user's decoder may have no per-pixel bias: it is left as it is
        if getattr(layer, "bias", None) is not None and layer.bias.shape == (self.x_dim,):
            start_at_data_mean(layer, x, self.config.likelihood)
        if self.prior is not None:
            self.prior.init_from_data(x)
        return self

    def prior_distribution(self) -> dist.TorchDistribution:
        """``p(z)``: batch shape ``[]``, event shape ``[z_dim]``."""
        if self.prior is not None:
            return self.prior.distribution()
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        n = x.shape[0] if x is not None else (batch_size or 1)
        prior = self.prior_distribution()
        with pyro.plate("data", n):
            z = pyro.sample("z", prior)
            return pyro.sample("x", self.observation(self.decoder(z)), obs=x)

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        """``n`` draws ``z ~ p(z)``, decoded: the means of ``p(x | z)``, or samples with ``mean=False``."""
        return decode_prior_draws(self, n, mean=mean)

    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Encode ``x`` with ``guide`` (one draw of ``q(z | x)``) and decode it: ``[N, x_dim]``."""
        if guide is None:
            raise InputError("VAE.reconstruct needs the guide that encodes x")
        return decode_posterior_draws(self, guide, x, mean=mean)


class Autoencoder(nn.Module):
    """The deterministic autoencoder: ``x -> code -> p(x | code)``, trained on reconstruction only.

    The baseline the VAE is contrasted with. It has no prior and no latent sample site, so it has
    no ELBO and no log-likelihood; train it with the ``reconstruction`` objective and compare its
    reconstruction loss ``-log p(x | decoder(encoder(x)))`` with a VAE's. It cannot generate.

    Arguments are those of :class:`VAE`; ``z_dim`` is the code width.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        likelihood: str = "bernoulli",
        activation: str = "relu",
        obs_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig("autoencoder", z_dim, tuple(hidden), likelihood, activation, obs_scale)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = mlp(x_dim, self.config.hidden, z_dim, activation)
        self.decoder = mlp(z_dim, tuple(reversed(self.config.hidden)), x_dim, activation)
        self.observation = Likelihood(x_dim, likelihood, obs_scale)

    def forward(self, x: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
        register(self)  # in Pyro's param store when Pyro's SVI collects parameters
        if x is None:
            raise InputError("an Autoencoder has no prior over codes and cannot generate; use a VAE")
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("x", self.observation(self.decoder(self.encoder(x))), obs=x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, guide: Callable[..., Any] | None = None, *, mean: bool = True) -> Tensor:
        """Decode the code of ``x``: means of ``p(x | code)`` (``guide`` is ignored)."""
        trace = poutine.trace(self).get_trace(x)
        site = trace.nodes["x"]
        return site["fn"].mean if mean else site["fn"].sample()

    def generate(self, n: int, *, mean: bool = True) -> Tensor:
        raise InputError("an Autoencoder has no prior over codes and cannot generate; use a VAE")
