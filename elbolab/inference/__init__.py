"""Objectives, training, log-likelihood estimation, schedules and training checkpoints."""

from elbolab.inference.elbo import ELBO
from elbolab.inference.evaluate import (
    Evidence,
    ImportanceEstimate,
    importance_estimate,
    log_evidence,
    log_importance_weights,
    log_likelihood,
)
from elbolab.inference.fit import FitConfig, FitResult, fit, resolve_device
from elbolab.inference.objectives import OBJECTIVES, get_objective, register_objective
from elbolab.inference.schedules import kl_warmup
from elbolab.inference.stopping import TrainingInterrupted

__all__ = [
    "ELBO",
    "OBJECTIVES",
    "Evidence",
    "FitConfig",
    "FitResult",
    "ImportanceEstimate",
    "TrainingInterrupted",
    "fit",
    "get_objective",
    "importance_estimate",
    "kl_warmup",
    "log_evidence",
    "log_importance_weights",
    "log_likelihood",
    "register_objective",
    "resolve_device",
]
