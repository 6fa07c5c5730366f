"""A loaded runtime leaves Python's garbage collector's passes (server/runtime/object_heap.py):
no full collection mid-step walks the model and the libraries it loaded. (A compiled bucket's
code: test_decode_graph.py.)"""

from __future__ import annotations

import gc
from pathlib import Path

from server.runtime.elastic import ElasticRuntime


def test_a_loaded_runtime_is_frozen_out_of_full_collections(tiny_dir: Path):
    gc.unfreeze()  # what earlier tests froze: only this load may freeze the new runtime
    runtime = ElasticRuntime.open(tiny_dir)
    # A full collection visits every object in the collector's generations: not these.
    loaded = (runtime, runtime.weights, runtime.model, runtime.subnets)
    assert not any(o is x for o in gc.get_objects() for x in loaded)
