"""The package version, one place for every module that records it."""

__version__ = "0.1.0"
