"""What a serving process loads and compiles leaves Python's garbage collector's passes
(server/runtime/object_heap.py): no full collection mid-step walks the model, the libraries it
loaded, or a compiled pass's code. (A compiled decode bucket: test_decode_graph.py.)"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from server.runtime.elastic import ElasticRuntime
from server.runtime.row_passes import compiled_per_row


def visited(*objects: object) -> bool:
    """Whether a full collection would visit any of them (it visits every object in the
    collector's generations; frozen ones are in none)."""
    return any(o is x for o in gc.get_objects() for x in objects)


def test_a_loaded_runtime_is_frozen_out_of_full_collections(tiny_dir: Path):
    gc.unfreeze()  # what earlier tests froze: only this load may freeze the new runtime
    runtime = ElasticRuntime.open(tiny_dir)
    assert not visited(runtime, runtime.weights, runtime.model, runtime.subnets)


def doubled(rows: torch.Tensor) -> torch.Tensor:
    return rows * 2


def test_a_compiled_row_pass_is_frozen_out_of_full_collections():
    gc.unfreeze()  # only this compile may freeze the code it makes
    double = compiled_per_row("test_object_heap.doubled", doubled)
    assert torch.equal(double(torch.ones(3, 4)), torch.full((3, 4), 2.0))
    [(run, guards)] = double.direct.values()
    assert not visited(run, guards)
