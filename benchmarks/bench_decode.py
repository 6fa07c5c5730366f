"""Decode-step benchmark: ops per step, and decode speed eager vs compiled vs transformers.

For each dev preset given (default: tiny, mini, bench; float32; made on first use), in one run:

- aten ops dispatched per batch-1 decode step (a TorchDispatchMode around one step): our engine
  step eager, our engine step compiled, and transformers' `generate()` (ops of 9 new tokens minus
  ops of 1, over 8);
- batch-1 greedy decode tok/s through our engine, eager and compiled (torch.compile, inductor;
  compiled once per bucket before timing), and transformers `generate()` on the same checkpoint
  (the full subnet);
- the read floor: bytes a batch-1 decode step must read (every weight the full subnet uses once,
  the LM head included, the per-layer-embedding table excepted: only its rows are gathered) over
  the measured bandwidth of a plain read of the same kind of memory as the weights (huge pages,
  as a server places them by default: configs/server.yaml's huge_pages), and our tok/s as a
  share of it: --floor-pairs compiled runs, each followed at once by a plain read, and the median
  of the pairs' shares (this VM's bandwidth moves by up to 1.9x between runs and by tens of
  percent within one, so a step and a read timed minutes apart do not compare);
- the compiled batch-1 step with a sampled request (top_k 64, top_p 0.95: Gemma 3n's defaults,
  seeded) vs a greedy one, and vs the same sampled request drawn through the sampler's general
  path (its one-pass `_top_k_pick` off), timed alternately in --floor-pairs rounds, and the ops
  around the graph in a sampled step either way;
- the compiled batch-1 step with its weights in huge pages vs in the checkpoint's 4 KiB
  page-cache pages (huge_pages: false), timed alternately in --floor-pairs pairs, and a plain
  read of each kind of memory;
- the compiled batch-1 step as served, replayed from its recorded kernel calls
  (kernel_recording.py), vs the same graph through dynamo's code and inductor's Python wrapper,
  timed alternately in --floor-pairs pairs;
- where the share goes: the compiled batch-1 step timed in parts (time_split: inductor's kernels,
  its external calls, the rest of the graph call: the replay's loop and input copies, or where
  the step is not recorded inductor's Python wrapper; the engine's host work outside the graph;
  and the kernels' own read rate against a plain read), and the step at 1 thread vs at all of
  them, timed alternately in --floor-pairs pairs, each with a plain read at the same thread count
  right after it: each count's share of its own read. A share lost as threads are added is lost
  to whatever does not speed up with them: the serial Python around the kernels (wrapper, host)
  as much as the kernels' parallel overhead; the parts tell them apart;
- 16 and 32 concurrent requests spread over several subnets, through our engine (eager and
  compiled) and through transformers one request at a time (tok/s of generated tokens);
- with --paged, batch-1 compiled decode again with paged attention (K/V read where the cache
  holds them, FlexAttention, rather than gathered: decode_graph.py), in the benchmark's
  request-sized KV pool and in a server's default one (configs/server.yaml, 256 MiB): the CPU
  kernel's work grows with the pool it is given.

Timings are medians over --repeats runs on whatever machine runs this; ratios are measured side
by side in the same run. Compiling takes minutes per graph on a CPU; it is excluded from timings
(and reported).

OpenMP runs with its defaults, as a server does. (This script used to set OMP_WAIT_POLICY=PASSIVE,
as the test suite does to keep live servers' threads from spinning against each other: then every
parallel op wakes sleeping threads, which dominates a tiny-preset step at 2 threads. Its
tiny-preset numbers before 2026-12-02 carry that.)

    python benchmarks/bench_decode.py [--presets tiny,mini,bench] [--mixed-presets bench]
        [--tokens 32] [--repeats 3] [--paged]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import time

import torch
from torch._inductor.codecache import PyCodeCache
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import GenerationRequest
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.runtime.huge_pages import HugePageArena
from server.tools.dev_model import dev_model_cache
from server.vocabulary.sampling_params import SamplingParams

MIX = ["full", "e2b", "e2.98b-layer", "mix-0.75", "skip-3-7", "e3.79b-layer"]


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def prompt_of(n: int, seed: int = 0) -> list[int]:
    return [2] + [107 + (seed * 7919 + i * 37) % 300 for i in range(n - 1)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


SERVER_KV_BYTES = 256 * 1024 * 1024  # configs/server.yaml's kv_cache_bytes


def engine(rt: ElasticRuntime, compiled: bool, seqs: int = 1, paged: bool = False, budget=None):
    config = SchedulerConfig(
        max_num_seqs=max(seqs, 1), max_num_batched_tokens=max(256, seqs),
        max_model_len=rt.store.text.max_position_embeddings,
    )  # fmt: skip
    budget = budget or kv_bytes_for(rt, seqs * 256)
    return assemble_engine(
        rt, budget, config, ffn_mode="auto", compile_backend="inductor" if compiled else None,
        paged_attention=paged,
    )  # fmt: skip


def count_outside_graphs(eng) -> None:
    """Compiled graphs run with the op counter switched off: what is counted is what the step
    dispatches around them (each graph is one call; inductor runs its kernels directly)."""
    graphs = eng.runner.graphs
    for shape, (spec, fn) in list(graphs.graphs.items()):

        @functools.wraps(fn)  # keeps a recorded step's `.recording` (time_split times its calls)
        def outside(*args, fn=fn):
            with _disable_current_modes():
                return fn(*args)

        graphs.graphs[shape] = (spec, outside)


def sampled(n: int) -> SamplingParams:
    """Gemma 3n's generation_config defaults (top_k 64, top_p 0.95, temperature 1), seeded."""
    return SamplingParams(max_tokens=n, top_k=64, top_p=0.95, seed=0, ignore_eos=True)


def decode_tps(
    eng, rt, prompt: list[int], tokens: int, count: bool = True, params=greedy
) -> tuple[float, int, list[int]]:
    """(batch-1 decode tok/s after the first token, ops of one decode step, the tokens), the
    request's sampling parameters made by `params` (greedy). Warm-ups pass count=False: a graph
    must not be first run under the op counter (it would not compile)."""
    eng.add_request("bench", prompt, rt.subnets.full, params(tokens))
    out: list[int] = []

    def step() -> None:
        for o in eng.step():
            if o.error:  # else the loops below would wait for tokens that never come
                raise RuntimeError(f"the benchmark's request failed: {o.error}")
            out.extend(o.token_ids)

    while not out:
        step()
    ops = OpCount()
    if count:
        with ops:
            step()
    else:
        step()
    t0, n = time.perf_counter(), 1
    while eng.has_work:
        step()
        n += 1
    return (n - 1) / (time.perf_counter() - t0), ops.n, out


def many(eng, rt, n: int, tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    # Equal prompt lengths, so most decode steps hold every request (fewer buckets to compile).
    requests = [
        GenerationRequest(rt.subnets[MIX[i % len(MIX)]], prompt_of(28, i), greedy(tokens))
        for i in range(n)
    ]
    t0 = time.perf_counter()
    out = offline.generate(eng, requests)
    tps = sum(len(g.token_ids) for g in out) / (time.perf_counter() - t0)
    return tps, [tuple(g.token_ids) for g in out]


def hf_model(folder):
    from transformers import AutoConfig, Gemma3nForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    return Gemma3nForCausalLM.from_pretrained(folder, config=cfg.text_config, dtype=torch.float32)


def hf_generate(model, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt])
    kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        return time.perf_counter() - t0


def hf_decode_tps(model, prompt: list[int], tokens: int) -> float:
    first = hf_generate(model, prompt, 1)
    return (tokens - 1) / (hf_generate(model, prompt, tokens) - first)


def hf_ops_per_step(model, prompt: list[int]) -> float:
    counts = []
    for tokens in (1, 9):
        c = OpCount()
        with c:
            hf_generate(model, prompt, tokens)
        counts.append(c.n)
    return (counts[1] - counts[0]) / 8


def floor_bytes(rt: ElasticRuntime) -> int:
    """Bytes one batch-1 step reads: every weight the full subnet uses, once."""
    w = rt.weights
    skip = {w.ple_table.data_ptr()}
    total = w.lm_head.nbytes + sum(p.nbytes for p in w.altup_projections + w.altup_unembed)
    total += w.ple_model_projection.nbytes
    for layer in w.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor) and t.data_ptr() not in skip:
                total += t.nbytes
    return total


def pages_side_by_side(rt: ElasticRuntime, compiled, prompt: list[int], args, want) -> None:
    """The compiled batch-1 step over the same checkpoint with its weights in the checkpoint's
    4 KiB page-cache pages, timed alternately with the huge-page one (same graph: from the
    FX-graph cache)."""
    med = statistics.median
    rt4k = ElasticRuntime.open(rt.store.folder, dtype="float32", huge_pages=False)
    c4k = engine(rt4k, True)
    decode_tps(c4k, rt4k, prompt, args.tokens, count=False)
    rows = []
    for i in range(args.floor_pairs):
        order = [(compiled, rt), (c4k, rt4k)] if i % 2 == 0 else [(c4k, rt4k), (compiled, rt)]
        got = {id(r): decode_tps(eng, r, prompt, args.tokens, count=False) for eng, r in order}
        rows.append((got[id(rt)], got[id(rt4k)], plain_read_gbs(True), plain_read_gbs(False)))
    ratios = [h[0] / s[0] for h, s, _, _ in rows]
    huge_tps, small_tps = med(h[0] for h, *_ in rows), med(s[0] for _, s, *_ in rows)
    huge_gbs, small_gbs = med(r[2] for r in rows), med(r[3] for r in rows)
    same = all(h[2] == want and s[2] == want for h, s, *_ in rows)
    print(f"compiled batch-1 tok/s, weights in huge pages vs 4 KiB pages ({len(rows)} pairs, "
          f"alternated): {huge_tps:.1f} vs {small_tps:.1f}, median pair {med(ratios):.2f}x "
          f"(pairs {' '.join(f'{x:.2f}' for x in ratios)}); plain read {huge_gbs:.1f} vs "
          f"{small_gbs:.1f} GB/s; greedy tokens are eager's: {same}")  # fmt: skip


def recorded_side_by_side(rt: ElasticRuntime, compiled, prompt: list[int], args, want) -> None:
    """The compiled batch-1 step replayed from its recorded kernel calls (as served:
    kernel_recording.py) vs the same graph called through dynamo's code and inductor's Python
    wrapper (`capture` off), timed alternately in --floor-pairs pairs."""
    med = statistics.median
    direct = engine(rt, True)
    direct.runner.graphs.capture = False
    decode_tps(direct, rt, prompt, args.tokens, count=False)
    why = "; ".join(sorted(set(compiled.runner.graphs.uncaptured.values())))
    rows = []
    for i in range(args.floor_pairs):
        order = [compiled, direct] if i % 2 == 0 else [direct, compiled]
        got = {id(eng): decode_tps(eng, rt, prompt, args.tokens, count=False) for eng in order}
        rows.append((got[id(compiled)], got[id(direct)]))
    ratios = [r[0] / d[0] for r, d in rows]
    same = all(r[2] == want and d[2] == want for r, d in rows)
    print(f"compiled batch-1 tok/s, replayed from its recording vs through inductor's wrapper "
          f"({len(rows)} pairs, alternated): {med(r[0] for r, _ in rows):.1f} vs "
          f"{med(d[0] for _, d in rows):.1f}, median pair {med(ratios):.2f}x (pairs "
          f"{' '.join(f'{x:.2f}' for x in ratios)}); "
          + (f"NOT RECORDED: {why}; " if why else "")
          + f"greedy tokens are eager's: {same}")  # fmt: skip


def sampled_side_by_side(rt: ElasticRuntime, compiled, prompt: list[int], args, want) -> None:
    """The compiled batch-1 step with a sampled request (`sampled`: top-k and top-p over the
    whole vocabulary each step) vs a greedy one, and vs the sampled request drawn through the
    sampler's general path (its one-pass `_top_k_pick` off), timed alternately in --floor-pairs
    rounds; the ops dispatched around the graph in a sampled step either way; whether the seeded
    draws repeat and are the same either way."""
    med = statistics.median
    sampler = compiled.runner.sampler
    one_pass = sampler._top_k_pick

    def general(n: int) -> SamplingParams:  # a marker: `sampled`, through the general path
        return sampled(n)

    def run(kind, count: bool = False):
        sampler._top_k_pick = None if kind is general else one_pass
        try:
            return decode_tps(compiled, rt, prompt, args.tokens, count, kind)
        finally:
            sampler._top_k_pick = one_pass

    kinds = [greedy, sampled, general]
    ops = {}
    for kind in kinds[1:]:
        run(kind)
        ops[kind] = run(kind, count=True)[1]
    rows = []
    for i in range(args.floor_pairs):
        got = {k: run(k) for k in (kinds if i % 2 == 0 else reversed(kinds))}
        rows.append(got)
    tps = {k: med(r[k][0] for r in rows) for k in kinds}
    vs_greedy = [r[sampled][0] / r[greedy][0] for r in rows]
    vs_general = [r[sampled][0] / r[general][0] for r in rows]
    draws = {tuple(r[k][2]) for r in rows for k in (sampled, general)}
    print(f"compiled batch-1 tok/s, sampled (top_k 64, top_p 0.95, seeded) vs greedy vs sampled "
          f"through the sampler's general path ({len(rows)} rounds, alternated): "
          f"{tps[sampled]:.1f} vs {tps[greedy]:.1f} vs {tps[general]:.1f}; sampled/greedy median "
          f"{med(vs_greedy):.2f}x (rounds {' '.join(f'{x:.2f}' for x in vs_greedy)}); one pass/"
          f"general path median {med(vs_general):.2f}x (rounds "
          f"{' '.join(f'{x:.2f}' for x in vs_general)}); ops around the graph in a sampled "
          f"step: {ops[sampled]} (general path {ops[general]}); seeded draws repeat, the same "
          f"either way: {len(draws) == 1}; greedy tokens are eager's: "
          f"{all(r[greedy][2] == want for r in rows)}")  # fmt: skip


def threads_side_by_side(rt: ElasticRuntime, compiled, prompt: list[int], args, want) -> None:
    """The compiled batch-1 step and a plain read at 1 thread and at all of them, alternated."""
    med, nbytes, most = statistics.median, floor_bytes(rt), torch.get_num_threads()
    counts = (1, most)
    rows: dict[int, list[tuple[float, float, bool]]] = {n: [] for n in counts}
    try:
        for i in range(args.floor_pairs):
            for n in counts if i % 2 == 0 else reversed(counts):
                torch.set_num_threads(n)
                tps, _, got = decode_tps(compiled, rt, prompt, args.tokens, count=False)
                rows[n].append((tps, plain_read_gbs(rt.weights.arena is not None), got == want))
    finally:
        torch.set_num_threads(most)
    parts = []
    for n in counts:
        share = med(100 * tps * nbytes / (g * 1e9) for tps, g, _ in rows[n])
        tps, gbs = med(r[0] for r in rows[n]), med(r[1] for r in rows[n])
        parts.append(f"{n} thread{'s' * (n > 1)}: {tps:.1f} tok/s, plain read {gbs:.1f} GB/s, "
                     f"median pair share {share:.0f}%")  # fmt: skip
    same = all(r[2] for n in counts for r in rows[n])
    print(f"compiled batch-1 by thread count ({args.floor_pairs} pairs each, alternated): "
          f"{'; '.join(parts)}; greedy tokens are eager's: {same}")  # fmt: skip


def time_split(rt: ElasticRuntime, compiled, prompt: list[int], args) -> None:
    """Where a compiled batch-1 step's wall time goes, each decode step split by perf_counter
    timers (no profiler) into: inductor's generated kernels (every `cpp_fused_*` call of the
    compiled graph modules), its external calls (`extern_kernels.*`: the attention's batched
    products), the rest of the graph call (a recorded step's loop over its calls and its input
    copies; an unrecorded one's Python wrapper: buffer reuse, tensor views, argument passing),
    and the engine step outside the graph (scheduling, planning, uploads, sampling, the compiled
    sampler's kernels among it). The kernels' read rate is the floor's bytes over their time
    (they read every weight), next to a plain read right after. --floor-pairs rounds; the
    timers are then removed.
    """
    med, nbytes = statistics.median, floor_bytes(rt)
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    inside = [False]  # within a decode graph's call; kernels outside one are host work

    def timed(fn, key: str):
        def call(*a, **k):
            within = inside[0]
            if key == "graph":
                inside[0] = True
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                part = key if within or key == "graph" else "outside"
                total[part] += time.perf_counter() - t0
                calls[part] += 1
                if key == "graph":
                    inside[0] = False

        return call

    class Externs:  # a graph module's `extern_kernels`, each call timed
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            return timed(getattr(self.inner, name), "extern")

    undo = []
    for module in PyCodeCache.modules:
        found = {n: f for n, f in vars(module).items() if n.startswith("cpp_fused")}
        if hasattr(module, "extern_kernels"):
            found["extern_kernels"] = module.extern_kernels
        for n, f in found.items():
            undo.append((module, n, f))
            setattr(module, n, Externs(f) if n == "extern_kernels" else timed(f, "kernels"))
    graphs = compiled.runner.graphs.graphs
    saved = dict(graphs)
    graphs.update({shape: (spec, timed(fn, "graph")) for shape, (spec, fn) in saved.items()})
    for _, fn in saved.values():  # a recorded step calls its kernels from the recording
        recording = getattr(fn, "recording", None)
        if hasattr(recording, "calls"):
            undo.append((recording, "calls", recording.calls))
            recording.calls = tuple(
                (timed(f, "kernels" if f.__name__ == "kernel" else "extern"), a, k)
                for f, a, k in recording.calls
            )
    step = compiled.step

    def step_with_graph():  # prefill steps run no graph: they are left out
        n, t0 = calls["graph"], time.perf_counter()
        out = step()
        if calls["graph"] > n:
            total["step"] += time.perf_counter() - t0
        return out

    compiled.step = step_with_graph
    rows = []
    try:
        for _ in range(args.floor_pairs):
            total.clear()
            calls.clear()
            tps = decode_tps(compiled, rt, prompt, args.tokens, count=False)[0]
            gbs = plain_read_gbs(rt.weights.arena is not None)
            ms = {k: 1e3 * v / calls["graph"] for k, v in total.items()}
            rows.append(
                (tps, gbs, ms, calls["kernels"] / calls["graph"], calls["extern"] / calls["graph"])
            )
    finally:
        del compiled.step
        graphs.update(saved)
        for module, n, f in undo:
            setattr(module, n, f)
    if not rows[0][3]:
        print("time split: no inductor kernel was called (not an inductor CPU graph)")
        return
    step_ms = med(r[2]["step"] for r in rows)
    parts = {
        "kernels": med(r[2]["kernels"] for r in rows),
        "extern calls": med(r[2].get("extern", 0.0) for r in rows),
        "the rest of the graph call": med(
            r[2]["graph"] - r[2]["kernels"] - r[2].get("extern", 0.0) for r in rows
        ),
        "host outside the graph": med(r[2]["step"] - r[2]["graph"] for r in rows),
    }
    read = med(nbytes / (r[2]["kernels"] / 1e3) / (r[1] * 1e9) for r in rows)
    tps = med(r[0] for r in rows)
    print(f"compiled batch-1 step, timed in parts ({len(rows)} rounds, medians; {tps:.1f} tok/s "
          f"with the timers): step {step_ms:.2f} ms = "
          + ", ".join(f"{k} {v:.2f} ms ({100 * v / step_ms:.0f}%)" for k, v in parts.items())
          + f"; {rows[0][3]:.0f} kernel and {rows[0][4]:.0f} extern calls per step; the kernels "
          f"read the floor's bytes at {100 * read:.0f}% of the plain read after them")  # fmt: skip


@functools.cache
def _plain(huge: bool) -> torch.Tensor:
    n = 64 * 1024 * 1024  # 256 MiB: far past any cache, like the weights
    if not huge:
        return torch.ones(n)
    return HugePageArena(4 * n).copy(torch.ones(n))


def plain_read_gbs(huge: bool = False) -> float:
    """GB/s of a plain read (a sum over 256 MiB, three times) right now, of 4 KiB pages or of
    huge pages (huge_pages.py, as the weights)."""
    a = _plain(huge)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.nbytes / 1e9 / (time.perf_counter() - t0)


def builds_side_by_side(preset: str, builds: dict, base: str, pairs: int, new_tokens: int) -> None:
    """Batch-1 compiled engines of one preset built different ways, timed side by side. `builds`
    maps a name to a context (a zero-argument callable returning one: inductor options, a rewrite
    table) that holds while that engine's first step compiles it; the compiled code keeps what
    it saw. The FX-graph cache is off, so that no build is served another's code. Then the
    engines run in turn over `pairs` rounds whose order alternates, a plain read after each
    round; printed: every round, then each engine's median tok/s, its share of the read floor,
    its median ratio to `base`'s run of the same round, and whether its tokens equal `base`'s."""
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    rt = ElasticRuntime.open(dev_model_cache(preset), dtype="float32", huge_pages=True)
    prompt = prompt_of(16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {preset}, "
          f"float32, batch 1, {new_tokens} greedy tokens")  # fmt: skip
    engines, tokens = {}, {}
    for name, context in builds.items():
        with context():
            engines[name] = engine(rt, compiled=True)
            t0 = time.perf_counter()
            tokens[name] = decode_tps(engines[name], rt, prompt, new_tokens, count=False)[2]
        print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    runs: dict[str, list[float]] = {name: [] for name in engines}
    reads = []
    for i in range(pairs):
        for name in engines if i % 2 == 0 else reversed(engines):
            runs[name].append(decode_tps(engines[name], rt, prompt, new_tokens, count=False)[0])
        reads.append(plain_read_gbs(rt.weights.arena is not None))
        print(f"round {i}: " + ", ".join(f"{n} {runs[n][-1]:.1f}" for n in engines)
              + f" tok/s; plain read {reads[-1]:.1f} GB/s", flush=True)  # fmt: skip
    floor = statistics.median(reads) * 1e9 / floor_bytes(rt)
    for name in engines:
        tps = statistics.median(runs[name])
        ratio = statistics.median(a / b for a, b in zip(runs[name], runs[base], strict=True))
        print(f"{name:>11}: {tps:5.1f} tok/s ({tps / floor:.0%} of the read floor, "
              f"{floor:.0f} tok/s), {ratio:.2f}x the {base} run of the same round; "
              f"tokens equal the {base} run's: {tokens[name] == tokens[base]}")  # fmt: skip


def side_by_side_main(doc: str, builds: dict, flag: str, base: str, pairs: int) -> None:
    """The command line of a benchmark that builds batch-1 engines different ways (`builds`: a
    name to its context, as builds_side_by_side takes) and times them side by side: --preset,
    --pairs, --tokens, --<flag> (which builds, comma-separated) and --base (the ratios' build)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--pairs", type=int, default=pairs)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument(f"--{flag}", default=",".join(builds), help="any of them, the base included")
    ap.add_argument("--base", default=base, help="the build the ratios are to")
    args = ap.parse_args()
    names = getattr(args, flag).split(",")
    unknown = [n for n in names if n not in builds]
    if unknown:
        ap.error(f"--{flag}: unknown {', '.join(unknown)} (known: {', '.join(builds)})")
    if args.base not in names:
        ap.error(f"--{flag} must include --base (the ratios are to it)")
    chosen = {n: builds[n] for n in names}
    builds_side_by_side(args.preset, chosen, args.base, args.pairs, args.tokens)


def bench_preset(name: str, args) -> None:
    rt = ElasticRuntime.open(dev_model_cache(name), dtype="float32", huge_pages=True)
    huge = rt.weights.arena is not None  # False where the kernel has huge pages off
    med = statistics.median
    prompt = prompt_of(args.prompt_tokens)
    print(f"\n== preset {name}: {rt.store.folder}")
    eager, compiled = engine(rt, False), engine(rt, True)
    t0 = time.perf_counter()
    decode_tps(compiled, rt, prompt, args.tokens, count=False)  # compiles the batch-1 graph
    print(f"compile (batch 1): {time.perf_counter() - t0:.0f} s")
    count_outside_graphs(compiled)
    decode_tps(eager, rt, prompt, 4, count=False)
    e = [decode_tps(eager, rt, prompt, args.tokens) for _ in range(args.repeats)]
    c = [decode_tps(compiled, rt, prompt, args.tokens) for _ in range(args.repeats)]
    model = hf_model(rt.store.folder)
    hf_decode_tps(model, prompt, 4)
    h = [hf_decode_tps(model, prompt, args.tokens) for _ in range(args.repeats)]
    hf_ops = hf_ops_per_step(model, prompt)
    nbytes = floor_bytes(rt)
    # The floor's bandwidth moves with this VM's neighbours (26-51 GB/s between runs, and within
    # a run from minute to minute): each compiled run is paired with a plain read taken right
    # after it, and the share is the median of the pairs' ratios.
    pairs = []
    for _ in range(args.floor_pairs):
        tps = decode_tps(compiled, rt, prompt, args.tokens, count=False)[0]
        pairs.append((tps, plain_read_gbs(huge)))
    gbs = med(g for _, g in pairs)
    floor = gbs * 1e9 / nbytes
    shares = [100 * tps * nbytes / (g * 1e9) for tps, g in pairs]
    et, ct, ht = med(x[0] for x in e), med(x[0] for x in c), med(h)
    print(f"ops per batch-1 decode step: ours eager {e[0][1]}, ours compiled 1 graph call + "
          f"{c[0][1]} around it, transformers {hf_ops:.0f}")  # fmt: skip
    print(f"batch-1 decode tok/s: eager {et:.1f}, compiled {ct:.1f}, transformers {ht:.1f}; "
          f"compiled/eager {ct / et:.2f}x, compiled/transformers {ct / ht:.2f}x, "
          f"eager/transformers {et / ht:.2f}x")  # fmt: skip
    print(f"compiled greedy tokens are eager's: {all(x[2] == e[0][2] for x in c)}")
    print(f"weights in {'huge' if huge else '4 KiB'} pages; read floor: {nbytes / 1e6:.1f} MB "
          f"per token at {gbs:.1f} GB/s (median plain read of the same kind of memory) "
          f"= {floor:.0f} tok/s; eager {100 * et / floor:.0f}%, compiled {100 * ct / floor:.0f}% "
          f"of it")  # fmt: skip
    print(f"compiled runs each paired with a plain read right after it ({len(pairs)} pairs): "
          f"tok/s {' '.join(f'{t:.1f}' for t, _ in pairs)}; GB/s "
          f"{' '.join(f'{g:.1f}' for _, g in pairs)}; share of the floor "
          f"{' '.join(f'{x:.0f}%' for x in shares)}, median {med(shares):.0f}%")  # fmt: skip
    time_split(rt, compiled, prompt, args)
    recorded_side_by_side(rt, compiled, prompt, args, e[0][2])
    sampled_side_by_side(rt, compiled, prompt, args, e[0][2])
    if huge:
        pages_side_by_side(rt, compiled, prompt, args, e[0][2])
    if torch.get_num_threads() > 1:
        threads_side_by_side(rt, compiled, prompt, args, e[0][2])
    if args.paged:
        for pool, budget in (("request-sized", None), ("server default", SERVER_KV_BYTES)):
            eng = engine(rt, True, paged=True, budget=budget)
            t0 = time.perf_counter()
            decode_tps(eng, rt, prompt, args.tokens, count=False)
            compile_s = time.perf_counter() - t0
            runs, gathered = [], []
            for _ in range(args.repeats):  # alternately, so that drifts hit both alike
                runs.append(decode_tps(eng, rt, prompt, args.tokens, count=False))
                gathered.append(decode_tps(compiled, rt, prompt, args.tokens, count=False)[0])
            pt, gt = med(x[0] for x in runs), med(gathered)
            blocks = eng.runner.kv.num_blocks
            print(f"paged, {pool} pool ({blocks} blocks): batch-1 tok/s {pt:.1f} vs gathered "
                  f"{gt:.1f} (timed alternately): {pt / gt:.2f}x; compiling {compile_s:.0f} s; "
                  f"{100 * pt / floor:.0f}% of the read floor; greedy tokens are eager's: "
                  f"{all(x[2] == e[0][2] for x in runs)}")  # fmt: skip
    if name in args.mixed_presets.split(","):
        for n in (16, 32):
            eg, cg = engine(rt, False, n), engine(rt, True, n)
            t0 = time.perf_counter()
            many(cg, rt, n, args.tokens)  # compiles the buckets the runs meet
            compile_s = time.perf_counter() - t0
            eager_runs = [many(eg, rt, n, args.tokens) for _ in range(args.repeats)]
            compiled_runs = [many(cg, rt, n, args.tokens) for _ in range(args.repeats)]
            et_n, ct_n = med(x[0] for x in eager_runs), med(x[0] for x in compiled_runs)
            same = all(x[1] == eager_runs[0][1] for x in compiled_runs)
            t0 = time.perf_counter()
            for i in range(n):
                hf_generate(model, prompt_of(28, i), args.tokens)
            ht_n = n * args.tokens / (time.perf_counter() - t0)  # full subnet: HF's best case
            graphs = cg.runner.graphs
            unrecorded = [f"{s.num_rows} rows: {why}" for s, why in graphs.uncaptured.items()]
            print(f"{n} mixed requests, tok/s: eager {et_n:.1f}, compiled {ct_n:.1f} "
                  f"(compiling {compile_s:.0f} s), transformers one at a time {ht_n:.1f}; "
                  f"compiled/transformers {ct_n / ht_n:.1f}x, eager/transformers "
                  f"{et_n / ht_n:.1f}x; compiled greedy tokens are eager's: {same}; "
                  f"{len(graphs.graphs) - len(unrecorded)} of {len(graphs.graphs)} buckets "
                  f"replayed from a recording"
                  + "".join(f"; not recorded, {u}" for u in unrecorded))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", default="tiny,mini,bench")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--mixed-presets", default="bench", help="presets also run with 16 and 32 mixed requests"
    )
    ap.add_argument("--paged", action="store_true", help="also batch-1 with paged attention")
    ap.add_argument(
        "--floor-pairs", type=int, default=9,
        help="compiled batch-1 runs each followed by a plain read, for the read-floor share",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, float32, {args.tokens} greedy tokens, "
          f"median of {args.repeats}")  # fmt: skip
    for name in args.presets.split(","):
        bench_preset(name, args)


if __name__ == "__main__":
    main()
