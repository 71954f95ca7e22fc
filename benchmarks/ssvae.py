"""The semi-supervised VAE (M2) against classifiers trained on the labelled points alone.

Keeps ``--labels-per-class`` labels of each class of the training split (the rest unlabelled),
trains the SSVAE on all of it (``--objective``, default Pyro's ``TraceEnum_ELBO``, which sums the
label out in the guide: M2's bound), and reports the test accuracy of its classifier q(y | x) beside
two supervised-only baselines on the same labelled points: a logistic regression (scikit-learn)
and the SSVAE's own classifier network trained alone by cross-entropy (Adam, the same learning
rate, as many epochs as the SSVAE saw batches of labelled points). Also the SSVAE's test log p(x)
of the points as unlabelled (K samples).

    python benchmarks/ssvae.py --data digits --labels-per-class 10 --epochs 100
    python benchmarks/ssvae.py --data fashion-mnist --data-dir /usr/share/datasets/fashion-mnist \\
        --labels-per-class 100 --epochs 10 --hidden 500 --z-dim 50
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from elbolab import fit, load_dataset
from elbolab.guides import SemiSupervisedGuide
from elbolab.inference import log_likelihood
from elbolab.models import SemiSupervisedVAE, keep_labels


def supervised_only(model: SemiSupervisedVAE, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> SemiSupervisedGuide:
    """The SSVAE's classifier network, trained by cross-entropy on the labelled points alone."""
    guide = SemiSupervisedGuide(model)
    optimizer = torch.optim.Adam(guide.classifier.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(guide.classifier(torch.bernoulli(x)), y).backward()
        optimizer.step()
    return guide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=50.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--objective", default="pyro:TraceEnum_ELBO")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = load_dataset(args.data, "train", binarize="dynamic", data_dir=args.data_dir)
    test = load_dataset(args.data, "test", data_dir=args.data_dir)
    labels = keep_labels(train.y, args.labels_per_class, seed=args.seed)
    labelled = labels >= 0
    num_classes = int(train.y.max()) + 1
    x_test = test.x
    regression = LogisticRegression(max_iter=5000).fit(train.x[labelled].numpy(), train.y[labelled].numpy())
    print(f"{args.data}: {int(labelled.sum())} labelled of {train.num_points} training points; {test.num_points} test points")
    print(f"logistic regression on the labelled points: test accuracy {(regression.predict(x_test.numpy()) == test.y.numpy()).mean():.4f}")

    pyro.set_rng_seed(args.seed)
    model = SemiSupervisedVAE(train.x_dim, num_classes, args.z_dim, hidden=(args.hidden,))
    guide = SemiSupervisedGuide(model, alpha=args.alpha)
    start = time.perf_counter()
    fit(model, guide, train, args=(labels,), objective=args.objective, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (guide.classify(x_test).argmax(-1) == test.y).float().mean().item()
    pyro.set_rng_seed(0)
    x_binary = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(0))
    missing = torch.full((test.num_points,), -1)
    log_px = log_likelihood(model, guide, x_binary, missing, num_samples=args.num_samples).mean().item()
    steps = args.epochs * -(-train.num_points // args.batch_size)  # the SSVAE's steps, each with a share of the labels
    torch.manual_seed(args.seed)
    alone = supervised_only(model, train.x[labelled], train.y[labelled], steps, args.lr)
    with torch.no_grad():
        alone_accuracy = (alone.classify(x_test).argmax(-1) == test.y).float().mean().item()
    print(f"the same classifier network, supervised only ({steps} steps): test accuracy {alone_accuracy:.4f}")
    print(f"ssvae ({args.objective}, {args.epochs} epochs, {seconds:.0f} s): test accuracy {accuracy:.4f}, "
          f"test log p(x) {log_px:.3f} nats (K = {args.num_samples}, unlabelled)")


if __name__ == "__main__":
    main()
