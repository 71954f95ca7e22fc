"""Amortized guides: neural-network variational posteriors q(z | x)."""

from elbolab.guides.auto import AutoAmortizedGuide
from elbolab.guides.config import GUIDE_FAMILIES, GuideConfig, build_guide
from elbolab.guides.flow import FLOWS, FlowGuide
from elbolab.guides.gaussian import GaussianGuide
from elbolab.guides.mixture import MixtureGuide

__all__ = [
    "FLOWS",
    "GUIDE_FAMILIES",
    "AutoAmortizedGuide",
    "FlowGuide",
    "GaussianGuide",
    "GuideConfig",
    "MixtureGuide",
    "build_guide",
]
