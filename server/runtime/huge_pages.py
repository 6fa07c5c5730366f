"""Host memory in transparent huge pages, for the weights a CPU step reads every token.

Owns one thing: an arena, an anonymous private mapping aligned to 2 MiB and advised
`MADV_HUGEPAGE`, that takes contiguous copies of tensors one after another (converted to a
given dtype on the way), and the checks around it: whether this kernel backs such a mapping with
huge pages at all, and whether a mapping of this process is eligible for them.

Why: a batch-1 decode step reads every weight once per token. Read through 4 KiB pages (the
checkpoint's page cache, or torch's allocator) every 4 KiB of weights is another TLB entry, and
in a virtual machine each TLB miss walks two page tables. On the 2-vCPU build VM the bench
preset's compiled batch-1 step ran 1.11x as fast with its weights here as in the page cache
(median of runs paired in one process, the same tokens), and a plain read of 256 MiB 1.24x
(benchmarks/bench_decode.py prints both).

Untouched pages of the mapping cost no memory, so an arena may be sized generously up front.
The copy is private memory: the checkpoint's page-cache pages stay clean and the kernel may drop
them, but the process holds the weights itself rather than sharing the page cache's.

Deliberately does not know: which tensors are weights, or any device but the CPU.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 * 1024 * 1024
ALIGN = 64  # each copy starts on a cache line (and on any dtype's alignment)
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def unavailable() -> str | None:
    """Why this process cannot have huge pages for an advised mapping; None when it can."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this platform has no MADV_HUGEPAGE (transparent huge pages are Linux's)"
    try:
        mode = THP_ENABLED.read_text()
    except OSError:
        return f"{THP_ENABLED} is unreadable: this kernel has no transparent huge pages"
    if "[never]" in mode:
        return f"transparent huge pages are off ({THP_ENABLED}: never)"
    return None


class HugePageArena:
    """`capacity` bytes of advised anonymous memory; `copy` places tensors in it in order."""

    @classmethod
    def for_sizes(cls, sizes: list[int]) -> HugePageArena:
        """An arena that holds copies of these many bytes each, placed as `copy` places them."""
        return cls(sum(_aligned(n) for n in sizes))

    def __init__(self, capacity: int):
        reason = unavailable()
        if reason is not None:
            raise OSError(reason)
        size = -(-max(capacity, 1) // HUGE_PAGE) * HUGE_PAGE
        # Private: a shared anonymous mapping is shmem, whose huge pages follow another switch.
        # One huge page more than asked, so that the arena can start on a 2 MiB boundary.
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Before any page is touched: the advice decides how the first touch is backed.
        self._map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)  # holds the mapping alive
        start = -whole.data_ptr() % HUGE_PAGE
        self.bytes = whole[start : start + size]
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.bytes.numel()

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous copy of CPU tensor `t` (in `dtype`, default its own) inside the arena."""
        dtype = dtype or t.dtype
        nbytes = t.numel() * dtype.itemsize
        if self.used + nbytes > self.capacity:
            raise MemoryError(
                f"huge-page arena of {self.capacity} bytes is full ({self.used} used, "
                f"{nbytes} more asked)"
            )
        out = self.bytes[self.used : self.used + nbytes].view(dtype).view(t.shape)
        out.copy_(t)
        self.used += _aligned(nbytes)
        return out

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t`'s memory lies inside this arena."""
        start = self.bytes.data_ptr()
        return start <= t.data_ptr() < start + self.capacity

    def eligible(self) -> bool:
        """Whether the kernel lists this arena's mapping as eligible for huge pages
        (/proc/self/smaps' THPeligible: the advice took), whatever it has backed so far."""
        start = self.bytes.data_ptr()
        current = None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= start < hi
            elif current and head == "THPeligible:":
                return line.split()[1] == "1"
        return False


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
