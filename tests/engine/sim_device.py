"""A simulated accelerator for elasticity tests: its memory as NVML sees it, behind PyTorch's
caching allocator, and resident FFN weights and steps that allocate on it.

`SimDevice` models what matters to the residency decision:
- the caching allocator: freeing a tensor returns its bytes to this process's cache, not to the
  device, so NVML's free memory does not rise until `empty_cache` (as `torch.cuda.empty_cache`)
  releases them; a new allocation reuses cached bytes first; an allocation that does not fit
  first releases the cache and retries (as PyTorch does), then fails with a kind (`SimOutOfMemory`);
- other processes (`others`): memory this process does not control;
- NVML's view (`nvml_free`, `nvml_used`), which a probe reads, and PyTorch's own counters
  (`reserved`, `allocated`).

`SimFfn` meets `server.engine.elasticity.ResidentFfn` with its buffers on a `SimDevice`, the way
server/runtime/residency.py holds them: a grow builds the new buffers of every changed layer
(allocated when the background build runs, `finish_resizes`) while the old ones still serve, and
frees the old ones at commit; a shrink, at commit, copies one layer at a time. A build that runs
out of memory leaves its error on the pending resize.

`SimRunner` is the engine tests' FakeRunner whose every step also allocates its activations on
the device (bytes per token) and frees them after, so a step can run out of memory for real.

`SimProbe` reads NVML's view; `SimNvml` is a fake `pynvml` over several simulated devices in PCI
order, looked up by UUID (for the probe's device mapping).

Plain Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

from server.telemetry.headroom import HeadroomProbe, MemorySnapshot
from server.vocabulary.step import DeviceOutOfMemory
from tests.engine.fake_runner import FakeReport, FakeRunner


class SimOutOfMemory(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class SimDevice:
    capacity: int
    others: int = 0  # bytes held by other processes
    context: int = 0  # this process's CUDA context: held, not the allocator's
    reserved: int = 0  # held by this process's allocator (allocated + cached)
    allocated: int = 0
    fail_kind: str = "torch"  # how the next allocation failure is reported
    released: int = 0  # empty_cache calls

    @property
    def cached(self) -> int:
        return self.reserved - self.allocated

    @property
    def nvml_used(self) -> int:
        return self.others + self.context + self.reserved

    @property
    def nvml_free(self) -> int:
        return self.capacity - self.nvml_used

    def alloc(self, n: int) -> None:
        if n <= self.cached:
            self.allocated += n
            return
        need = n - self.cached
        if need > self.nvml_free:
            self.empty_cache()  # the allocator frees its cache and retries
            need = n
            if need > self.nvml_free:
                raise SimOutOfMemory(
                    self.fail_kind, f"tried to allocate {n} B with {self.nvml_free} B free"
                )
        self.reserved += need
        self.allocated += n

    def free(self, n: int) -> None:
        assert n <= self.allocated, (n, self.allocated)
        self.allocated -= n  # back to the cache: the device does not see it

    def empty_cache(self) -> None:
        self.reserved = self.allocated
        self.released += 1


class SimProbe(HeadroomProbe):
    source = "sim"

    def __init__(self, device: SimDevice):
        self.device = device

    def read(self) -> MemorySnapshot:
        d = self.device
        return MemorySnapshot(
            d.capacity,
            d.nvml_used,
            d.nvml_free,
            d.context + d.reserved,
            None,
            self.source,
            reserved_bytes=d.reserved,
            allocated_bytes=d.allocated,
        )


@dataclass
class SimResize:
    widths: tuple[int, ...]
    old: tuple[int, ...]
    background: bool
    finished: bool = False
    abandoned: bool = False
    error: BaseException | None = None
    built: int = 0  # bytes its build holds on the device

    def done(self) -> bool:
        return self.finished


@dataclass
class SimFfn:
    """Resident FFN widths whose buffers live on `device`, `bytes_per_row` per row per layer."""

    device: SimDevice
    full_widths: tuple[int, ...]
    bytes_per_row: int = 1
    resident_widths: tuple[int, ...] = ()
    resizes: list[SimResize] = field(default_factory=list)
    history: list[tuple[int, ...]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    peak_transient: int = 0  # the most bytes a resize held beyond the resident buffers

    def __post_init__(self) -> None:
        self.full_widths = tuple(self.full_widths)
        self.resident_widths = tuple(self.resident_widths or self.full_widths)
        self.device.alloc(self.resident_bytes)

    @property
    def resident_bytes(self) -> int:
        return self.bytes_for(self.resident_widths)

    def bytes_for(self, widths: Sequence[int]) -> int:
        return sum(widths) * self.bytes_per_row

    def transient_bytes(self, widths: Sequence[int]) -> int:
        grown = [w for w, r in zip(widths, self.resident_widths, strict=True) if w > r]
        shrunk = [w for w, r in zip(widths, self.resident_widths, strict=True) if w < r]
        return (sum(grown) + max(shrunk, default=0)) * self.bytes_per_row

    def serves(self, subnet) -> bool:
        return all(
            w <= self.resident_widths[layer]
            for layer, w in zip(subnet.layers, subnet.widths, strict=True)
        )

    def prepare_ffn(self, widths: Sequence[int], background: bool = True) -> SimResize:
        resize = SimResize(tuple(widths), self.resident_widths, background)
        self.resizes.append(resize)
        if not background:
            self._build(resize)
        return resize

    def finish_resizes(self) -> None:
        """Run every pending background build (each may run out of memory)."""
        for r in self.resizes:
            if not r.finished and not r.abandoned:
                self._build(r)

    def _build(self, r: SimResize) -> None:
        grown = sum(w for w, o in zip(r.widths, r.old, strict=True) if w > o)
        try:
            self.device.alloc(grown * self.bytes_per_row)
            r.built = grown * self.bytes_per_row
            self.peak_transient = max(self.peak_transient, r.built)
        except SimOutOfMemory as e:
            r.error = e
        r.finished = True

    def abandon_ffn(self, pending: SimResize) -> None:
        pending.abandoned = True
        if pending.built:
            self.device.free(pending.built)
            pending.built = 0

    def commit_ffn(self, pending: SimResize) -> FakeReport:
        if pending.error is not None:
            raise pending.error  # as residency.py's commit does
        if not pending.done() or pending.abandoned:
            self.violations.append(f"commit of an unusable resize to {pending.widths}")
        if pending.old != self.resident_widths:
            raise RuntimeError("the resident widths changed while a resize was being prepared")
        before = self.resident_bytes
        bpr = self.bytes_per_row
        for w, o in zip(pending.widths, pending.old, strict=True):
            if w > o:
                self.device.free(o * bpr)  # the old buffers go (the new were built)
            elif w < o:  # the kept prefix copied, then the old buffers dropped: one layer
                self.device.alloc(w * bpr)
                self.peak_transient = max(self.peak_transient, w * bpr)
                self.device.free(o * bpr)
        pending.built = 0
        self.resident_widths = pending.widths
        self.history.append(pending.widths)
        after = self.resident_bytes
        return FakeReport(max(0, after - before), max(0, before - after))

    def release_cached(self) -> None:
        self.device.empty_cache()


class SimRunner(FakeRunner):
    """A FakeRunner whose steps allocate `bytes_per_token` of activations on `device` and free
    them after (so they stay cached, as activations do); a step that cannot allocate raises
    DeviceOutOfMemory with the allocator's kind, having changed nothing."""

    def __init__(self, *args, device: SimDevice, bytes_per_token: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device
        self.bytes_per_token = bytes_per_token
        self.kinds: list[str] = []  # kinds of the out-of-memory errors raised

    def execute(self, seqs):
        need = self.bytes_per_token * sum(s.num_tokens for s in seqs)
        try:
            self.device.alloc(need)
        except SimOutOfMemory as e:
            self.kinds.append(e.kind)
            self.oom_raised += 1
            raise DeviceOutOfMemory(str(e), e.kind) from None
        try:
            return super().execute(seqs)
        finally:
            self.device.free(need)


class SimNvml:
    """A fake `pynvml` over simulated devices, listed in PCI order with their UUIDs."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: Sequence[tuple[str, SimDevice]], pids: Sequence[int] = ()):
        self.devices = list(devices)
        self.pids = list(pids)  # the PIDs NVML reports using each device
        self.by_index_calls = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        for i, (u, _) in enumerate(self.devices):
            if u == uuid:
                return i
        raise self.NVMLError(f"no device {uuid}")

    def nvmlDeviceGetHandleByIndex(self, index: int):
        self.by_index_calls += 1
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        d = self.devices[handle][1]
        return SimpleNamespace(total=d.capacity, used=d.nvml_used, free=d.nvml_free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):
        d = self.devices[handle][1]
        return [SimpleNamespace(pid=p, usedGpuMemory=d.context + d.reserved) for p in self.pids]

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        return SimpleNamespace(gpu=50)
