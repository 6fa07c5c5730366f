"""The host heap's policy (server/runtime/host_heap.py), as a runtime on a CPU applies it, in a
process of its own: it is one-way and process-wide. Page faults are counted, not time: a step's
freed tensors are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, resource, sys, torch
from server.runtime.elastic import ElasticRuntime
from server.runtime.host_heap import keep_freed_memory

def faults(mbs, n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        for mb in mbs:
            torch.ones(mb << 18)  # allocated, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults([40], 8)
ElasticRuntime.open(sys.argv[1])  # a runtime on a CPU applies the policy
faults([4, 40], 16)  # the heap grows until a freed tensor's memory fits the next one's
kept = faults([4, 40], 8)
# Applied already: a call now returns the first one's outcome (None: applied).
print(json.dumps({"why": keep_freed_memory(), "default": default, "kept": kept}))
"""


def test_a_cpu_runtime_keeps_freed_tensors_without_faulting_them_in_again(tiny_dir: Path) -> None:
    # Tensors of 4 MB and 40 MB, each written and freed, eight rounds. glibc by default maps
    # every allocation above 32 MiB (its largest dynamic threshold) afresh: at least one fault
    # per 40 MB tensor (one per 4 KiB page, or per 2 MiB with transparent huge pages always on).
    # Kept, once the heap has grown to hold them (a few rounds: an aligned request needs a
    # little more than a freed chunk of its own size, until freed chunks merge), they reuse
    # freed memory: no faults but the interpreter's own, a few pages at most (64 is far below
    # one tensor's 1,024 or 10,240 pages).
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_dir)], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out)
    if result["why"] is not None:
        pytest.skip(f"the heap policy does not apply here: {result['why']}")
    assert result["default"] >= 8
    assert result["kept"] <= 64, result
