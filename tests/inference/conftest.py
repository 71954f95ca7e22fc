"""Fixtures the training tests share."""

import pytest

from elbolab.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    """The embedded digits' training split, dynamically binarized: small enough to train on in a test."""
    return load_dataset("digits", "train", binarize="dynamic")
