"""ringstream: the streaming service built on ringcore."""

__version__ = "0.1.0"
