import pyro
import pyro.distributions as dist
import pytest
import torch

from elbolab.distributions import BernoulliRow


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
