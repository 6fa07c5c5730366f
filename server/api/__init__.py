"""Concentric api layer."""
