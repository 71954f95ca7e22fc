"""Amortized guides: neural-network variational posteriors q(z | x)."""

from elbolab.guides.auto import AutoAmortizedGuide
from elbolab.guides.conditional import ConditionalGuide
from elbolab.guides.config import GuideConfig, build_guide
from elbolab.guides.flow import FLOWS, FlowGuide
from elbolab.guides.gaussian import GaussianGuide
from elbolab.guides.hierarchical import BottomUpGuide, LadderGuide
from elbolab.guides.mixture import MixtureGuide
from elbolab.guides.quantizer import NearestCodeGuide
from elbolab.guides.semisupervised import SemiSupervisedGuide

__all__ = [
    "FLOWS",
    "AutoAmortizedGuide",
    "BottomUpGuide",
    "ConditionalGuide",
    "FlowGuide",
    "GaussianGuide",
    "GuideConfig",
    "LadderGuide",
    "MixtureGuide",
    "NearestCodeGuide",
    "SemiSupervisedGuide",
    "build_guide",
]
