"""The package version, in a leaf: the report and the CLI read it without importing the package root."""

__version__ = "0.1.0"
