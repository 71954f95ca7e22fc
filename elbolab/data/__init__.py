"""Data sets by name, their validation, and synthetic data with exact evidence."""

from elbolab.data.checks import as_points, check_rows_in_support
from elbolab.data.datasets import DATASETS, DataConfig, Dataset, check_data, load_dataset
from elbolab.data.synthetic import ExactPosteriorGuide, LinearGaussian

__all__ = [
    "DATASETS",
    "DataConfig",
    "Dataset",
    "ExactPosteriorGuide",
    "LinearGaussian",
    "as_points",
    "check_data",
    "check_rows_in_support",
    "load_dataset",
]
