import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.distributions import BernoulliRow, DiagonalGaussianMixture


def test_bernoulli_row_matches_independent_bernoulli_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 7, requires_grad=True)
    x = torch.bernoulli(torch.full((3, 7), 0.4))  # broadcasts against the leading particle dim
    ours = BernoulliRow(logits).log_prob(x)
    reference = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert ours.shape == reference.shape == (5, 3)
    torch.testing.assert_close(ours, reference)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    (reference_grad,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, reference_grad)
    torch.testing.assert_close(grad, x - torch.sigmoid(logits))  # d/dlogits of x l - softplus(l)


def test_bernoulli_row_shapes_mean_samples_and_entropy():
    logits = torch.tensor([[0.0, 2.0, -2.0]])
    d = BernoulliRow(logits)
    assert d.batch_shape == (1,) and d.event_shape == (3,)
    torch.testing.assert_close(d.mean, torch.sigmoid(logits))
    torch.testing.assert_close(d.entropy(), dist.Bernoulli(logits=logits).entropy().sum(-1))
    expanded = d.expand((4, 1))
    assert expanded.batch_shape == (4, 1) and expanded.sample().shape == (4, 1, 3)
    torch.manual_seed(0)
    draws = d.sample((20000,))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0), d.mean, atol=0.02, rtol=0)


def test_bernoulli_row_validation_rejects_grayscale_values_even_after_a_plate_expands_it():
    with pyro.validation_enabled(True):
        d = BernoulliRow(torch.zeros(2, 3)).expand((2,))
        with pytest.raises(ValueError, match="support"):
            d.log_prob(torch.full((2, 3), 0.5))


def mixture_parameters():
    logits = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    loc = torch.tensor([[-2.0, 0.0], [0.0, 1.5], [2.0, -1.0]], requires_grad=True)
    scale = torch.tensor([[0.5, 0.7], [0.6, 0.4], [0.8, 0.5]], requires_grad=True)
    return logits, loc, scale


@pytest.mark.parametrize("statistic", ["z0^2", "z0*z1", "z1"])
def test_mixture_pathwise_gradients_are_unbiased_for_every_parameter(statistic):
    """The average pathwise gradient of E_q[g(z)] equals autograd of its closed form, weights included."""
    functions = {  # g(z) and E_c[g(z)] per component, in closed form
        "z0^2": (lambda z: z[..., 0] ** 2, lambda m, s: m[:, 0] ** 2 + s[:, 0] ** 2),
        "z0*z1": (lambda z: z[..., 0] * z[..., 1], lambda m, s: m[:, 0] * m[:, 1]),
        "z1": (lambda z: z[..., 1], lambda m, s: m[:, 1]),
    }
    g, expectation = functions[statistic]
    logits, loc, scale = mixture_parameters()
    exact = (torch.softmax(logits, 0) * expectation(loc, scale)).sum()
    exact_grads = torch.autograd.grad(exact, [logits, loc, scale], allow_unused=True)
    torch.manual_seed(0)
    z = DiagonalGaussianMixture(logits, loc, scale).rsample((300_000,))
    estimates = torch.autograd.grad(g(z).mean(), [logits, loc, scale], allow_unused=True)
    for exact_grad, estimate in zip(exact_grads, estimates, strict=True):
        if exact_grad is None:  # g does not depend on the scales: the estimate is zero on average
            torch.testing.assert_close(estimate, torch.zeros_like(estimate), atol=0.02, rtol=0)
        else:
            torch.testing.assert_close(estimate, exact_grad, atol=0.02, rtol=0)
    assert exact_grads[0].abs().max() > 0.3  # the weights' gradient is large enough to be missed


def test_mixture_samples_and_density():
    logits, loc, scale = (t.detach() for t in mixture_parameters())
    q = DiagonalGaussianMixture(logits, loc, scale)
    torch.manual_seed(1)
    z = q.sample((200_000,))
    weights = torch.softmax(logits, 0)
    torch.testing.assert_close(z.mean(0), (weights[:, None] * loc).sum(0), atol=0.02, rtol=0)
    torch.testing.assert_close(z.mean(0), q.mean, atol=0.02, rtol=0)
    second = (weights[:, None] * (loc**2 + scale**2)).sum(0)
    torch.testing.assert_close(z.pow(2).mean(0), second, atol=0.03, rtol=0)
    point = torch.tensor([0.3, -0.4])
    density = sum(w * torch.distributions.Normal(m, s).log_prob(point).sum().exp() for w, m, s in zip(weights, loc, scale, strict=True))
    torch.testing.assert_close(q.log_prob(point), density.log())
    batched = DiagonalGaussianMixture(logits.expand(4, 3), loc.expand(4, 3, 2), scale.expand(4, 3, 2)).expand((5, 4))
    assert batched.batch_shape == (5, 4) and batched.rsample((2,)).shape == (2, 5, 4, 2)
    one_dim = DiagonalGaussianMixture(logits, loc[:, :1], scale[:, :1])  # D = 1 works too
    assert one_dim.rsample((3,)).shape == (3, 1)
