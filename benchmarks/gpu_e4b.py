"""The one measurement to run when an accelerator is lent: the elastic runtime at E4B's real sizes.

One run, in a fixed time budget (well under the device tool's per-call limit, so that a second
call still fits the lease), riskiest and most important first; every result is appended to
`gpu_e4b.jsonl` the moment it exists and `gpu_e4b.md` (the table) is rewritten after every
section, so a run cut short still leaves what it measured:

0. smoke (benchmarks/gpu_smoke.py, ~40 s, the tiny scale, bfloat16, on the device): every risky
   path once: background grow driven by the real `Elasticity` and probe (NVML by UUID), a real
   allocation failure shrunk and retried, seeded sampled decoding, mixed-subnet batches against
   solo runs in each FFN layout and in batch-invariant mode, and the eager decode step's kernels;
1. copy bandwidth: a large device-to-device copy (bytes read + written over time), and pinned
   host-to-device on an accelerator;
2. batch-1 greedy decode of the full and E2B subnets through the runtime, against the
   memory-bandwidth floor: bytes of weights one token reads (effective params + the vocab x hidden
   LM head, in the compute dtype) over the measured copy bandwidth;
3. the decode step users get with `compile: true` (inductor, replayed as a captured CUDA graph)
   against the eager step on the same requests: batch 1 (full subnet) and 32 rows over four
   subnets, every other one sampled; step time, tok/s against the floor, the profiler's kernels
   per step, and whether the two give the same tokens;
4. the kernels the profiler sees in one batch-1 decode step, eager and compiled (CUDA graphs),
   the compiled step with K/V gathered and paged (read in place);
5. transformers `generate()` on the same weights, full subnet (our tokens against its tokens);
6. throughput of 16 and 64 concurrent requests spread over four subnets (full, e3.39b-layer,
   e2.98b-block, e2b) through the real `Engine` (continuous batching, greedy, eos ignored, eager),
   with each pure decode step against the floor of the widest weights it reads;
7. resident FFN widths at E4B's sizes: shrinking to the level that still serves E2B (the device's
   free memory before and after the cached rows are released) and growing back as elasticity
   does (built in the background, then committed), with the grow's measured peak against the
   peak elasticity budgets for.

The E4B checkpoint is generated after the smoke, in the real layout, with random weights drawn on
the device (`server.tools.dev_model.TorchDraws`; 13.75 GB in bf16, no vision/audio towers) and
written to `--work` (not under `--out`: only the small result files travel back). A checkpoint
already in `--work` is reused, so an immediate rerun on a warm machine skips straight to
measuring. `--scale small` (the `tiny` dev preset's shapes) runs every section on a CPU in
seconds (the compiled steps through "aot_eager", section 4's compiled ones skipped); that is how
the script is tested
(tests/runtime/test_gpu_script.py).

    python benchmarks/gpu_e4b.py --scale e4b --device cuda --dtype bfloat16 --out $OUT
    python benchmarks/gpu_e4b.py --scale small --device cpu --dtype float32 --time-budget-s 120

Deliberately does not know: how a machine is lent or reached (benchmarks/run_on_h200.sh), or what
the numbers should be.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_smoke import decode_step_kernels, profiled_step, run_smoke
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.scheduler import SchedulerConfig
from server.runtime.device import allocator_bytes, device_uuid, release_cached
from server.runtime.elastic import ElasticRuntime
from server.runtime.kv_cache import KVCache
from server.telemetry.headroom import make_probe
from server.tools.dev_model import (
    E4B,
    PRESETS,
    Preset,
    TorchDraws,
    _tensor_plan,
    write_dev_checkpoint,
)
from server.tools.dev_tokenizer import MIN_TEXT_VOCAB_SIZE
from server.tools.export import export_subnet
from server.vocabulary.residency_levels import residency_levels
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet, effective_params

SCALES: dict[str, Preset] = {"e4b": E4B, "small": PRESETS["tiny"], "mini": PRESETS["mini"]}
ENGINE_SUBNETS = ("full", "e3.39b-layer", "e2.98b-block", "e2b")
# In the order they run: what issue 12 asks of a device first, then the rest.
SECTIONS = (
    "smoke", "bandwidth", "decode", "compiled", "kernels", "transformers", "engine", "residency"
)  # fmt: skip
TITLES = {
    "smoke": "0. Smoke: every risky path once, tiny scale, bfloat16, on the device",
    "bandwidth": "1. Copy bandwidth",
    "decode": "2. Batch-1 decode vs the memory-bandwidth floor",
    "compiled": "3. Compiled decode steps (captured CUDA graphs) against eager, batch 1 and mixed",
    "kernels": "4. Kernels in one batch-1 decode step, eager and compiled",
    "transformers": "5. transformers generate() on the same weights",
    "engine": "6. Concurrent mixed-subnet requests through the engine (eager)",
    "residency": "7. Resident FFN widths: shrink to E2B's level and grow back",
}
SMOKE_S = 60.0  # what the smoke needs at most (40 s on an H200, 2026-12-04)
# Compiling one decode bucket (35 layers) and capturing its CUDA graph: a guess until the first
# compile is timed (State.compile_s).
COMPILE_S = 120.0
JSONL, TABLE = "gpu_e4b.jsonl", "gpu_e4b.md"
GB, GIB = 1e9, 1024**3
# The dev tokenizer is sized apart from the model: random weights need only that ids fit, and a
# 262144-entry tokenizer.json is 58 MB and takes tens of seconds to load (each runtime, export).
TOKENIZER_VOCAB = 4096
# Before anything is measured, the pace that time estimates assume (batch-1 tokens/s of the full
# subnet); pessimistic on purpose, replaced by the measured value as soon as there is one.
PACE_GUESS = {"e4b": 10.0, "small": 20.0, "mini": 10.0}


# ---- results -------------------------------------------------------------------------------


class Budget:
    """A wall-clock deadline that every section checks before it starts."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def shortfall(self, need_s: float) -> str | None:
        """None when `need_s` fits in what is left; else the reason to skip."""
        left = self.left()
        if need_s <= left:
            return None
        return f"time budget: needs ~{need_s:.0f} s, {max(0.0, left):.0f} s left"


class Results:
    """Every record, appended to the JSON lines file as it comes; the table is rebuilt from them."""

    def __init__(self, out: Path, budget: Budget):
        self.out = out
        self.budget = budget
        self.records: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / JSONL).write_text("", encoding="utf-8")

    def add(self, section: str, **data: Any) -> dict[str, Any]:
        rec = {"section": section, "t_s": round(self.budget.elapsed(), 2), **data}
        self.records.append(rec)
        with open(self.out / JSONL, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        shown = {k: v for k, v in rec.items() if k not in ("section", "tokens", "trace")}
        print(f"[{rec['t_s']:7.1f}s] {section}: {json.dumps(shown, default=str)}", flush=True)
        return rec

    def skip(self, section: str, reason: str, **data: Any) -> None:
        self.add(section, skipped=reason, **data)

    def write_table(self) -> Path:
        path = self.out / TABLE
        path.write_text(render_table(self.records), encoding="utf-8")
        return path


@dataclass
class State:
    """What later sections reuse from earlier ones."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: Results
    budget: Budget
    rt: ElasticRuntime | None = None
    checkpoint: Path | None = None
    copy_gbps: float | None = None
    pace_tps: float = 10.0  # batch-1 tokens/s of the full subnet (guessed, then measured)
    compile_s: float = COMPILE_S  # one bucket's compile (guessed, then measured)
    write_gbps: float = 0.5  # disk write speed seen while generating (guessed until then)
    ours_tokens: dict[str, list[int]] = field(default_factory=dict)
    ours_tps: dict[str, float] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def guarded(state: State, section: str, run: Callable[[], None]) -> None:
    """Run a section; an exception is recorded (with its trace) and the next section still runs."""
    try:
        run()
    except Exception as e:  # a broken section must not cost the sections after it
        traceback.print_exc()
        state.results.add(
            section,
            skipped=f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            trace=traceback.format_exc(limit=8),
        )
        free_device_memory(state)  # e.g. after an out-of-memory error, for the next section
    finally:
        state.results.write_table()


# ---- 0. smoke ---------------------------------------------------------------------------------


def measure_smoke(state: State) -> None:
    r = state.results
    if reason := state.budget.shortfall(SMOKE_S):
        r.skip("smoke", reason)
        return
    run_smoke(state.device, Path(state.args.work), lambda **rec: r.add("smoke", **rec))


# ---- 1. copy bandwidth ---------------------------------------------------------------------


def measure_bandwidth(state: State) -> None:
    state.copy_gbps = copy_device_to_device(state)
    if state.device.type != "cuda":
        state.results.skip("bandwidth", "no accelerator: not applicable", kind="host to device")
        return
    copy_host_to_device(state)


def copy_device_to_device(state: State) -> float:
    """GB/s of a large copy on the device, counting the bytes read and the bytes written."""
    dev, nbytes = state.device, state.args.copy_mb * 1024**2
    # Random contents (never zeros, which hardware may special-case); float32 for a quick fill.
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    seconds = time_repeated(state, lambda: dst.copy_(src), repeats=state.args.copy_repeats)
    gbps = 2 * nbytes / statistics.median(seconds) / GB
    state.results.add(
        "bandwidth",
        kind=f"{dev.type} to {dev.type} copy (read + write)",
        bytes=nbytes,
        repeats=len(seconds),
        median_s=statistics.median(seconds),
        gbps=gbps,
        best_gbps=2 * nbytes / min(seconds) / GB,
    )
    return gbps


def copy_host_to_device(state: State) -> None:
    """Pinned host memory to the device: the path of resident-width growth and PLE rows."""
    dev, nbytes = state.device, min(state.args.copy_mb, 1024) * 1024**2
    host = torch.empty(nbytes // 4, dtype=torch.float32).normal_().pin_memory()
    dst = torch.empty(host.shape, dtype=host.dtype, device=dev)
    seconds = time_repeated(state, lambda: dst.copy_(host, non_blocking=True), repeats=5)
    state.results.add(
        "bandwidth",
        kind="host to cuda copy (pinned)",
        bytes=nbytes,
        repeats=len(seconds),
        median_s=statistics.median(seconds),
        gbps=nbytes / statistics.median(seconds) / GB,
        best_gbps=nbytes / min(seconds) / GB,
    )


def time_repeated(
    state: State, op: Callable[[], Any], repeats: int, warmup: int = 3
) -> list[float]:
    """Seconds of each of `repeats` runs of `op` after `warmup` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        op()
    state.sync()
    seconds = []
    for _ in range(repeats):
        if state.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            op()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            op()
            seconds.append(time.perf_counter() - t0)
    return seconds


# ---- the checkpoint and the runtime --------------------------------------------------------


def make_checkpoint(state: State) -> None:
    a, r = state.args, state.results
    preset = SCALES[a.scale]
    folder = Path(a.work) / f"{a.scale}-{a.dtype}-seed{a.seed}"
    planned = planned_bytes(preset, state.dtype)
    if (folder / "config.json").is_file():  # written last, by an atomic rename: complete
        state.checkpoint = folder
        r.add("checkpoint", folder=str(folder), bytes=planned, reused=True)
        return
    Path(a.work).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(a.work).free
    if free < planned * 1.1:
        raise RuntimeError(f"{free / GB:.1f} GB free under {a.work}, {planned / GB:.1f} GB needed")
    draws = TorchDraws(state.device, state.dtype, seed=a.seed)
    vocab = max(MIN_TEXT_VOCAB_SIZE, min(TOKENIZER_VOCAB, preset.text_vocab // 2))
    t0 = time.perf_counter()
    write_dev_checkpoint(folder, a.scale, preset, draws, tokenizer_vocab=vocab, progress=False)
    seconds = time.perf_counter() - t0
    state.checkpoint = folder
    state.write_gbps = planned / seconds / GB
    r.add(
        "checkpoint",
        folder=str(folder),
        bytes=planned,
        seconds=seconds,
        gbps=state.write_gbps,
        drawn_on=str(state.device),
        tokenizer_vocab=vocab,
        reused=False,
    )


def planned_bytes(preset: Preset, dtype: torch.dtype) -> int:
    # The plan draws nothing until the writer asks: sizing it is free.
    return sum(t.nbytes for t in _tensor_plan(preset, TorchDraws("cpu", dtype, 0)))


def open_runtime(state: State) -> None:
    assert state.checkpoint is not None
    before = device_bytes(state)
    t0 = time.perf_counter()
    state.rt = ElasticRuntime.open(
        state.checkpoint, dtype=state.args.dtype, device=str(state.device)
    )
    state.sync()
    seconds = time.perf_counter() - t0
    text = state.rt.store.text
    state.results.add(
        "load",
        seconds=seconds,
        device_bytes=device_bytes(state) - before,
        ple_table_bytes=state.rt.weights.ple_table.numel() * state.rt.weights.ple_table.itemsize,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        ffn=text.full_width,
        vocab=text.vocab_size,
        ple=[
            text.vocab_size_per_layer_input,
            text.num_hidden_layers * text.hidden_size_per_layer_input,
        ],
        subnets=len(state.rt.subnets),
    )


def device_bytes(state: State) -> int:
    if state.device.type == "cuda":
        return torch.cuda.memory_allocated(state.device)
    return 0


def free_device_memory(state: State) -> None:
    gc.collect()
    release_cached(state.device)


# ---- 3. batch-1 decode vs the floor ----------------------------------------------------------


def bytes_per_token(state: State, subnet: Subnet) -> int:
    """Weight bytes one decode token reads: effective params plus the LM head (vocab x hidden),
    in the compute dtype. PLE rows (8960 values) and the embedding row are negligible."""
    assert state.rt is not None
    text = state.rt.store.text
    return (subnet.effective_params + text.vocab_size * text.hidden_size) * state.dtype.itemsize


def dead_kv_params(state: State, subnet: Subnet) -> int:
    """Consumer layers' K/V weights: counted in effective params (as Google counts them), never
    read by a decode step; the floor is that much generous."""
    assert state.rt is not None
    text = state.rt.store.text
    return sum(math.prod(s) for i in subnet.layers for s in text.dead_kv_tensor_shapes(i).values())


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [2] + [rng.randrange(107, vocab) for _ in range(n - 1)]


def decode_once(state: State, subnet: Subnet, prompt: list[int], tokens: int) -> dict[str, Any]:
    """One prompt prefilled, then `tokens - 1` greedy decode steps at batch 1, through the
    engine (the one generation path); each step ends with its sampled token on the host."""
    rt = state.rt
    assert rt is not None
    engine = assemble_engine(rt, kv_bytes_for(rt, len(prompt) + tokens + 16))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    state.sync()
    t0 = time.perf_counter()
    engine.add_request("bench", prompt, subnet, params)
    out: list[int] = []
    while not out:
        out.extend(t for o in engine.step() for t in o.token_ids)
    prefill_s = time.perf_counter() - t0
    steps = []
    while engine.has_work:
        t = time.perf_counter()
        out.extend(t for o in engine.step() for t in o.token_ids)
        steps.append(time.perf_counter() - t)
    return {"prefill_s": prefill_s, "steps": steps, "tokens": out}


def measure_decode(state: State) -> None:
    a, r, rt = state.args, state.results, state.rt
    assert rt is not None
    vocab = rt.store.text.vocab_size_per_layer_input
    prompt = prompt_ids(a.prompt_tokens, vocab)
    for name in a.decode_subnets.split(","):
        subnet = rt.subnets[name]
        need = (a.repeats + 1) * (a.decode_tokens / state.pace_tps) * 1.3 + 2
        if reason := state.budget.shortfall(need):
            r.skip("decode", reason, subnet=name)
            continue
        decode_once(state, subnet, prompt, min(4, a.decode_tokens))  # warm-up
        runs = [decode_once(state, subnet, prompt, a.decode_tokens) for _ in range(a.repeats)]
        tpot = statistics.median(s for run in runs for s in run["steps"])
        decode_s = statistics.median(sum(run["steps"]) for run in runs)
        tps = (a.decode_tokens - 1) / decode_s
        per_token = bytes_per_token(state, subnet)
        floor_tps = state.copy_gbps * GB / per_token if state.copy_gbps else None
        if name == "full":
            state.pace_tps = tps
        state.ours_tps[name] = tps
        state.ours_tokens[name] = runs[0]["tokens"]
        r.add(
            "decode",
            subnet=name,
            effective_params=subnet.effective_params,
            dead_kv_params=dead_kv_params(state, subnet),
            bytes_per_token=per_token,
            copy_gbps=state.copy_gbps,
            floor_tps=floor_tps,
            tps=tps,
            fraction=tps / floor_tps if floor_tps else None,
            achieved_gbps=tps * per_token / GB,
            tpot_ms=tpot * 1e3,
            prefill_ms=statistics.median(run["prefill_s"] for run in runs) * 1e3,
            prompt_tokens=len(prompt),
            decode_tokens=a.decode_tokens,
            repeats=a.repeats,
            tokens=runs[0]["tokens"],
        )


# ---- 4. compiled decode steps against eager --------------------------------------------------


def compiled_load(state: State, rows: int) -> list[tuple[str, str, list[int], SamplingParams]]:
    """`rows` requests of one prompt length and one output length, so that every decode step
    holds all of them and reads keys in one context bucket. One row: the full subnet, greedy.
    More: round-robin over the four subnets, every other request sampled (seeded, so that eager
    and compiled can be held against each other token for token)."""
    a, rt = state.args, state.rt
    assert rt is not None
    vocab = rt.store.text.vocab_size_per_layer_input
    load = []
    for i in range(rows):
        greedy = rows == 1 or i % 2 == 0
        params = SamplingParams(
            max_tokens=a.compiled_tokens,
            temperature=0.0 if greedy else 0.8,
            top_p=1.0 if greedy else 0.95,
            top_k=0 if greedy else 64,
            seed=None if greedy else 1000 + i,
            ignore_eos=True,
        )
        subnet = "full" if rows == 1 else ENGINE_SUBNETS[i % len(ENGINE_SUBNETS)]
        load.append((f"c{i}", subnet, prompt_ids(a.prompt_tokens, vocab, seed=100 + i), params))
    return load


def decode_pass(eng, state: State, load, tag: str, profile_step: int | None = None):
    """The load through the engine once: the wall time of each step that decoded every request,
    each request's tokens, the profiler's kernels in one such step (the one after
    `profile_step` of them; not timed), and the errors requests ended with."""
    rt = state.rt
    assert rt is not None
    for rid, subnet, prompt, params in load:
        eng.add_request(f"{tag}-{rid}", prompt, rt.subnets[subnet], params)
    tokens: dict[str, list[int]] = {f"{tag}-{rid}": [] for rid, *_ in load}
    errors: dict[str, int] = {}  # a request's error (e.g. non-finite logits): how many had it
    steps: list[float] = []
    kernels: dict[str, Any] = {}
    decoding = False  # the last step decoded every request: so will this one, until they end
    state.sync()
    while eng.has_work:
        profile = decoding and not kernels and len(steps) == profile_step
        t = time.perf_counter()
        kernels, outs = profiled_step(eng) if profile else (kernels, eng.step())
        dt = time.perf_counter() - t
        s = eng.last_step
        decoding = s.num_seqs == s.num_decodes == len(load)
        if decoding and not profile:
            steps.append(dt)
        for o in outs:
            tokens[o.request_id].extend(o.token_ids)
            if o.error:
                errors[o.error] = errors.get(o.error, 0) + 1
    return steps, [tokens[f"{tag}-{rid}"] for rid, *_ in load], kernels, errors


def measure_compiled(state: State) -> None:
    """The decode step as users get it with `compile: true`, against the eager step, on the same
    requests: batch 1 (full subnet) and a batch of four subnets mixed (greedy and sampled). On
    CUDA the compiled step is inductor's (or --compiled-backend's), replayed as a captured CUDA
    graph, and again uncaptured (what the capture saves); on a CPU, where inductor takes
    minutes, "aot_eager" checks the section's own code, untimed in spirit. The step time is the
    wall time of an engine step that decodes every request (tokens sampled and on the host);
    the floor is the weights those subnets read at least (per layer the widest width) over the
    copy bandwidth; kernels per step from the profiler."""
    a, r, rt = state.args, state.results, state.rt
    assert rt is not None
    cuda = state.device.type == "cuda"
    bandwidth = (state.copy_gbps or math.nan) * GB
    for rows in a.compiled_rows:
        load = compiled_load(state, rows)
        floor_tps = rows * bandwidth / union_bytes(state, sorted({s for _, s, _, _ in load}))
        done: dict[str, dict[str, Any]] = {}
        compiler = a.compiled_backend or ("inductor" if cuda else "aot_eager")
        modes = [("eager", None, False), ("compiled", compiler, cuda)]
        if cuda:
            modes.append(("compiled, uncaptured", compiler, False))
        for mode, backend, capture in modes:
            # two passes (the first compiles and warms), each of prefill + tokens steps, a
            # batched step costing up to a few batch-1 steps
            passes = 2 * (a.compiled_tokens + 2) * (1 + rows / 16) / state.pace_tps
            need = passes + (state.compile_s if backend else 0) + 2
            if reason := state.budget.shortfall(need):
                r.skip("compiled", reason, rows=rows, mode=mode)
                continue
            kv_tokens = rows * (a.prompt_tokens + a.compiled_tokens + 16)
            config = SchedulerConfig(
                max_num_seqs=rows,
                max_num_batched_tokens=max(rows * a.prompt_tokens, a.engine_batched_tokens),
                max_prefill_chunk=a.prompt_tokens,
                max_model_len=rt.store.text.max_position_embeddings,
            )
            eng = assemble_engine(rt, kv_bytes_for(rt, kv_tokens), config, compile_backend=backend)
            if backend:
                eng.runner.graphs.capture = capture
            t0 = time.perf_counter()
            decode_pass(eng, state, load, "warm")  # compiles the bucket (rows, context)
            warm_s = time.perf_counter() - t0
            if backend:
                state.compile_s = warm_s
            steps, tokens, kernels, errors = decode_pass(
                eng, state, load, "timed", profile_step=a.compiled_tokens // 2
            )
            step_s = statistics.median(steps) if steps else math.nan
            done[mode] = r.add(
                "compiled",
                rows=rows,
                mode=mode,
                backend=backend,
                subnets=sorted({s for _, s, _, _ in load}),
                sampled=sum(p.temperature > 0 for *_, p in load),
                steps=len(steps),
                step_ms=step_s * 1e3,
                tps=rows / step_s,
                floor_tps=floor_tps,
                fraction=rows / step_s / floor_tps if state.copy_gbps else None,
                warm_pass_s=warm_s,
                graphs=len(eng.runner.graphs.graphs) if backend else None,
                uncaptured=list(eng.runner.graphs.uncaptured.values()) if capture else None,
                errors=errors,
                tokens=tokens,
                **kernels,
            )
        for mode in [m for m in done if m != "eager"] if "eager" in done else []:
            e, c = done["eager"], done[mode]
            r.add(
                "compiled",
                rows=rows,
                mode=f"{mode} / eager",
                speedup=e["step_ms"] / c["step_ms"],
                requests_equal=sum(x == y for x, y in zip(e["tokens"], c["tokens"], strict=True)),
                requests=rows,
            )
        free_device_memory(state)


# ---- 4. concurrent mixed-subnet requests ---------------------------------------------------


def make_load(state: State, n: int) -> list[tuple[str, str, list[int], int]]:
    """n requests round-robin over the four subnets, fixed pseudo-random lengths (as
    benchmarks/bench_engine.py makes them, with the lengths given on the command line)."""
    a, rt = state.args, state.rt
    assert rt is not None
    vocab = rt.store.text.vocab_size_per_layer_input
    rng = random.Random(n)
    load = []
    for i in range(n):
        length = rng.randint(*a.engine_prompt)
        prompt = [2] + [rng.randrange(107, vocab) for _ in range(length - 1)]
        load.append(
            (
                f"q{i}",
                ENGINE_SUBNETS[i % len(ENGINE_SUBNETS)],
                prompt,
                rng.randint(*a.engine_output),
            )
        )
    return load


def run_engine(state: State, load: Sequence[tuple[str, str, list[int], int]]) -> dict[str, Any]:
    a, rt = state.args, state.rt
    assert rt is not None
    text = rt.store.text
    n = len(load)
    longest = max(len(p) + out for _, _, p, out in load)
    block_size = 16
    blocks = n * -(-longest // block_size) * text.first_kv_shared_layer
    kv_bytes = int(blocks * 1.25 + 64) * KVCache.block_bytes(text, block_size, rt.weights.dtype)
    config = SchedulerConfig(
        max_num_seqs=n,
        max_num_batched_tokens=max(n, a.engine_batched_tokens),
        max_prefill_chunk=a.engine_prefill_chunk,
        max_model_len=text.max_position_embeddings,
    )
    eng = assemble_engine(rt, kv_bytes, config, block_size=block_size)
    for rid, subnet, prompt, out_len in load:
        params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        eng.add_request(rid, prompt, rt.subnets[subnet], params)
    tokens, steps = 0, []
    state.sync()
    t0 = time.perf_counter()
    while eng.has_work:
        for out in eng.step():
            tokens += len(out.token_ids)
        s = eng.last_step
        if s.num_seqs:
            steps.append((s.num_seqs, s.num_decodes, s.seconds, dict(s.subnets), s.ffn_mode))
    state.sync()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "steps": steps, "kv_bytes": kv_bytes}


def union_bytes(state: State, names: Sequence[str]) -> int:
    """Weight bytes a step over these subnets reads at least: per layer, the widest width any of
    them uses there (nested prefixes), plus the LM head."""
    rt = state.rt
    assert rt is not None
    widest: dict[int, int] = {}
    for name in names:
        s = rt.subnets[name]
        for layer, w in zip(s.layers, s.widths, strict=True):
            widest[layer] = max(widest.get(layer, 0), w)
    layers = sorted(widest)
    params = effective_params(rt.store.text, layers, [widest[i] for i in layers])
    text = rt.store.text
    return (params + text.vocab_size * text.hidden_size) * state.dtype.itemsize


def measure_engine(state: State) -> None:
    a, r = state.args, state.results
    assert state.rt is not None
    bandwidth = (state.copy_gbps or math.nan) * GB  # no floor (nan) if the copy failed
    warmed = False
    for n in a.engine_requests:
        load = make_load(state, n)
        out_max, prompt_max = a.engine_output[1], a.engine_prompt[1]
        prefill_steps = -(-n * prompt_max // max(n, a.engine_batched_tokens))
        # a mixed step costs a few batch-1 steps (four FFN groups, more rows); doubled for warm-up
        need = (out_max + prefill_steps) * 3 / state.pace_tps * (1 if warmed else 2) + 3
        if reason := state.budget.shortfall(need):
            r.skip("engine", reason, requests=n)
            continue
        if not warmed:  # first CUDA/BLAS handles and kernels for these shapes stay out of the run
            run_engine(state, make_load(state, 4))
            warmed = True
        res = run_engine(state, load)
        decode_steps = [s for s in res["steps"] if s[1] == s[0]]  # every sequence decoding
        floor_s = sum(union_bytes(state, list(s[3])) / bandwidth for s in decode_steps)
        actual_s = sum(s[2] for s in decode_steps)
        modes: dict[str, int] = {}
        for s in res["steps"]:
            if s[4]:
                modes[s[4]] = modes.get(s[4], 0) + 1
        r.add(
            "engine",
            requests=n,
            subnets=list(ENGINE_SUBNETS),
            prompt_tokens=list(a.engine_prompt),
            output_tokens=list(a.engine_output),
            tokens=res["tokens"],
            seconds=res["seconds"],
            tps=res["tokens"] / res["seconds"],
            steps=len(res["steps"]),
            decode_steps=len(decode_steps),
            decode_step_median_ms=(
                statistics.median(s[2] for s in decode_steps) * 1e3 if decode_steps else None
            ),
            decode_batch_median=(
                statistics.median(s[0] for s in decode_steps) if decode_steps else None
            ),
            decode_floor_fraction=floor_s / actual_s if actual_s and state.copy_gbps else None,
            ffn_modes=modes,
            kv_bytes=res["kv_bytes"],
        )


# ---- 5. kernels in one decode step -----------------------------------------------------------


def measure_kernels(state: State) -> None:
    r, rt = state.results, state.rt
    assert rt is not None
    if reason := state.budget.shortfall(4 / state.pace_tps * 3 + 5):
        r.skip("kernels", reason, mode="eager")
        return
    r.add("kernels", mode="eager", **decode_step_kernels(rt))
    # "compiled paged": attention reads K/V where the cache holds them (FlexAttention), not a
    # gathered copy (decode_graph.py); whether that pays on a device is what this row shows.
    for mode, paged in (("compiled", False), ("compiled paged", True)):
        if state.device.type != "cuda":
            r.skip("kernels", "no accelerator: compiled steps take minutes on a CPU", mode=mode)
            continue
        if reason := state.budget.shortfall(state.compile_s):
            r.skip("kernels", reason, mode=mode)
            continue
        t0 = time.perf_counter()
        counts = decode_step_kernels(rt, compile_backend="inductor", paged_attention=paged)
        r.add("kernels", mode=mode, compile_s=time.perf_counter() - t0, **counts)


# ---- 6. transformers generate() ------------------------------------------------------------


def hf_load(state: State, folder: Path):
    from transformers import AutoConfig, Gemma3nForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    kwargs: dict[str, Any] = {"config": cfg.text_config, "dtype": state.dtype}
    # device_map loads straight onto the device but needs accelerate (the GPU image has it; the
    # CPU venv need not): without it, load on the host and move.
    placed = state.device.type != "cpu" and _has_accelerate()
    if placed:
        kwargs["device_map"] = str(state.device)
    model = Gemma3nForCausalLM.from_pretrained(folder, **kwargs).eval()
    if not placed:
        model = model.to(state.device)
    return model


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def hf_generate(state: State, model, prompt: list[int], tokens: int) -> dict[str, Any]:
    """`generate()` greedy for exactly `tokens` new tokens, timed per token: generate hands each
    token to a streamer as it exists (`.cpu()`, a sync), so the decode steps are timed as ours
    are, without a separate prefill run to subtract."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:  # first the prompt, then each new token
            state.sync()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = TokenClock()
    ids = torch.tensor([prompt], device=state.device)
    with torch.no_grad():
        state.sync()
        out = model.generate(
            ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            # No eos: like our ignore_eos, every token is the argmax (with an eos id, min_new_tokens
            # would mask eos out of the logits and the tokens would no longer be comparable).
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
        )
    t = clock.times
    if len(t) != tokens + 1:
        raise RuntimeError(f"generate() streamed {len(t) - 1} tokens, {tokens} asked")
    steps = [b - a for a, b in itertools.pairwise(t[1:])]
    return {"prefill_s": t[1] - t[0], "steps": steps, "tokens": out[0, len(prompt) :].tolist()}


def measure_transformers(state: State) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    a, r, rt = state.args, state.results, state.rt
    assert rt is not None and state.checkpoint is not None
    prompt = prompt_ids(a.prompt_tokens, rt.store.text.vocab_size_per_layer_input)
    load_gbps = 1.0  # disk and conversion, guessed; measured by the first load
    for name in a.hf_subnets.split(","):
        subnet = rt.subnets[name]
        folder = state.checkpoint
        export_bytes = 0
        if name != "full":
            folder = Path(a.work) / f"{state.checkpoint.name}-export-{name}"
            if not (folder / "config.json").is_file():
                export_bytes = int(planned_bytes_of_export(state, subnet))
        size = folder_bytes(folder) if folder.exists() else export_bytes
        gen_s = (a.repeats + 1) * a.hf_tokens / (state.pace_tps / 2)  # HF assumed 2x slower
        need = export_bytes / (state.write_gbps * GB) + size / (load_gbps * GB) + gen_s + 5
        if reason := state.budget.shortfall(need):
            r.skip("transformers", reason, subnet=name)
            continue
        export_s = None
        if export_bytes:
            if shutil.disk_usage(a.work).free < export_bytes * 1.1:
                r.skip("transformers", "not enough disk for the export", subnet=name)
                continue
            t0 = time.perf_counter()
            export_subnet(rt.store, subnet, folder, progress=False)
            export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = hf_load(state, folder)
        state.sync()
        load_s = time.perf_counter() - t0
        load_gbps = folder_bytes(folder) / load_s / GB
        hf_generate(state, model, prompt, min(4, a.hf_tokens))  # warm-up
        runs = [hf_generate(state, model, prompt, a.hf_tokens) for _ in range(a.repeats)]
        tps = (a.hf_tokens - 1) / statistics.median(sum(run["steps"]) for run in runs)
        prefill_s = statistics.median(run["prefill_s"] for run in runs)
        tokens = runs[0]["tokens"]
        ours = state.ours_tokens.get(name, [])
        agree = next(
            (i for i, (x, y) in enumerate(zip(ours, tokens, strict=False)) if x != y),
            min(len(ours), len(tokens)),
        )
        r.add(
            "transformers",
            subnet=name,
            folder=str(folder),
            export_s=export_s,
            load_s=load_s,
            prefill_ms=prefill_s * 1e3,
            tps=tps,
            tpot_ms=statistics.median(x for run in runs for x in run["steps"]) * 1e3,
            ours_tps=state.ours_tps.get(name),
            ours_over_hf=state.ours_tps[name] / tps if name in state.ours_tps else None,
            greedy_agree=agree if ours else None,
            greedy_compared=min(len(ours), len(tokens)) if ours else None,
            tokens=tokens,
            hf_tokens=a.hf_tokens,
            transformers=transformers.__version__,
        )
        del model
        free_device_memory(state)


def planned_bytes_of_export(state: State, subnet: Subnet) -> float:
    """About what `export_subnet` writes: the checkpoint less the dropped layers and FFN rows."""
    rt = state.rt
    assert rt is not None and state.checkpoint is not None
    text = rt.store.text
    full = folder_bytes(state.checkpoint)
    dropped = (rt.subnets["full"].effective_params - subnet.effective_params) * state.dtype.itemsize
    ple = rt.weights.ple_table.numel() * rt.weights.ple_table.itemsize
    kept = len(subnet.layers) / text.num_hidden_layers
    return full - dropped - ple * (1 - kept)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ---- 2. resident widths --------------------------------------------------------------------


def measure_residency(state: State) -> None:
    a, r, rt = state.args, state.results, state.rt
    assert rt is not None
    w = rt.weights
    e2b = rt.subnets["e2b"]
    full_widths = w.residency.full
    levels = residency_levels(
        full_widths, [(s.layers, s.widths, s.effective_params) for s in rt.subnets]
    )
    target = next(
        lv for lv in levels if all(w <= lv[i] for i, w in zip(e2b.layers, e2b.widths, strict=True))
    )
    grow_bytes = w.residency.bytes_for(full_widths) - w.residency.bytes_for(target)
    need = grow_bytes / (5 * GB) + 2 * 4 / state.pace_tps + 5
    if reason := state.budget.shortfall(need):
        r.skip("residency", reason)
        return
    dev = str(state.device)
    try:
        probe = make_probe(
            "auto",
            dev,
            128 * GIB,
            device_uuid=lambda: device_uuid(dev),
            allocator=lambda: allocator_bytes(dev),
        )
        probe_source = probe.source
    except Exception as e:  # a probe that fails to start is reported, the timing still runs
        probe, probe_source = None, f"none ({type(e).__name__}: {e})"

    def snapshot(label: str, seconds=None, report=None, check=None, **extra) -> None:
        snap = probe.read() if probe is not None else None
        r.add(
            "residency",
            step=label,
            seconds=seconds,
            moved_bytes=(report.uploaded_bytes or report.released_bytes) if report else None,
            gbps=(report.uploaded_bytes / seconds / GB)
            if report and seconds and report.uploaded_bytes
            else None,
            resident_bytes=w.residency.resident_bytes,
            device_allocated=device_bytes(state),
            probe=probe_source,
            probe_free_bytes=snap.free_bytes if snap else None,
            probe_used_bytes=snap.used_bytes if snap else None,
            process_bytes=snap.process_bytes if snap else None,
            decode_check=check,
            **extra,
        )

    prompt = prompt_ids(a.prompt_tokens, rt.store.text.vocab_size_per_layer_input)
    for subnet in (e2b, rt.subnets["full"]):  # what each decodes at full widths, to compare
        if subnet.name not in state.ours_tokens:
            state.ours_tokens[subnet.name] = decode_once(state, subnet, prompt, 4)["tokens"]
    free_device_memory(state)
    snapshot("before (full widths resident)")
    t0 = time.perf_counter()
    report = w.resize_ffn(target)  # layer by layer, on the main stream
    state.sync()
    shrink_s = time.perf_counter() - t0
    snapshot("shrink to E2B's level (freed rows still cached)", shrink_s, report)
    t0 = time.perf_counter()
    w.release_cached()
    snapshot("after release_cached (the rows back to the device)", time.perf_counter() - t0)
    check = decode_check(state, e2b, prompt)
    # Grow as elasticity does: built whole in the background (side stream), then committed.
    predicted = w.transient_bytes(full_widths)
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    base = device_bytes(state)
    t0 = time.perf_counter()
    pending = w.prepare_ffn(full_widths, background=True)
    during = decode_once(state, e2b, prompt, 4)["tokens"]  # steps go on meanwhile
    if pending.thread is not None:
        pending.thread.join()
    build_s = time.perf_counter() - t0
    if pending.error is not None:
        raise pending.error
    report = w.commit_ffn(pending)
    state.sync()
    grow_s = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated(state.device) - base
        if state.device.type == "cuda"
        else None
    )
    snapshot(
        "grow back to full (background build + commit)",
        grow_s,
        report,
        check=decode_check(state, rt.subnets["full"], prompt),
        build_s=build_s,
        peak_extra_bytes=peak,
        predicted_peak_bytes=predicted,
        decode_during_build=during == state.ours_tokens.get("e2b", during)[: len(during)],
        shrink_check=check,
    )
    w.release_cached()
    snapshot("after release_cached")


def decode_check(state: State, subnet: Subnet, prompt: list[int]) -> str:
    """After a resize the subnet must still decode what it decoded before (same rows)."""
    before = state.ours_tokens.get(subnet.name)
    tokens = decode_once(state, subnet, prompt, min(4, len(before) if before else 4))["tokens"]
    if before is None:
        return f"ran {len(tokens)} tokens (none earlier to compare)"
    same = tokens == before[: len(tokens)]
    return f"{len(tokens)} greedy tokens {'equal to' if same else 'DIFFER from'} before"


# ---- the table -----------------------------------------------------------------------------


def _num(x: Any, fmt: str = ".1f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x / scale, fmt)


# Per section: the table's columns, and how one record fills them.
def _detail(r: dict[str, Any]) -> str:
    hidden = ("section", "t_s", "check", "ok", "seconds", "trace")
    return "; ".join(f"{k} {v}" for k, v in r.items() if k not in hidden).replace("|", "/")


COLUMNS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], tuple[str, ...]]]] = {
    "smoke": (
        ("check", "ok", "seconds", "what it saw"),
        lambda r: (
            r["check"],
            "yes" if r.get("ok") else "NO",
            _num(r["seconds"], ".2f"),
            _detail(r),
        ),
    ),
    "compiled": (
        (
            "rows",
            "step",
            "subnets (sampled rows)",
            "step ms (median)",
            "tok/s",
            "floor tok/s",
            "of floor",
            "kernels / launches / graph launches",
            "first pass s (compile)",
            "against eager; errors",
        ),
        lambda r: (
            str(r["rows"]),
            r["mode"] + (f" ({r['backend']})" if r.get("backend") else ""),
            f"{len(r['subnets'])} ({r['sampled']})" if "subnets" in r else "-",
            _num(r.get("step_ms"), ".2f"),
            _num(r.get("tps")),
            _num(r.get("floor_tps")),
            _num(r.get("fraction"), ".1%"),
            " / ".join(str(r.get(k, "-")) for k in ("kernels", "launches", "graph_launches"))
            if "kernels" in r
            else f"{r['operators']} operators"
            if "operators" in r
            else "-",
            _num(r.get("warm_pass_s")),
            f"{_num(r['speedup'], '.2f')}x eager's speed; {r['requests_equal']} of {r['requests']} "
            "requests' tokens equal"
            if "speedup" in r
            else "; ".join(
                [f"{n} ended: {e}" for e, n in (r.get("errors") or {}).items()]
                + [f"uncaptured: {u}" for u in r.get("uncaptured") or []]
            )
            or "-",
        ),
    ),
    "kernels": (
        (
            "decode step (batch 1, full)",
            "CUDA kernels / CPU operators",
            "launches",
            "graph launches",
            "step ms",
            "compile s",
        ),
        lambda r: (
            r["mode"],
            str(r.get("kernels", r.get("operators", "-"))),
            str(r.get("launches", "-")),
            str(r.get("graph_launches", "-")),
            _num(r.get("step_ms")),
            _num(r.get("compile_s")),
        ),
    ),
    "bandwidth": (
        ("copy", "MiB", "median s", "GB/s (median)", "GB/s (best)"),
        lambda r: (
            r["kind"],
            _num(r["bytes"], ".0f", 1024**2),
            _num(r["median_s"], ".5f"),
            _num(r["gbps"]),
            _num(r["best_gbps"]),
        ),
    ),
    "decode": (
        (
            "subnet",
            "effective params (B)",
            "GB/token",
            "floor tok/s",
            "measured tok/s",
            "of floor",
            "achieved GB/s",
            "TPOT ms",
            "prefill ms",
        ),
        lambda r: (
            r["subnet"],
            _num(r["effective_params"], ".3f", 1e9),
            _num(r["bytes_per_token"], ".3f", GB),
            _num(r["floor_tps"]),
            _num(r["tps"]),
            _num(r["fraction"], ".1%"),
            _num(r["achieved_gbps"]),
            _num(r["tpot_ms"], ".2f"),
            _num(r["prefill_ms"]),
        ),
    ),
    "engine": (
        (
            "requests",
            "output tokens",
            "seconds",
            "tok/s",
            "steps",
            "decode step ms (median)",
            "decode batch (median)",
            "decode steps vs weight floor",
            "FFN modes (mixed steps)",
        ),
        lambda r: (
            str(r["requests"]),
            str(r["tokens"]),
            _num(r["seconds"], ".2f"),
            _num(r["tps"]),
            str(r["steps"]),
            _num(r["decode_step_median_ms"], ".2f"),
            _num(r["decode_batch_median"], ".0f"),
            _num(r["decode_floor_fraction"], ".1%"),
            ", ".join(f"{m} {n}" for m, n in sorted(r["ffn_modes"].items())) or "-",
        ),
    ),
    "transformers": (
        (
            "subnet",
            "export s",
            "load s",
            "HF tok/s",
            "HF TPOT ms",
            "ours tok/s",
            "ours / HF",
            "HF prefill ms",
            "greedy tokens equal to ours",
        ),
        lambda r: (
            r["subnet"],
            _num(r["export_s"]),
            _num(r["load_s"]),
            _num(r["tps"]),
            _num(r["tpot_ms"], ".2f"),
            _num(r["ours_tps"]),
            _num(r["ours_over_hf"], ".2f"),
            _num(r["prefill_ms"]),
            "-" if r["greedy_agree"] is None else f"{r['greedy_agree']} of {r['greedy_compared']}",
        ),
    ),
    "residency": (
        (
            "step",
            "seconds",
            "GiB moved",
            "GB/s",
            "resident FFN GiB",
            "allocated GiB",
            "free GiB (probe)",
            "peak extra GiB (budgeted)",
            "decode after",
        ),
        lambda r: (
            r["step"],
            _num(r["seconds"], ".3f"),
            _num(r["moved_bytes"], ".2f", GIB),
            _num(r["gbps"]),
            _num(r["resident_bytes"], ".2f", GIB),
            _num(r["device_allocated"], ".2f", GIB),
            f"{_num(r['probe_free_bytes'], '.2f', GIB)} ({r['probe']})",
            f"{_num(r.get('peak_extra_bytes'), '.2f', GIB)} "
            f"({_num(r.get('predicted_peak_bytes'), '.2f', GIB)})",
            r["decode_check"] or "-",
        ),
    ),
}


def _skipped_what(r: dict[str, Any]) -> str:
    """What a skipped record would have measured, as its section names it."""
    what = r.get("subnet") or r.get("requests") or r.get("kind") or r.get("mode") or ""
    return f"{r['rows']} rows, {what}" if "rows" in r else str(what)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_table(records: list[dict[str, Any]]) -> str:
    def of(section: str) -> list[dict[str, Any]]:
        return [r for r in records if r["section"] == section]

    env = next(iter(of("environment")), {})
    lines = [
        "# Concentric at E4B's sizes: measurements on one accelerator",
        "",
        f"Scale `{env.get('scale')}`, {env.get('dtype')} on {env.get('device_name')}; torch "
        f"{env.get('torch')} (CUDA {env.get('cuda')}), transformers {env.get('transformers')}, "
        f"python {env.get('python')}; time budget {env.get('time_budget_s')} s. Random weights "
        "in the real layout (benchmarks/gpu_e4b.py); eager PyTorch except the compiled steps "
        "of sections 3 and 4.",
        "",
    ]
    if "skipped" in env:
        lines.append(f"- environment: skipped: {env['skipped']}")
    for rec in of("checkpoint") + of("load"):
        if "skipped" in rec:
            lines.append(f"- {rec['section']}: skipped: {rec['skipped']}")
        elif rec["section"] == "checkpoint":
            how = (
                "reused from an earlier run"
                if rec["reused"]
                else f"drawn on {rec['drawn_on']} and written in {_num(rec['seconds'])} s "
                f"({_num(rec['gbps'], '.2f')} GB/s)"
            )
            lines.append(f"- checkpoint: {_num(rec['bytes'], '.2f', GB)} GB, {how}")
        else:
            lines.append(
                f"- runtime opened in {_num(rec['seconds'])} s: "
                f"{_num(rec['device_bytes'], '.2f', GIB)} GiB on the device, PLE table "
                f"{_num(rec['ple_table_bytes'], '.2f', GIB)} GiB in host memory; "
                f"{rec['layers']} layers, hidden {rec['hidden']}, FFN {rec['ffn']}, vocab "
                f"{rec['vocab']}, PLE {rec['ple'][0]}x{rec['ple'][1]}"
            )
    lines.append("")
    for section in SECTIONS:
        lines += [f"## {TITLES[section]}", ""]
        header, fill = COLUMNS[section]
        done = [r for r in of(section) if "skipped" not in r]
        table = [_row(header), _row(["---"] * len(header))] + [_row(fill(r)) for r in done]
        skipped = [
            f"- {f'{what}: ' if what else ''}skipped: {r['skipped']}"
            for r in of(section)
            if "skipped" in r
            for what in [_skipped_what(r)]
        ]
        if not of(section):
            skipped.append("- skipped: not reached (the run ended before this section)")
        for block in (table if done else [], skipped):
            if block:
                lines += [*block, ""]
    lines += [
        "Floor: tok/s = copy bandwidth / bytes of weights one token reads: the subnet's effective "
        "params plus the vocab x hidden LM head, in the compute dtype (effective params include "
        "the consumer layers' unused K/V weights, as Google counts them, so the floor is slightly "
        "generous; KV reads are left out). In the engine, each pure decode step is held against "
        "the weights of the subnets in it (per layer, the widest width any of them uses).",
        "",
    ]
    finished = of("done")
    if finished:
        lines.append(f"Finished in {finished[-1]['t_s']:.0f} s.")
    else:
        lines.append("(Run in progress or cut short: this table holds what was measured.)")
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", choices=list(SCALES), default="e4b")
    ap.add_argument("--device", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out")
    ap.add_argument("--work", help="checkpoint and export folder (default /tmp/concentric-gpu)")
    ap.add_argument("--time-budget-s", type=float, default=420.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-mb", type=int, help="bytes per copy (default 4096 on cuda, else 256)")
    ap.add_argument("--copy-repeats", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, help="default 64 at e4b, else 16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decode-subnets", default="full,e2b")
    ap.add_argument("--compiled-rows", default="1,32", help="batch sizes of section 3")
    ap.add_argument("--compiled-backend", help="section 3's (default inductor; CPU: aot_eager)")
    ap.add_argument(
        "--compiled-tokens", type=int, help="tokens per request (default 24 at e4b, else 6)"
    )
    ap.add_argument("--engine-requests", default="16,64")
    ap.add_argument("--engine-prompt", default="24:96", help="prompt lengths, min:max")
    ap.add_argument("--engine-output", help="output lengths, min:max (default 32:128 at e4b)")
    ap.add_argument("--engine-batched-tokens", type=int, help="token budget per step")
    ap.add_argument("--engine-prefill-chunk", type=int, help="prompt tokens per request per step")
    ap.add_argument("--hf-subnets", default="full")
    ap.add_argument("--hf-tokens", type=int, help="default: --decode-tokens")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {SECTIONS}")
    a = ap.parse_args(argv)
    big = a.scale == "e4b"
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.work = a.work or "/tmp/concentric-gpu"
    a.copy_mb = a.copy_mb or (4096 if a.device == "cuda" else 256)
    a.decode_tokens = a.decode_tokens or (64 if big else 16)
    a.hf_tokens = a.hf_tokens or a.decode_tokens
    a.engine_requests = [int(n) for n in a.engine_requests.split(",") if n]
    a.compiled_rows = [int(n) for n in a.compiled_rows.split(",") if n]
    a.compiled_tokens = a.compiled_tokens or (24 if big else 6)
    a.engine_prompt = _span(a.engine_prompt)
    a.engine_output = _span(a.engine_output or ("16:64" if big else "4:12"))
    on_gpu = a.device == "cuda"
    a.engine_batched_tokens = a.engine_batched_tokens or (2048 if on_gpu else 256)
    a.engine_prefill_chunk = a.engine_prefill_chunk or (512 if on_gpu else 128)
    a.skip = {s for s in a.skip.split(",") if s}
    if unknown := a.skip - (set(SECTIONS) - {"bandwidth"}):
        ap.error(f"--skip: unknown sections {sorted(unknown)}")
    if a.decode_tokens < 2 or a.hf_tokens < 2:
        ap.error("--decode-tokens and --hf-tokens must be at least 2")
    return a


def _span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad length range {text!r}")
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        torch.set_num_threads(a.threads)
    budget = Budget(a.time_budget_s)
    results = Results(Path(a.out), budget)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        results.add("environment", skipped="--device cuda but CUDA is not available")
        results.write_table()
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    state = State(a, device, dtype, results, budget, pace_tps=PACE_GUESS[a.scale])
    import transformers

    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    results.add(
        "environment",
        scale=a.scale,
        dtype=a.dtype,
        device=a.device,
        device_name=props.name if props else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        device_memory=props.total_memory if props else None,
        multiprocessors=props.multi_processor_count if props else None,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        time_budget_s=a.time_budget_s,
        argv=sys.argv[1:] if argv is None else list(argv),
    )

    if "smoke" in a.skip:
        results.skip("smoke", "--skip")
    else:
        guarded(state, "smoke", lambda: measure_smoke(state))
    guarded(state, "bandwidth", lambda: measure_bandwidth(state))
    guarded(state, "checkpoint", lambda: make_checkpoint(state))
    if state.checkpoint is not None:
        guarded(state, "load", lambda: open_runtime(state))
    sections: list[tuple[str, Callable[[State], None]]] = [
        ("decode", measure_decode),
        ("compiled", measure_compiled),
        ("kernels", measure_kernels),
        ("transformers", measure_transformers),
        ("engine", measure_engine),
        ("residency", measure_residency),
    ]
    for name, run in sections:
        if state.rt is None:
            results.skip(name, "no runtime (the checkpoint or its loading failed; see above)")
        elif name in a.skip:
            results.skip(name, "--skip")
        else:
            guarded(state, name, lambda run=run: run(state))
    results.add("done", seconds=budget.elapsed())
    table = results.write_table()
    print("\n" + table.read_text(encoding="utf-8"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
