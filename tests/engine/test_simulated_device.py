"""Elasticity on a simulated accelerator (tests/engine/sim_device.py): the engine, the real
`Elasticity` and a `ProbeSampler`, with FFN buffers and step activations allocated on a device
whose free memory is seen the way NVML sees it, behind a caching allocator.

Each scenario is one the first real GPU run would have met, and each ends with every request
finished whole (no error) and the resident widths where the memory says they should be:

- memory freed by a shrink stays in the allocator's cache, invisible to NVML, until released:
  one shrink must release it, or the next reading still looks low and residency collapses;
- a stale low reading (the sampler reads every 0.5 s, steps take milliseconds) moves residency
  by one level only: later decisions wait for a reading begun after the resize settled;
- a grow whose build runs out of memory (another process took it meanwhile) is counted and
  backed off, and the grow that follows once memory is back succeeds;
- a grow is started only when its peak (the changed layers' new buffers beside the old ones)
  fits above the high-water mark, not just its steady-state extra bytes;
- an allocation failure in a step, whatever allocator reports it, shrinks one level and the
  step is retried.
"""

from __future__ import annotations

import pytest

from policies.ordering import FirstComeFirstServed
from policies.subnet_choice import LargestFitsPolicy
from server.engine.chooser import SubnetChooser
from server.engine.elasticity import Elasticity, ElasticityConfig
from server.engine.engine import Engine
from server.engine.kv_blocks import BlockManager
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.telemetry.headroom import HeadroomProbe, ProbeSampler
from server.vocabulary.subnets import SubnetTable
from tests.engine.fake_runner import EOS, ByteDecoder
from tests.engine.harness import TABLE, TEXT, VOCAB, Harness, greedy, prompt, tier
from tests.engine.sim_device import SimDevice, SimFfn, SimProbe, SimRunner
from tests.unit.engine_fixtures import layout

ROW = 1_000  # device bytes per FFN row (one layer)
LOW, HIGH = 1_000_000, 2_000_000  # the marks, in device bytes
ANY = tier("any")


def build_sim(
    device: SimDevice,
    bytes_per_token: int = 1_000,
    table: SubnetTable = TABLE,
    clock=None,
    config: ElasticityConfig | None = None,
    probe: HeadroomProbe | None = None,
) -> tuple[Harness, SimDevice]:
    """An engine whose weights and steps live on `device` (full widths resident at first),
    read through `probe` (default: the device's NVML view directly)."""
    lay = layout(TEXT)
    blocks = BlockManager(4_000, 4, lay, True)
    ffn = SimFfn(device, TEXT.intermediate_size, ROW)
    probe = probe or SimProbe(device)
    sampler = ProbeSampler(probe)
    el = Elasticity(ffn, table, sampler, config or ElasticityConfig(LOW, HIGH))
    chooser = SubnetChooser(table, LargestFitsPolicy(), el.offered)
    scheduler = Scheduler(
        SchedulerConfig(8, 64, 16, 512), blocks, FirstComeFirstServed(), (EOS,), chooser.assign
    )
    runner = SimRunner(
        4_000, 4, lay, clock=clock, ffn=ffn, device=device, bytes_per_token=bytes_per_token
    )
    engine = Engine(runner, scheduler, ByteDecoder(), VOCAB, chooser, el)
    h = Harness(engine, runner, scheduler, blocks, chooser, el, ffn, None, sampler)
    return h, device


def fits_with(ffn_bytes: int, free: int) -> SimDevice:
    """A device with `ffn_bytes` to be held by the FFN and `free` bytes left over after it."""
    return SimDevice(capacity=ffn_bytes + free + 10_000_000, others=10_000_000)


def full_bytes() -> int:
    return sum(TEXT.intermediate_size) * ROW


def assert_whole(h: Harness, *rids: str) -> None:
    """Every request finished with all its tokens, none failed, no contract broken."""
    for rid in rids:
        final = h.final(rid)
        assert final.error is None and final.finish_reason == "length", final
        assert h.tokens(rid) == h.sampled(rid) == h.replayed(rid)
    h.assert_idle()


def test_a_shrink_releases_what_it_freed_so_one_level_is_enough():
    """Another process takes memory: free falls under the low-water mark by less than one
    level's bytes. Elasticity shrinks one level; the freed rows would sit in PyTorch's cache
    (the device's free memory unchanged) but are released at the commit, so the next reading
    (begun after the resize) is above the mark and residency stays one level down."""
    h, dev = build_sim(fits_with(full_bytes(), 3 * HIGH))
    el = h.elasticity
    top = len(el.levels) - 1
    step_d = el.level_bytes[top] - el.level_bytes[top - 1]
    assert step_d > LOW  # one level's bytes are enough to get back over the mark
    for i in range(4):
        h.add(f"r{i}", prompt(6, i), None, greedy(24), tier=ANY)
    h.step()
    dev.others += dev.nvml_free - LOW // 2  # now half the low-water mark is free

    def fresh(_):
        h.sampler.sample()  # the sampler's thread, every step

    h.run(before_step=fresh)
    h.sampler.sample()
    h.engine.step()  # an idle tick with a reading after the last step
    assert el.current == top - 1, el.current
    assert h.ffn.history == [el.levels[top - 1]]
    assert dev.released >= 1 and dev.nvml_free >= LOW
    assert el.counters.shrinks == 1 and el.counters.oom_shrinks == 0
    assert_whole(h, "r0", "r1", "r2", "r3")


def test_one_stale_low_reading_moves_residency_one_level_only():
    """A single low reading, then none for many steps (the sampler reads every 0.5 s; a step
    takes milliseconds): one level goes, and nothing more until a reading begun after that
    resize; that reading sees the released memory and nothing more moves."""
    h, dev = build_sim(fits_with(full_bytes(), 3 * HIGH))
    el = h.elasticity
    top = len(el.levels) - 1
    h.add("a", prompt(6), None, greedy(30), tier=ANY)
    h.step()
    dev.others += dev.nvml_free - LOW // 2
    h.sampler.sample()  # the one low reading; the memory stays as it is, readings are scarce
    for _ in range(12):
        h.step()
    assert el.current == top - 1 and el.counters.stale_readings >= 10
    h.sampler.sample()
    h.run(before_step=lambda _: h.sampler.sample())
    assert el.current == top - 1 and len(h.ffn.history) == 1
    assert_whole(h, "a")


def test_a_grow_that_runs_out_of_memory_is_counted_backed_off_and_retried_later(clock):
    """Memory comes back and a grow starts; before its background build runs, another process
    takes the memory: the build fails. No request sees it: the grow is abandoned (its bytes
    freed), counted, and no grow starts during the back-off, even with roomy readings. After
    it, with the memory back, the grow succeeds."""
    h, dev = build_sim(fits_with(full_bytes(), 3 * HIGH), clock=clock)
    el = h.elasticity
    top = len(el.levels) - 1
    # down one level first (pressure, then released)
    dev.others += dev.nvml_free - LOW // 2
    h.sampler.sample()
    h.engine.step()
    assert el.current == top - 1
    dev.others = 0  # plenty free again
    h.add("a", prompt(6), None, greedy(40), tier=ANY)
    h.sampler.sample()
    h.step()  # the tick starts the grow
    assert el.counters.grows == 1 and h.ffn.resizes[-1].background
    dev.others += dev.nvml_free - 1_000  # someone takes it all before the upload runs
    h.ffn.finish_resizes()
    h.step()  # the tick finds the build failed
    assert el.counters.grow_failures == 1 and el.current == top - 1
    assert h.ffn.resizes[-1].error is not None and h.ffn.resizes[-1].abandoned
    assert not h.ffn.violations
    dev.others = 0  # memory is back at once, but the back-off holds
    for _ in range(5):
        h.sampler.sample()
        clock.advance(1.0)
        h.step()
    assert el.counters.grows == 1
    clock.advance(el.config.grow_backoff_s)

    def ready(_):
        h.sampler.sample()
        h.ffn.finish_resizes()

    h.run(before_step=ready)
    h.sampler.sample()
    h.engine.step()
    assert el.counters.grows == 2 and el.counters.grow_failures == 1
    assert el.current == top and h.ffn.resident_widths == el.levels[top]
    assert_whole(h, "a")


def test_a_grow_is_budgeted_for_its_peak_not_its_steady_state():
    """Growing a level builds each changed layer's new buffers whole while the old ones still
    serve: the peak holds (old + new) of those layers. With free memory enough for the
    steady-state extra bytes above the high-water mark but not for the peak, no grow starts;
    with room for the peak it does, and the device never went under the high-water mark."""
    h, dev = build_sim(fits_with(full_bytes(), 3 * HIGH))
    el = h.elasticity
    top = len(el.levels) - 1
    dev.others += dev.nvml_free - LOW // 2
    h.sampler.sample()
    h.engine.step()
    assert el.current == top - 1
    extra = el.level_bytes[top] - el.level_bytes[top - 1]
    peak = h.ffn.transient_bytes(el.levels[top])
    assert peak > extra  # the layers that grow are copied whole
    dev.others -= HIGH + (extra + peak) // 2 - dev.nvml_free  # between the two needs
    h.sampler.sample()
    h.engine.step()
    assert el.counters.grows == 0
    dev.others -= peak  # now the peak fits too
    h.sampler.sample()
    h.engine.step()
    assert el.counters.grows == 1
    lowest = dev.nvml_free
    h.ffn.finish_resizes()
    lowest = min(lowest, dev.nvml_free)
    h.engine.step()
    assert el.current == top and lowest >= HIGH


@pytest.mark.parametrize("kind", ["torch", "cublas", "cudnn", "cuda", "host"])
def test_an_allocation_failure_of_any_kind_in_a_step_shrinks_and_retries(kind):
    """Steps cache their activations; a prefill chunk needs more than the device has left
    (without the cache having pushed free memory under the low-water mark first). The
    allocator reports it (as torch, cuBLAS, cuDNN, the CUDA runtime or the host would): the
    engine shrinks one level at once (releasing the rows), retries the step, and it succeeds;
    every request finishes whole and the engine counts the failure by kind."""
    h, dev = build_sim(fits_with(full_bytes(), LOW + 400_000), bytes_per_token=100_000)
    el = h.elasticity
    top = len(el.levels) - 1
    dev.fail_kind = kind
    h.add("short", prompt(4), None, greedy(6), tier=ANY)
    h.step()  # 4 tokens' activations cached: free is now exactly the low-water mark
    assert dev.nvml_free == LOW and el.current == top
    h.add("long", prompt(60, 1), None, greedy(6), tier=ANY)  # a 16-token chunk: 1.7 MB
    h.run(before_step=lambda _: h.sampler.sample())
    assert h.runner.kinds == [kind]
    assert h.engine.out_of_memory == {kind: 1}
    assert el.counters.oom_shrinks == 1 and el.current == top - 1
    assert_whole(h, "short", "long")
