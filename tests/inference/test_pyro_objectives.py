"""Pyro's own ELBOs and SVI beside elbolab's: every one trains, or is refused by name, and its numbers are right."""

import copy
import functools

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch
from pyro.infer import SVI, config_enumerate
from torch import nn

from elbolab.data import ExactPosteriorGuide, load_dataset
from elbolab.errors import InputError
from elbolab.guides import GaussianGuide, LadderGuide, MixtureGuide
from elbolab.inference import fit, get_objective
from elbolab.inference.objectives import parse_objective_spec
from elbolab.inference.pyro_objectives import PYRO_ELBOS
from elbolab.models import VAE, HierarchicalVAE

pytestmark = pytest.mark.filterwarnings("ignore")  # Pyro's jit tracer warns about shape checks


def _pair(seed=0):
    pyro.set_rng_seed(seed)
    return VAE(64, 4, hidden=(32,)), GaussianGuide(64, 4, hidden=(32,))


def _parameters(*modules):
    return [p for m in modules for p in m.parameters()]


@pytest.mark.parametrize("name", list(PYRO_ELBOS))
def test_every_pyro_elbo_trains_a_vae_through_fit(digits, name):
    model, guide = _pair()
    before = [p.detach().clone() for p in _parameters(model, guide)]
    options = {"max_plate_nesting": 1} if "Enum" in name else {}
    result = fit(model, guide, digits, objective=getattr(pyro.infer, name)(**options), epochs=2, progress=False)
    changed = [not torch.equal(p, b) for p, b in zip(_parameters(model, guide), before, strict=True)]
    assert all(changed)
    assert result.history.train_loss.iloc[1] < result.history.train_loss.iloc[0]


def test_a_spec_names_a_pyro_elbo_with_its_options():
    assert parse_objective_spec("pyro:RenyiELBO:alpha=0:k=5") == ("pyro:RenyiELBO", {"alpha": 0.0, "num_particles": 5})
    with pytest.raises(InputError, match="pyro: names one of Pyro's ELBOs.*RenyiELBO"):
        parse_objective_spec("pyro:RenyELBO")
    with pytest.raises(InputError, match="objective pyro:Trace_ELBO: .*alpha"):
        get_objective("pyro:Trace_ELBO", alpha=0.5).differentiable_loss(*_pair(), torch.zeros(4, 64))


@pytest.mark.parametrize(
    "spec", ["pyro:Trace_ELBO:k=3", "pyro:TraceGraph_ELBO", "pyro:RenyiELBO:alpha=0:k=5", "pyro:RenyiELBO:alpha=0.5:k=4",
             "pyro:TraceEnum_ELBO:k=2", "pyro:JitTrace_ELBO"]
)
def test_pyro_elbos_are_exact_with_the_exact_posterior(spec):
    # With q = p(z | x) every weight is p(x): Pyro's bounds equal log p(x) too (Renyi's joint one as well).
    data = load_dataset("synthetic-linear-gaussian", "test")
    model, x = data.truth, data.x[:30]
    name, options = parse_objective_spec(spec)
    loss = get_objective(name, **options).loss(model, ExactPosteriorGuide(model), x)  # nothing to train: the value
    assert loss == pytest.approx(-model.log_likelihood(x).sum().item(), rel=1e-5)


def test_what_would_print_a_wrong_number_is_refused_by_name():
    x = torch.randn(8, 3)

    def mixture(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(c.unsqueeze(-1).expand((*c.shape, 3)), 1.0).to_event(1), obs=x)

    def nothing(x):
        pass

    with pytest.raises(InputError, match="'c' is marked for enumeration, and Pyro's Trace_ELBO does not enumerate"):
        fit(mixture, nothing, x, objective=pyro.infer.Trace_ELBO(), epochs=1, progress=False)
    exact = dist.Normal(0.0, 1.0).log_prob(x).sum(-1).exp() * 0.7 + dist.Normal(1.0, 1.0).log_prob(x).sum(-1).exp() * 0.3
    loss = get_objective("pyro:TraceEnum_ELBO").loss(mixture, nothing, x)
    assert loss == pytest.approx(-exact.log().sum().item(), rel=1e-5)

    class Unregistered(nn.Module):  # a user's module without pyro.module: RenyiELBO would never train it
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(self.loc, 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = GaussianGuide(3, 3, hidden=(8,))
    with pytest.raises(InputError, match="Pyro's RenyiELBO computes gradients only for parameters in Pyro's param store"):
        fit(Unregistered(), guide, x, objective=pyro.infer.RenyiELBO(num_particles=2), epochs=1, progress=False)

    def with_global(x):
        g = pyro.sample("g", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0).to_event(1), obs=x)

    global_guide = GaussianGuide(3, 3, hidden=(8,))

    def g_guide(x):
        pyro.module("g_guide", global_guide)
        loc = pyro.param("g_loc", torch.zeros(3))
        pyro.sample("g", dist.Normal(loc, 1.0).to_event(1))

    with pytest.raises(InputError, match="RenyiELBO takes its logsumexp .* use elbolab's renyi"):
        fit(with_global, g_guide, x, objective="pyro:RenyiELBO:k=3", epochs=1, batch_size=4, progress=False)


def test_pyro_svi_trains_every_parameter_of_elbolab_modules(digits):
    x = torch.bernoulli(digits.x[:200], generator=torch.Generator().manual_seed(0))
    ladder = HierarchicalVAE(64, (6, 3), hidden=(32,))  # the ladder guide shares the model's top-down networks
    pairs = [_pair(), (VAE(64, 4, hidden=(32,)), MixtureGuide(64, 4, components=3, hidden=(32,))), (ladder, LadderGuide(ladder))]
    for model, guide in pairs:
        pyro.clear_param_store()
        params = _parameters(model, guide)
        before = [p.detach().clone() for p in params]
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
        losses = [svi.step(x[i * 50 : (i + 1) * 50]) for i in range(4) for _ in range(5)]
        assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True)), type(guide).__name__
        assert sum(losses[-4:]) < sum(losses[:4])


def test_two_instances_and_a_copy_never_share_param_store_entries():
    pyro.clear_param_store()
    first, guide = _pair()
    second = copy.deepcopy(first)
    x = torch.zeros(4, 64)
    for model in (first, second):
        SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO()).step(x)
    names = {name.split("$$$")[0] for name in pyro.get_param_store().keys()}
    assert len(names) == 3  # two models and a guide
    assert not torch.equal(first.decoder[0].weight, second.decoder[0].weight)
    # elbolab's own fit runs no parameter-collecting trace: the store is left alone.
    pyro.clear_param_store()
    fit(*_pair(), torch.zeros(8, 64), epochs=1, progress=False)
    assert len(pyro.get_param_store()) == 0


def test_fit_trains_the_modules_behind_a_wrapper(digits):
    model, guide = _pair()
    global_model = VAE(64, 4, hidden=(32,))

    def plain(x):
        return global_model(x)  # a module reached through a global variable: found from the loss's graph

    for wrapped, modules in [
        (config_enumerate(model), [model]),
        (functools.partial(model), [model]),
        (lambda x: model(x), [model]),
        (plain, [global_model]),
    ]:
        before = [p.detach().clone() for p in _parameters(*modules, guide)]
        fit(wrapped, guide, digits, epochs=1, progress=False)
        assert all(not torch.equal(p, b) for p, b in zip(_parameters(*modules, guide), before, strict=True))
