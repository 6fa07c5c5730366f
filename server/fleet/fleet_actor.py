"""The fleet's named actors: one of each per Ray cluster, found by name by every replica.

Owns how the singleton actors (the fleet board, the tenant limits store) are made: in the
fleet's Ray namespace, created by whichever process asks first (`get_if_exists`), detached (they
outlive the replica that created them), on no CPU, and restarted by Ray if their process dies.

Deliberately does not know: what the actors hold.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "concentric"  # the Ray namespace of the fleet's named actors


def fleet_actor(ray: Any, cls: type, name: str) -> Any:
    """A handle to the named actor of class `cls`, creating it if nobody has (blocking: a call
    to Ray's control store)."""
    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
        )
        .remote()
    )
