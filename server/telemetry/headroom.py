"""Memory headroom probes: NVML on an accelerator, a configured budget on a CPU, a script in tests.

Owns reading how much accelerator memory there is and how much is free, sampled on a background
timer (never per request: NVML calls cost microseconds to milliseconds), and numbering the
readings so that a reader can tell one taken after a given moment from an older one.

- `NvmlProbe` (nvidia-ml-py's `pynvml`): the device's total/used/free, this process's usage and
  the GPU utilisation. The device is named by its UUID, never by an index: NVML numbers devices
  in PCI order and ignores CUDA_VISIBLE_DEVICES, so `cuda:N` (CUDA's numbering of the visible
  devices) is not NVML's index N. The caller gets the UUID from the runtime (which asks CUDA).
  This process's share is NVML's per-process figure where a PID matches ours; inside a container
  NVML reports host PIDs (or none), so then it is the allocator's own reserved bytes.
- `HostProbe`: the "device" is a configured memory budget; used is this process's resident memory
  (its weights, caches and activations all live in host memory).
- `ScriptedProbe`: a test says "free memory is now X".

Which probe a server uses is configuration (`headroom_source`): on CUDA it is NVML or an explicit
choice, never a silent fallback (a host reading on a GPU would steer residency by the wrong
memory); `make_probe` raises with the fix when NVML does not answer.

Deliberately does not know: what the memory is used for, what to do about it, or torch (the
allocator's figures come through a callable the runtime supplies).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("concentric.headroom")

HEADROOM_SOURCES = ("auto", "nvml", "host", "none")

# (reserved, allocated) bytes of this process's device allocator (PyTorch's caching allocator):
# reserved is what the device sees this process hold, allocated what tensors use of it.
AllocatorBytes = Callable[[], tuple[int, int]]


@dataclass(frozen=True)
class MemorySnapshot:
    total_bytes: int
    used_bytes: int
    free_bytes: int
    process_bytes: int  # this process's share of `used`
    utilization: float | None = None  # 0..1, accelerator busy fraction
    source: str = ""
    at: float = 0.0  # time.monotonic() of the reading
    seq: int = -1  # the sampler's number for it: readings started later have larger numbers
    reserved_bytes: int = 0  # this process's allocator: held from the device
    allocated_bytes: int = 0  # ... and in use by tensors (reserved - allocated is its cache)


class HeadroomError(RuntimeError):
    """The configured probe cannot read this device (raised at start, with the fix)."""


class HeadroomProbe:
    source = "none"

    def read(self) -> MemorySnapshot:
        raise NotImplementedError


class NvmlProbe(HeadroomProbe):
    source = "nvml"

    def __init__(
        self,
        uuid: str,
        allocator: AllocatorBytes | None = None,
        nvml: Any = None,
        pid: int | None = None,
    ):
        """`uuid`: the device's UUID as CUDA reports it ("GPU-..." or "MIG-..."; a bare UUID is
        tried with both prefixes). `nvml`: the pynvml module (tests pass a fake)."""
        if nvml is None:
            import pynvml  # nvidia-ml-py

            nvml = pynvml
        nvml.nvmlInit()
        self._nvml = nvml
        self.uuid, self._handle = _handle_by_uuid(nvml, uuid)
        self._allocator = allocator
        self._pid = os.getpid() if pid is None else pid
        self._warned_pid = False

    def read(self) -> MemorySnapshot:
        n, h = self._nvml, self._handle
        mem = n.nvmlDeviceGetMemoryInfo(h)
        reserved, allocated = self._allocator() if self._allocator else (0, 0)
        mine = self._nvml_share()
        if mine is None:  # another PID namespace (a container): the allocator's own count
            mine = reserved
        try:
            util = n.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
        except n.NVMLError:
            util = None
        return MemorySnapshot(
            mem.total,
            mem.used,
            mem.free,
            mine,
            util,
            self.source,
            time.monotonic(),
            reserved_bytes=reserved,
            allocated_bytes=allocated,
        )

    def _nvml_share(self) -> int | None:
        """This process's bytes as NVML counts them, or None if no process NVML lists is us."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return None
        mine = [p for p in procs if p.pid == self._pid]
        if not mine:
            if not self._warned_pid:
                self._warned_pid = True
                log.info(
                    "NVML lists no process with our PID %d (a container's PID namespace?): this "
                    "process's share is its allocator's reserved bytes",
                    self._pid,
                )
            return None
        return sum(p.usedGpuMemory or 0 for p in mine)


def _handle_by_uuid(nvml: Any, uuid: str):
    names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for name in names:
        try:
            return name, nvml.nvmlDeviceGetHandleByUUID(name)
        except nvml.NVMLError:
            continue
    raise HeadroomError(f"NVML knows no device with UUID {uuid}")


class HostProbe(HeadroomProbe):
    source = "host"

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes

    def read(self) -> MemorySnapshot:
        rss = _rss_bytes()
        used = min(rss, self.budget)
        return MemorySnapshot(
            self.budget, used, self.budget - used, rss, None, self.source, time.monotonic()
        )


class ScriptedProbe(HeadroomProbe):
    source = "scripted"

    def __init__(self, total_bytes: int, free_bytes: int):
        self.total = total_bytes
        self.free = free_bytes

    def set_free(self, free_bytes: int) -> None:
        self.free = free_bytes

    def read(self) -> MemorySnapshot:
        used = self.total - self.free
        return MemorySnapshot(
            self.total, used, self.free, used, None, self.source, time.monotonic()
        )


def make_probe(
    source: str,
    device: str,
    host_budget_bytes: int,
    device_uuid: Callable[[], str] | None = None,
    allocator: AllocatorBytes | None = None,
    nvml: Any = None,
) -> HeadroomProbe | None:
    """The probe `source` names for `device` ("auto": NVML on CUDA, the host budget elsewhere;
    "none": no probe, None). `device_uuid`: the CUDA device's UUID (the runtime asks CUDA, which
    honours CUDA_VISIBLE_DEVICES). Raises HeadroomError, saying what to do, when NVML is asked
    for (or implied by a CUDA device) and does not answer."""
    if source not in HEADROOM_SOURCES:
        raise HeadroomError(f"headroom_source must be one of {', '.join(HEADROOM_SOURCES)}")
    cuda = device.startswith("cuda")
    if source == "none":
        return None
    if source == "host" or (source == "auto" and not cuda):
        return HostProbe(host_budget_bytes)
    if not cuda:
        raise HeadroomError(f"headroom_source nvml needs a CUDA device, not {device!r}")
    try:
        if device_uuid is None:
            raise HeadroomError("no way to name the CUDA device to NVML")
        return NvmlProbe(device_uuid(), allocator, nvml)
    except Exception as e:
        raise HeadroomError(
            f"NVML cannot read {device} ({type(e).__name__}: {e}). Install nvidia-ml-py (a "
            "dependency of concentric) and run with the NVIDIA driver visible, or set "
            "headroom_source: host (a configured budget) or none (no headroom readings: only "
            "out-of-memory errors shrink the resident widths)"
        ) from e


class ProbeSampler:
    """Reads a probe every `interval_s` on a daemon thread (or at once when `request()`ed);
    `latest` is the newest reading. Each reading is numbered when it starts, so `next_seq`
    read at some moment is at most the number of any reading begun after it."""

    def __init__(
        self,
        probe: HeadroomProbe,
        interval_s: float = 0.5,
        on_sample: Callable[[MemorySnapshot], None] | None = None,
    ):
        self.probe = probe
        self.interval_s = interval_s
        self.on_sample = on_sample
        self._lock = threading.Lock()
        self._next_seq = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.latest: MemorySnapshot = self.sample()

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="headroom-probe", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Take a reading soon (now, on the sampler's thread) instead of at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sample()
            except Exception:  # a failed reading is skipped; the next may succeed
                log.exception("headroom reading failed")

    def sample(self) -> MemorySnapshot:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        snap = dataclasses.replace(self.probe.read(), seq=seq)
        with self._lock:
            # A slow reading never replaces one begun after it.
            if getattr(self, "latest", None) is None or seq > self.latest.seq:
                self.latest = snap
        if self.on_sample is not None:
            self.on_sample(snap)
        return snap

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
