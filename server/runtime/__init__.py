"""Concentric runtime layer."""
