"""Concentric engine layer."""
