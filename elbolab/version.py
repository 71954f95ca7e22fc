"""The version of elbolab, importable by every layer without importing the public API."""

__all__ = ["__version__"]

__version__ = "0.1.0"
