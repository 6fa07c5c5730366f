"""Scheduling and subnet-choice policies: plain Python over read-only snapshots (no torch)."""
