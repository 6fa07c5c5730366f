"""The host heap's policy in a CPU process: memory one step frees stays for the next step.

Owns `keep_freed_memory`, which a runtime on a CPU applies once its weights are loaded. glibc's
malloc, left to itself, serves each allocation above a threshold (dynamic, at most 32 MiB) by a
mapping of its own, unmapped again on free, and gives the free memory at the top of its heap
back to the kernel once more than another threshold of it has gathered there. A step allocates
and frees tensors of megabytes: at Gemma 3n's 262,144-id vocabulary a batch of 32 has 33.6 MB
of logits, and the sampler's block keys and top-k candidates are megabytes each from 32 rows up.
So every step the kernel faulted their pages in again, one 4 KiB page at a time, zeroing each
(tests/runtime/test_host_heap.py counts the faults; benchmarks/bench_sampler.py times sampling
steps with and without the policy).

The policy: no allocation gets a mapping of its own (M_MMAP_MAX 0) and the heap is never trimmed
on free (M_TRIM_THRESHOLD at its maximum), after one `malloc_trim` that returns what loading
freed. Freed memory is reused by the next allocations instead: the process keeps the largest
working set a step has needed, which serving needs again anyway. What tcmalloc or jemalloc do
when preloaded (vLLM's and PyTorch's CPU guides suggest them), without a library to install.

Deliberately does not know: tensors, devices, or what the memory holds. Elsewhere than glibc
(musl, macOS) it changes nothing and says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_lock = threading.Lock()
_applied: str | None = None


def keep_freed_memory() -> str | None:
    """Apply the policy to this process (once; later calls do nothing). None when applied, else
    why not (no glibc, or glibc refused a parameter)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return None if _applied == "" else _applied


def _apply() -> str:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError as e:
        return f"the C library ({name}) cannot be loaded: {e}"
    if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's parameter numbers are glibc's
        return f"the C library ({name}) is not glibc"
    mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)):
        if mallopt(param, value) != 1:
            return f"glibc refused mallopt({param}, {value})"
    return ""
