"""Requests, scheduling, KV block bookkeeping, subnet choice and elasticity: plain Python that
drives a runner it knows only through `server/engine/runner_protocol.py`."""
