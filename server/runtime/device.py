"""The compute device as PyTorch sees it: which one, its allocator, and how it runs out of memory.

Owns the few device operations the runtime must get right on a machine with several GPUs and a
caching allocator:

- naming the device explicitly everywhere: the current CUDA device is per thread, and the engine
  steps in worker threads, so every step (and every background upload) runs inside `on_device`;
  `synchronize` always names the device (a bare `torch.cuda.synchronize()` waits for device 0
  and opens a context there);
- the allocator: `allocator_bytes` (this process's reserved and allocated bytes, what a probe
  counts as ours when NVML cannot match our PID), `release_cached` (PyTorch keeps freed blocks
  cached, so memory a shrink frees is invisible to the device until they are released);
- `device_uuid`: the UUID of `cuda:N`, which NVML understands whatever CUDA_VISIBLE_DEVICES and
  CUDA_DEVICE_ORDER say (NVML numbers devices in PCI order; CUDA numbers the visible ones);
- `allocation_failure`: every way an allocation failure reaches Python (torch's
  OutOfMemoryError, a host MemoryError, and plain RuntimeErrors from cuBLAS, cuDNN and the CUDA
  runtime), classified once, so none is mistaken for a request's fault.

On a CPU each of these is a no-op or a constant.

Deliberately does not know: what the memory holds, or what to do about running out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Substrings of RuntimeError messages that mean an allocation failed, and who failed it (the
# names are server/vocabulary/step.py's ALLOCATION_FAILURE_KINDS).
_ALLOCATION_MESSAGES = (
    ("cublas", "CUBLAS_STATUS_ALLOC_FAILED"),
    ("cublas", "CUBLAS_STATUS_NOT_INITIALIZED"),  # cuBLAS's handle could not allocate
    ("cudnn", "CUDNN_STATUS_ALLOC_FAILED"),
    ("cusolver", "CUSOLVER_STATUS_ALLOC_FAILED"),
    ("cusparse", "CUSPARSE_STATUS_ALLOC_FAILED"),
    ("cufft", "CUFFT_ALLOC_FAILED"),
    ("cuda", "CUDA out of memory"),
    ("cuda", "CUDA error: out of memory"),
    ("cuda", "cudaErrorMemoryAllocation"),
)


def allocation_failure(exc: BaseException) -> str | None:
    """The allocator that failed if `exc` (or what it was raised from) is an allocation
    failure: "torch", "host", "cublas", "cudnn", "cuda", ...; None for any other error."""
    seen = 0
    while exc is not None and seen < 4:  # an error re-raised from an allocation failure too
        if isinstance(exc, torch.OutOfMemoryError):
            return "torch"
        if isinstance(exc, MemoryError):
            return "host"
        if isinstance(exc, RuntimeError):
            message = str(exc)
            for kind, text in _ALLOCATION_MESSAGES:
                if text in message:
                    return kind
            lowered = message.lower()
            if "out of memory" in lowered:  # e.g. cuDNN's "... out of memory" wording
                return "cudnn" if "cudnn" in lowered else "other"
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def resolve(device: torch.device | str) -> torch.device:
    """`device` with its index: "cuda" alone names the calling thread's current device, which
    another thread (a step thread, a background grow) would read as its own; and
    `torch.cuda.set_device` refuses a device without one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bind(device: torch.device | str) -> None:
    """Make `device` the calling thread's current CUDA device (no-op elsewhere)."""
    device = resolve(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


@contextlib.contextmanager
def on_device(device: torch.device | str) -> Iterator[None]:
    """Run the block with `device` current in this thread (CUDA); a no-op elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


def synchronize(device: torch.device | str) -> None:
    """Wait for everything queued on `device` (and only that device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_cached(device: torch.device | str) -> None:
    """Return the allocator's cached, unused blocks on `device` to the driver, so that the
    device (and NVML, and other processes) sees the memory free."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def allocator_bytes(device: torch.device | str) -> tuple[int, int]:
    """(reserved, allocated) bytes of this process's allocator on `device`; (0, 0) off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)


def device_uuid(device: torch.device | str) -> str:
    """The UUID of a CUDA device as CUDA numbers it (honouring CUDA_VISIBLE_DEVICES): what NVML
    looks a device up by. NVML spells it with a "GPU-" (or "MIG-") prefix; CUDA without."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{device} is not a CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)
