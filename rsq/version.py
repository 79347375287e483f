"""The package version (its own module, so that recording it imports nothing else of rsq)."""

__version__ = "0.1.0"
