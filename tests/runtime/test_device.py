"""server/runtime/device.py and the NVML probe: the device named by UUID, allocation failures
recognised whatever allocator raised them.

Proves: every allocation-failure kind (torch's OutOfMemoryError, a host MemoryError, cuBLAS,
cuDNN and CUDA runtime RuntimeErrors, and one re-raised from those) is classified, and nothing
else is; through the real runner and engine, a cuBLAS or cuDNN allocation failure in a step
shrinks and retries instead of failing requests; NVML is asked for the device CUDA calls `cuda:N`
by its UUID, so with CUDA_VISIBLE_DEVICES remapping indices each engine follows its own device
(two simulated devices); a plain "cuda" is bound as the index it names; inside a container (no
PID of ours in NVML's list) this process's share is its allocator's; a CUDA server whose NVML does
not answer fails at start with the fix.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from server.runtime import device as dev
from server.runtime.device import allocation_failure, device_uuid
from server.telemetry.headroom import HeadroomError, HostProbe, NvmlProbe, make_probe
from server.vocabulary.step import ALLOCATION_FAILURE_KINDS
from tests.engine.harness import greedy, prompt, tier
from tests.engine.sim_device import SimDevice, SimNvml
from tests.engine.test_simulated_device import HIGH, LOW, assert_whole, build_sim, full_bytes

CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"


def _raised_from(error: BaseException) -> RuntimeError:
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("the step failed") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "torch"),
        (MemoryError(), "host"),
        (RuntimeError(CUBLAS), "cublas"),
        (RuntimeError(CUDNN), "cudnn"),
        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."), "cuda"),
        (RuntimeError("cuDNN: workspace allocation: out of memory"), "cudnn"),
        (_raised_from(RuntimeError(CUBLAS)), "cublas"),
    ],
)
def test_every_allocation_failure_kind_is_recognised(error, kind):
    assert allocation_failure(error) == kind
    assert kind in ALLOCATION_FAILURE_KINDS  # the names metrics create at zero


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
        ValueError("out of memory"),  # not a runtime error: a request's own
        IndexError("index 300 is out of bounds"),
    ],
)
def test_other_errors_are_not_allocation_failures(error):
    assert allocation_failure(error) is None


@pytest.mark.parametrize("message", [CUBLAS, CUDNN])
def test_a_library_allocation_failure_in_a_step_shrinks_and_retries(tiny_dir, monkeypatch, message):
    """cuBLAS and cuDNN report allocation failures as plain RuntimeErrors: the runner must not
    take them for a request's fault (isolating and failing requests) but raise them as
    DeviceOutOfMemory, so the engine shrinks one level and runs the step again."""
    from tests.runtime.test_elasticity import _serve, elastic_engine

    eng, el, _probe, _sampler, rt = elastic_engine(tiny_dir, free_mb=60)
    top = len(el.levels) - 1
    forward = rt.model.forward
    calls = {"n": 0}

    def flaky(batch, kv):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(message)
        return forward(batch, kv)

    monkeypatch.setattr(rt.model, "forward", flaky)
    _, finished = _serve(eng, 6, 300, lambda step: None)
    assert len(finished) == 6
    assert all(o.finish_reason in ("length", "stop") and o.error is None for o in finished.values())
    assert el.counters.oom_shrinks == 1 and el.current == top - 1
    assert eng.out_of_memory == {allocation_failure(RuntimeError(message)): 1}


# ---- NVML by UUID ---------------------------------------------------------------------------

# Two GPUs in PCI order (NVML's numbering); CUDA_VISIBLE_DEVICES=1,0 makes cuda:0 the second.
PCI = ("GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000")


def fake_cuda(monkeypatch, visible: list[int]) -> None:
    """torch.cuda as CUDA answers under CUDA_VISIBLE_DEVICES=`visible` (physical indices):
    visible index i is physical device visible[i], whose UUID CUDA reports without "GPU-"."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, visible)))
    props = [SimpleNamespace(uuid=PCI[p].removeprefix("GPU-")) for p in visible]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_nvml_reads_the_device_cuda_names_even_when_indices_are_remapped(monkeypatch):
    fake_cuda(monkeypatch, visible=[1, 0])
    devices = [SimDevice(capacity=80_000_000, others=o) for o in (5_000_000, 60_000_000)]
    nvml = SimNvml(list(zip(PCI, devices, strict=True)))
    uuids = [device_uuid(f"cuda:{i}") for i in range(2)]
    assert uuids == [PCI[1].removeprefix("GPU-"), PCI[0].removeprefix("GPU-")]
    probes = [NvmlProbe(u, nvml=nvml) for u in uuids]
    assert [p.uuid for p in probes] == [PCI[1], PCI[0]]
    assert probes[0].read().free_bytes == devices[1].nvml_free  # cuda:0 is the second GPU
    assert probes[1].read().free_bytes == devices[0].nvml_free
    assert nvml.by_index_calls == 0  # never by index: NVML's indices are not CUDA's


def test_two_engines_on_remapped_devices_each_follow_their_own(monkeypatch):
    """Two servers, cuda:0 and cuda:1 under CUDA_VISIBLE_DEVICES=1,0, each an engine over its
    own simulated device, read through NVML by UUID. Another process fills the second GPU (PCI
    order), which is cuda:0: only cuda:0's engine shrinks (one level, released), cuda:1's keeps
    its full widths, and every request on both finishes whole."""
    fake_cuda(monkeypatch, visible=[1, 0])
    free = 3 * HIGH
    physical = [SimDevice(capacity=full_bytes() + free + 10_000_000) for _ in PCI]
    for d in physical:
        d.others = 10_000_000
    nvml = SimNvml(list(zip(PCI, physical, strict=True)))
    engines = []
    for cuda in ("cuda:0", "cuda:1"):
        probe = make_probe("nvml", cuda, 0, device_uuid=lambda c=cuda: device_uuid(c), nvml=nvml)
        uuid = probe.uuid
        engines.append(build_sim(physical[PCI.index(uuid)], probe=probe)[0])
    any_tier = tier("any")
    for n, h in enumerate(engines):
        for i in range(3):
            h.add(f"e{n}-{i}", prompt(6, i), None, greedy(20), tier=any_tier)
        h.step()
    physical[1].others += physical[1].nvml_free - LOW // 2  # the second GPU in PCI order
    for h in engines:
        h.run(before_step=lambda _, h=h: h.sampler.sample())
        h.sampler.sample()
        h.engine.step()
    top = [len(h.elasticity.levels) - 1 for h in engines]
    assert [h.elasticity.current for h in engines] == [top[0] - 1, top[1]]
    assert physical[1].nvml_free >= LOW and physical[0].released == 0
    for n, h in enumerate(engines):
        assert_whole(h, *(f"e{n}-{i}" for i in range(3)))


def test_inside_a_container_our_share_is_the_allocators(monkeypatch):
    """NVML lists host PIDs (or none) inside a PID namespace: no match means this process's
    share is what its allocator holds, not 0."""
    d = SimDevice(capacity=100, others=10, context=5, reserved=40, allocated=30)
    host_pids = SimNvml([(PCI[0], d)], pids=[4242])
    probe = NvmlProbe(PCI[0], allocator=lambda: (d.reserved, d.allocated), nvml=host_pids, pid=7)
    snap = probe.read()
    assert snap.process_bytes == 40 and snap.reserved_bytes == 40 and snap.allocated_bytes == 30
    ours = SimNvml([(PCI[0], d)], pids=[os.getpid()])
    assert NvmlProbe(PCI[0], nvml=ours).read().process_bytes == d.context + d.reserved


def test_the_probe_is_configuration_and_a_silent_host_fallback_on_cuda_is_gone():
    class NoDriver(SimNvml):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    assert make_probe("none", "cuda:0", 1) is None
    assert isinstance(make_probe("host", "cuda:0", 1), HostProbe)
    assert isinstance(make_probe("auto", "cpu", 1), HostProbe)
    with pytest.raises(HeadroomError, match="headroom_source: host"):
        make_probe("auto", "cuda:0", 1, device_uuid=lambda: PCI[0], nvml=NoDriver([]))
    with pytest.raises(HeadroomError, match="needs a CUDA device"):
        make_probe("nvml", "cpu", 1)


def test_device_helpers_are_no_ops_off_cuda():
    dev.bind("cpu")
    dev.synchronize("cpu")
    dev.release_cached("cpu")
    assert dev.allocator_bytes("cpu") == (0, 0)
    with dev.on_device("cpu"):
        pass
    with pytest.raises(ValueError, match="not a CUDA device"):
        device_uuid("cpu")


def test_plain_cuda_is_pinned_to_an_index_before_it_is_bound(monkeypatch):
    """`--device cuda` names the opening thread's current device; torch.cuda.set_device refuses a
    device without an index (the first H200 run: every runtime failed to open so), and a step
    thread must bind the same device, not its own default."""
    bound = []

    def set_device(device):  # torch's own check, which the CPU build never reaches
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index, but got:{device}")
        bound.append(torch.device(device))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert dev.resolve("cuda") == torch.device("cuda", 3)
    assert dev.resolve("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve("cpu") == torch.device("cpu")
    dev.bind("cuda")
    dev.bind("cuda:1")
    assert bound == [torch.device("cuda", 3), torch.device("cuda", 1)]
