"""The conditional VAE generates the class it is asked for."""

import pyro
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from elbolab.data import load_dataset
from elbolab.errors import InputError
from elbolab.guides import ConditionalGuide, GaussianGuide
from elbolab.inference import fit
from elbolab.models import ConditionalVAE, as_condition


def test_generated_digits_are_of_the_requested_class():
    """A logistic regression trained on the digits labels >= 80% of generate(100, y=c) as c, over classes."""
    train, test = load_dataset("digits", "train", binarize="dynamic"), load_dataset("digits", "test")
    classifier = LogisticRegression(max_iter=2000).fit(train.x.numpy(), train.y.numpy())
    assert classifier.score(test.x.numpy(), test.y.numpy()) > 0.9

    def accuracy(model):
        pyro.set_rng_seed(1)
        return sum((classifier.predict(model.generate(100, y=c).numpy()) == c).mean() for c in range(10)) / 10

    pyro.set_rng_seed(0)
    model = ConditionalVAE(64, 10, 8, hidden=(128,)).init_output_bias(train.x)
    guide = ConditionalGuide(GaussianGuide(64 + 10, 8, hidden=(128,)), 10)
    untrained = accuracy(model)
    fit(model, guide, train, epochs=60, progress=False, device="cpu", args=(as_condition(train.y, 10),))
    assert untrained < 0.5  # an untrained decoder ignores y: the test can fail
    assert accuracy(model) >= 0.8


def test_labels_become_one_hot_rows_and_bad_labels_are_refused():
    assert torch.equal(as_condition(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert torch.equal(as_condition(1, 3, n=2), torch.tensor([[0.0, 1, 0], [0, 1, 0]]))
    with pytest.raises(InputError, match="0..2"):
        as_condition(torch.tensor([3]), 3)
    with pytest.raises(InputError, match=r"\[N, 3\]"):
        as_condition(torch.zeros(4, 2), 3)
    model = ConditionalVAE(6, 3, 2, hidden=(4,))
    with pytest.raises(InputError, match="needs y"):
        model.generate(2)
    with pytest.raises(InputError, match="one label or 2"):
        model.generate(2, y=torch.tensor([0, 1, 2]))


def test_the_decoder_reads_the_condition():
    pyro.set_rng_seed(0)
    model = ConditionalVAE(6, 3, 2, hidden=(4,))
    z = torch.zeros(1, 2)
    outputs = [model.decoder(torch.cat([z, as_condition(c, 3, 1)], -1)) for c in range(3)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
