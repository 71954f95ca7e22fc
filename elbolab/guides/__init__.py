"""Amortized guides: neural-network variational posteriors q(z | x)."""

from elbolab.guides.gaussian import GaussianGuide

__all__ = ["GaussianGuide"]
