"""Amortized guides: neural-network variational posteriors q(z | x)."""

from elbolab.guides.flow import FLOWS, FlowGuide
from elbolab.guides.gaussian import GaussianGuide
from elbolab.guides.mixture import MixtureGuide

__all__ = ["FLOWS", "FlowGuide", "GaussianGuide", "MixtureGuide"]
