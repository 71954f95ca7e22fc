"""NumPyro's jitted ``SVI(Trace_ELBO)`` step of the benchmark's VAE, in ms per step (a server for compiled_step.py).

The same 784-H-20 Bernoulli VAE, diagonal-Gaussian encoder with a softplus scale, Adam 1e-3,
batches gathered by index from binarized MNIST on the device; ``svi.update`` jitted, the data
batch as its argument. Both cases are built and compiled first; the script then prints
``ready`` and answers each line ``CASE STEPS`` on stdin with the milliseconds per step of that
many steps, so that compiled_step.py can interleave them with its own variants. Needs numpyro
and jax (a separate environment; see compiled_step.py), not elbolab.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam

X_DIM, Z_DIM = 784, 20


def networks(hidden):
    from jax.example_libraries import stax

    encoder = stax.serial(stax.Dense(hidden), stax.Relu, stax.FanOut(2), stax.parallel(stax.Dense(Z_DIM), stax.serial(stax.Dense(Z_DIM), stax.Softplus)))
    decoder = stax.serial(stax.Dense(hidden), stax.Relu, stax.Dense(X_DIM))
    return encoder, decoder


def build(hidden, batch, data):
    encoder, decoder = networks(hidden)

    def model(x):
        net = numpyro.module("decoder", decoder, (batch, Z_DIM))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([Z_DIM]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=net(z)).to_event(1), obs=x)

    def guide(x):
        net = numpyro.module("encoder", encoder, (batch, X_DIM))
        loc, scale = net(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale + 1e-4).to_event(1))

    svi = SVI(model, guide, Adam(1e-3), Trace_ELBO())
    state = svi.init(random.PRNGKey(0), data[:batch])

    @jax.jit
    def update(state, index):
        return svi.update(state, data[index])

    return state, update


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args()
    path = Path(args.data_dir) / "binarized_mnist_train.amat.gz"
    data = jnp.asarray(np.loadtxt(path, dtype=np.float32)) if path.exists() else jnp.asarray(
        (np.random.default_rng(0).random((50_000, X_DIM)) < 0.13).astype(np.float32))
    cases = {"vae400": (400, 128), "vae64": (64, 32)}
    built = {name: build(hidden, batch, data) for name, (hidden, batch) in cases.items()}
    rng = np.random.default_rng(0)
    states = {name: built[name][0] for name in cases}
    for name, (_, batch) in cases.items():  # compile
        for _ in range(3):
            states[name], loss = built[name][1](states[name], jnp.asarray(rng.integers(0, data.shape[0], batch)))
        loss.block_until_ready()
    print(json.dumps({"ready": f"numpyro {numpyro.__version__}, jax {jax.__version__}"}), flush=True)
    for line in sys.stdin:
        name, steps = line.split()
        batch = cases[name][1]
        indices = [jnp.asarray(rng.integers(0, data.shape[0], batch)) for _ in range(int(steps))]
        update = built[name][1]
        start = time.perf_counter()
        for index in indices:
            states[name], loss = update(states[name], index)
        loss.block_until_ready()
        print(json.dumps({"ms": (time.perf_counter() - start) / int(steps) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
