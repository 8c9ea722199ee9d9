"""The package version, written into every certificate (``tool_version``)."""

__version__ = "0.1.0"
