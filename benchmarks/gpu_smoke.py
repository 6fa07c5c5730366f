"""The first seconds of a lent accelerator: every risky path once, at the tiny scale, in bfloat16.

Owns the checks benchmarks/gpu_e4b.py runs before anything at E4B's sizes, so that a path that
breaks on real CUDA (streams, events, the caching allocator, NVML, out-of-memory errors) shows
in the first ~40 seconds of the one call (on an H200, 2026-12-04), with the rest still to come:

- `grow`: the resident widths start at the smallest level and the real `Elasticity`, reading the
  real probe (NVML by the device's UUID on CUDA), grows them level by level in the background
  while a request decodes; that request's tokens must equal its run at fixed widths, and the
  full subnet must decode what it decoded before the shrink;
- `oom`: a real allocation failure in a step (on CUDA the caching allocator is capped at what it
  already holds and the free room in its segments is filled, so the step's first allocation
  fails inside PyTorch's allocator; the shrink it triggers lifts the cap and frees the filling,
  as a real shrink would free rows): the engine shrinks, retries, and
  every request finishes;
- `sampling`: seeded sampled decoding (temperature, top-k, top-p) reproduces exactly;
- `mixed bf16`: eight greedy requests over eight subnets, together against alone, in each FFN
  layout and in batch-invariant mode (which must give all eight);
- `kernels`: the kernels (CUDA) or operators (CPU) the profiler sees in one decode step, eager.

Each check is recorded as it ends, `ok` true or false with what it saw; an exception is recorded
as a failed check and the next one runs.

Deliberately does not know: E4B's sizes, timing budgets, or the table's layout.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policies.subnet_choice import LargestFitsPolicy
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.elasticity import Elasticity, ElasticityConfig
from server.engine.offline import GenerationRequest, generate, greedy
from server.engine.scheduler import SchedulerConfig
from server.runtime.device import allocator_bytes, device_uuid, release_cached, synchronize
from server.runtime.elastic import ElasticRuntime
from server.telemetry.headroom import ProbeSampler, make_probe
from server.tools.dev_model import make_dev_model
from server.vocabulary.residency_levels import residency_levels
from server.vocabulary.sampling_params import SamplingParams

SUBNETS = (
    "full",
    "e2b",
    "e2.98b-layer",
    "mix-0.75",
    "skip-3-7",
    "skip-30-33",
    "e3.39b-layer",
    "e2.49b-block",
)
Record = Callable[..., Any]


def run_smoke(device: torch.device, work: Path, record: Record) -> None:
    """Every check, in order; `record(check=..., ok=..., seconds=..., **detail)` per check."""
    t0 = time.perf_counter()
    folder = work / "smoke-tiny"
    if not (folder / "config.json").is_file():
        make_dev_model("tiny", folder, progress=False)
    rt = ElasticRuntime.open(folder, dtype="bfloat16", device=str(device))
    record(check="open", ok=True, seconds=time.perf_counter() - t0, device=str(device))
    for name, check in (
        ("grow", check_grow),
        ("oom", check_out_of_memory),
        ("sampling", check_sampling),
        ("mixed bf16", check_mixed),
        ("kernels", check_kernels),
    ):
        t = time.perf_counter()
        try:
            detail = check(rt)
            record(check=name, seconds=time.perf_counter() - t, **detail)
        except Exception as e:  # one broken path must not hide the others
            traceback.print_exc()
            record(
                check=name,
                ok=False,
                seconds=time.perf_counter() - t,
                error=f"{type(e).__name__}: {e}",
                trace=traceback.format_exc(limit=8),
            )
        gc.collect()
        release_cached(device)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2, *torch.randint(107, 500, (n - 1,), generator=g).tolist()]


def _elastic_engine(rt: ElasticRuntime, config: ElasticityConfig):
    dev = str(rt.weights.device)
    probe = make_probe(
        "auto",
        dev,
        64 * 1024**3,
        device_uuid=lambda: device_uuid(dev),
        allocator=lambda: allocator_bytes(dev),
    )
    sampler = ProbeSampler(probe)
    el = Elasticity(rt.weights, rt.subnets, sampler, config)
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32, max_model_len=512
    )
    eng = assemble_engine(
        rt, kv_bytes_for(rt, 4096), sched, subnet_policy=LargestFitsPolicy(), elasticity=el
    )
    return eng, el, sampler


def check_grow(rt: ElasticRuntime) -> dict[str, Any]:
    w = rt.weights
    full = rt.subnets["full"]
    before = generate(
        assemble_engine(rt, kv_bytes_for(rt, 64)),
        [GenerationRequest(full, _prompt(12, 0), greedy(6))],
    )[0].token_ids
    small = min(rt.subnets, key=lambda s: s.effective_params)
    solo = generate(
        assemble_engine(rt, kv_bytes_for(rt, 64)),
        [GenerationRequest(small, _prompt(10, 1), greedy(24))],
    )[0].token_ids
    levels = residency_levels(
        w.full_widths, [(s.layers, s.widths, s.effective_params) for s in rt.subnets]
    )
    w.resize_ffn(levels[0])
    # No marks: any reading grows, one level at a time, each built in the background.
    eng, el, sampler = _elastic_engine(rt, ElasticityConfig(0, 0))
    top = len(el.levels) - 1
    free_before = sampler.latest.free_bytes
    eng.add_request("during", _prompt(10, 1), small, greedy(24))
    during: list[int] = []
    deadline = time.monotonic() + 30
    while (eng.has_work or el.current < top) and time.monotonic() < deadline:
        sampler.sample()
        during.extend(t for out in eng.step() for t in out.token_ids)
        if not eng.has_work:
            time.sleep(0.002)  # idle ticks while the last levels upload
    after = generate(
        assemble_engine(rt, kv_bytes_for(rt, 64)),
        [GenerationRequest(full, _prompt(12, 0), greedy(6))],
    )[0].token_ids
    synchronize(w.device)
    return {
        "ok": el.current == top and during == solo and after == before,
        "levels_grown": el.counters.grows,
        "grow_failures": el.counters.grow_failures,
        "probe": sampler.probe.source,
        "free_before": free_before,
        "free_after": sampler.sample().free_bytes,
        "tokens_during_equal_solo": during == solo,
        "full_equal_before_shrink": after == before,
    }


def check_out_of_memory(rt: ElasticRuntime) -> dict[str, Any]:
    eng, el, _ = _elastic_engine(rt, ElasticityConfig(0, 0, oom_cooldown_s=3600))
    top = len(el.levels) - 1
    params = greedy(4)
    eng.add_request("warm", _prompt(200, 2), None, params)
    while eng.has_work:
        eng.step()
    device = rt.weights.device
    forward = rt.model.forward
    fillers: list[torch.Tensor] = []
    if device.type == "cuda":
        release_cached(device)
        reserved = torch.cuda.memory_reserved(device)
        total = torch.cuda.get_device_properties(device).total_memory
        # The allocator may hold no more than it holds now: a step's first new segment fails.
        torch.cuda.set_per_process_memory_fraction(reserved / total, device)
        # A tiny step fits in the free room of the segments the allocator keeps (the first H200
        # run: no failure at all): fill that room, so the step must ask for a new segment.
        size = 1 << 30
        while size >= 512:
            try:
                fillers.append(torch.empty(size, dtype=torch.uint8, device=device))
            except torch.OutOfMemoryError:
                size //= 2
        how = f"allocator capped, {sum(f.numel() for f in fillers)} free bytes filled"
    else:  # host memory cannot be exhausted safely: the forward raises it once
        calls = {"n": 0}

        def fail_once(batch, kv):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.OutOfMemoryError("simulated: no accelerator")
            return forward(batch, kv)

        rt.model.forward = fail_once
        how = "raised"
    shrink = el.on_out_of_memory

    def shrink_and_lift(scheduler):
        if device.type == "cuda":  # what a real shrink frees, at this scale, is the cap
            fillers.clear()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return shrink(scheduler)

    el.on_out_of_memory = shrink_and_lift
    try:
        eng.add_request("after", _prompt(200, 3), None, params)
        outs = []
        while eng.has_work:
            outs.extend(eng.step())
    finally:
        el.on_out_of_memory = shrink
        fillers.clear()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        else:
            del rt.model.forward  # the class's own again
    w = rt.weights
    w.resize_ffn(w.full_widths)
    final = [o for o in outs if o.finished]
    return {
        "ok": el.counters.oom_shrinks == 1
        and el.current == top - 1
        and all(o.error is None for o in final),
        "how": how,
        "kinds": dict(eng.out_of_memory),
        "oom_shrinks": el.counters.oom_shrinks,
        "finished": [o.finish_reason for o in final],
    }


def check_sampling(rt: ElasticRuntime) -> dict[str, Any]:
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=1234)
    reqs = [GenerationRequest(rt.subnets[n], _prompt(9, 4), params) for n in ("full", "e2b")]
    runs = [
        [g.token_ids for g in generate(assemble_engine(rt, kv_bytes_for(rt, 128)), reqs)]
        for _ in range(2)
    ]
    vocab = rt.store.text.vocab_size_per_layer_input
    in_vocab = all(0 <= t < vocab for toks in runs[0] for t in toks)
    return {"ok": runs[0] == runs[1] and in_vocab, "tokens": runs[0]}


def check_mixed(rt: ElasticRuntime) -> dict[str, Any]:
    # Eight subnets on a device; four on a CPU, where this is the script's own test and slow.
    names = SUBNETS if rt.weights.device.type == "cuda" else SUBNETS[:4]
    reqs = [
        GenerationRequest(rt.subnets[n], _prompt(6 + 5 * i, 10 + i), greedy(6))
        for i, n in enumerate(names)
    ]
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=32, max_prefill_chunk=16, max_model_len=512
    )
    equal = {}
    for mode in ("grouped", "masked", "invariant"):
        kw = {"batch_invariant": True} if mode == "invariant" else {"ffn_mode": mode}

        def engine(kw=kw):
            return assemble_engine(rt, kv_bytes_for(rt, 512), sched, **kw)

        alone = [generate(engine(), [r])[0].token_ids for r in reqs]
        together = [g.token_ids for g in generate(engine(), reqs)]
        equal[mode] = sum(a == b for a, b in zip(alone, together, strict=True))
    return {"ok": equal["invariant"] == len(reqs), "of": len(reqs), **equal}


def check_kernels(rt: ElasticRuntime) -> dict[str, Any]:
    return {"ok": True, **decode_step_kernels(rt)}


def profiled_step(eng) -> tuple[dict[str, int], list]:
    """One engine step under the profiler: the kernels it ran on CUDA (those a captured graph
    replays included), the launches the host made and the graphs it replayed; on a CPU, the
    operators the step called (not the ones they call in turn). And the step's outputs."""
    from torch.profiler import ProfilerActivity, profile

    device = eng.runner.model.w.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        outs = eng.step()
        synchronize(device)
    events = prof.events()
    if cuda:
        kernels = sum(1 for e in events if e.device_type.name == "CUDA")
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel"))
        graphs = sum(1 for e in events if "GraphLaunch" in e.name)
        return {"kernels": kernels, "launches": launches, "graph_launches": graphs}, outs

    def top_level(e) -> bool:
        parent = e.cpu_parent
        return e.name.startswith("aten::") and (
            parent is None or not parent.name.startswith("aten::")
        )

    return {"operators": sum(1 for e in events if top_level(e))}, outs


def decode_step_kernels(
    rt: ElasticRuntime, compile_backend: str | None = None, paged_attention: bool = False
) -> dict[str, Any]:
    """Kernels (CUDA) or operators (CPU) the profiler records in one batch-1 decode step of the
    full subnet through the engine, after the step's shapes have run once (warm), and the
    step's wall time."""
    eng = assemble_engine(
        rt, kv_bytes_for(rt, 128), compile_backend=compile_backend, paged_attention=paged_attention
    )
    eng.add_request("k", _prompt(16, 5), rt.subnets["full"], greedy(8))
    for _ in range(4):  # prefill, then decode steps until compiled and warm
        eng.step()
    synchronize(rt.weights.device)
    t0 = time.perf_counter()
    eng.step()
    synchronize(rt.weights.device)
    step_ms = (time.perf_counter() - t0) * 1e3
    count, _ = profiled_step(eng)
    while eng.has_work:
        eng.step()
    return {"compiled": compile_backend, "step_ms": step_ms, **count}
