"""The Gaussian-mixture VAE on digits: clustering accuracy and test log p(x), beside a VAE of the same size.

Both models have the same decoder and encoder (64-H-z), trained the same epochs under the ELBO
with dynamic binarization, for several seeds. Reported per model (medians over seeds): the
test split's importance-sampled log p(x) (K samples, one fixed binarization of the test
images), and for the GMVAE the clustering accuracy of argmax p(c | x) against the digit labels
(one-to-one matching, ``elbolab.analysis.clustering_accuracy``). Two k-means baselines with the
same number of clusters sit beside it: on the raw pixels, and on the VAE's posterior means.

    python benchmarks/gmvae_digits.py [--epochs 100] [--seeds 3] [--z-dim 10] [--hidden 128] [--clusters 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from sklearn.cluster import KMeans

from elbolab import GaussianGuide, fit, load_dataset
from elbolab.analysis import cluster_probabilities, clustering_accuracy, posterior_means
from elbolab.inference import log_likelihood
from elbolab.models import VAE, GaussianMixtureVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--z-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    train = load_dataset("digits", "train", binarize="dynamic")
    test = load_dataset("digits", "test")
    x_test = torch.bernoulli(test.x, generator=torch.Generator().manual_seed(0))
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        pyro.set_rng_seed(seed)
        gmvae = GaussianMixtureVAE(64, args.z_dim, args.clusters, hidden=(args.hidden,))
        gmvae_guide = GaussianGuide(64, args.z_dim, hidden=(args.hidden,))
        pyro.set_rng_seed(seed)
        vae, vae_guide = VAE(64, args.z_dim, hidden=(args.hidden,)), GaussianGuide(64, args.z_dim, hidden=(args.hidden,))
        for name, model, guide in (("gmvae", gmvae, gmvae_guide), ("vae", vae, vae_guide)):
            start = time.perf_counter()
            fit(model, guide, train, epochs=args.epochs, lr=args.lr, seed=seed, progress=False)
            rows.setdefault(f"{name} train seconds", []).append(time.perf_counter() - start)
            pyro.set_rng_seed(0)
            rows.setdefault(f"{name} test log p(x)", []).append(
                log_likelihood(model, guide, x_test, num_samples=args.num_samples).mean().item())
        clusters = cluster_probabilities(gmvae, gmvae_guide, test.x).argmax(-1)
        rows.setdefault("gmvae clustering accuracy", []).append(clustering_accuracy(clusters, test.y))
        rows.setdefault("gmvae clusters used", []).append(float(clusters.unique().numel()))
        means = posterior_means(vae_guide, test.x)["z"].numpy()
        for name, features in (("k-means on pixels", test.x.numpy()), ("k-means on the VAE's posterior means", means)):
            assigned = KMeans(args.clusters, n_init=10, random_state=seed).fit_predict(features)
            rows.setdefault(f"{name} accuracy", []).append(clustering_accuracy(assigned, test.y))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    print(f"digits, {args.epochs} epochs, z {args.z_dim}, hidden {args.hidden}, {args.clusters} clusters, "
          f"{args.seeds} seeds, test log p(x) with K = {args.num_samples}; medians:")
    for name, values in rows.items():
        print(f"  {name}: {statistics.median(values):.3f}  (all: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
