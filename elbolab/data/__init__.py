"""Data sets by name, their validation, and synthetic data with exact evidence."""

from elbolab.data.datasets import DATASETS, DataConfig, Dataset, check_data, load_dataset
from elbolab.data.synthetic import ExactPosteriorGuide, LinearGaussian

__all__ = [
    "DATASETS",
    "DataConfig",
    "Dataset",
    "ExactPosteriorGuide",
    "LinearGaussian",
    "check_data",
    "load_dataset",
]
