"""The IWAE paper's one-layer VAE on binarized MNIST reaches the quality the field expects (slow)."""

import pyro
import pytest

from elbolab import VAE, GaussianGuide, fit, load_dataset, log_likelihood


@pytest.mark.slow
def test_one_layer_vae_reaches_minus_94_5_nats(shared_data):
    """784-200-200-50, tanh, Bernoulli, batch 100, Adam 1e-3, 30 epochs on 60,000 images, K = 5000.

    About 10 minutes on 2 CPU cores (training 1-2, evaluation 8).
    """
    directory = shared_data / "binarized_mnist"
    train = load_dataset("binarized-mnist", "train+valid", data_dir=directory)
    test = load_dataset("binarized-mnist", "test", data_dir=directory)
    pyro.set_rng_seed(0)
    model = VAE(784, 50, hidden=(200, 200), activation="tanh").init_output_bias(train.x)
    guide = GaussianGuide(784, 50, hidden=(200, 200), activation="tanh")
    fit(model, guide, train, objective="elbo", epochs=30, batch_size=100, lr=1e-3, progress=False)
    assert log_likelihood(model, guide, test.x, num_samples=5000).mean().item() >= -94.5
