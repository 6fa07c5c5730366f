"""Concentric: an elastic inference server for Gemma 3n."""

__version__ = "0.1.0"
