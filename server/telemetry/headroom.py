"""Memory headroom probes: NVML on an accelerator, a configured budget on a CPU, a script in tests.

Owns reading how much accelerator memory there is and how much is free, sampled on a background
timer (never per request: NVML calls cost microseconds to milliseconds). `headroom` is what the
residency controller acts on: free memory minus a safety margin.

- `NvmlProbe` (nvidia-ml-py's `pynvml`): the device's total/used/free, this process's usage and
  the GPU utilisation.
- `HostProbe`: where NVML is absent. The "device" is a configured memory budget; used is this
  process's resident memory (its weights, caches and activations all live in host memory).
- `ScriptedProbe`: a test says "free memory is now X".

Deliberately does not know: what the memory is used for, or what to do about it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySnapshot:
    total_bytes: int
    used_bytes: int
    free_bytes: int
    process_bytes: int  # this process's share of `used`
    utilization: float | None = None  # 0..1, accelerator busy fraction
    source: str = ""
    at: float = 0.0  # time.monotonic() of the reading


class HeadroomProbe:
    source = "none"

    def read(self) -> MemorySnapshot:
        raise NotImplementedError


class NvmlProbe(HeadroomProbe):
    source = "nvml"

    def __init__(self, device_index: int = 0):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._pid = os.getpid()

    def read(self) -> MemorySnapshot:
        n, h = self._nvml, self._handle
        mem = n.nvmlDeviceGetMemoryInfo(h)
        mine = 0
        try:
            for p in n.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == self._pid and p.usedGpuMemory:
                    mine += p.usedGpuMemory
        except n.NVMLError:
            pass
        try:
            util = n.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
        except n.NVMLError:
            util = None
        return MemorySnapshot(
            mem.total, mem.used, mem.free, mine, util, self.source, time.monotonic()
        )


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


def default_probe(device: str, host_budget_bytes: int) -> HeadroomProbe:
    """NVML for a CUDA device when it answers; otherwise the host budget."""
    if device.startswith("cuda"):
        try:
            index = int(device.split(":")[1]) if ":" in device else 0
            return NvmlProbe(index)
        except Exception:  # no driver, no library: fall back, visibly (source says "host")
            pass
    return HostProbe(host_budget_bytes)


class ProbeSampler:
    """Reads a probe every `interval_s` on a daemon thread; `latest` is the newest reading."""

    def __init__(
        self,
        probe: HeadroomProbe,
        interval_s: float = 0.5,
        on_sample: Callable[[MemorySnapshot], None] | None = None,
    ):
        self.probe = probe
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.latest: MemorySnapshot = probe.read()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="headroom-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> MemorySnapshot:
        self.latest = self.probe.read()
        if self.on_sample is not None:
            self.on_sample(self.latest)
        return self.latest

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
