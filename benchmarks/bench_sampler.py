"""Sampling cost per step at Gemma 3n's vocabulary: the batched sampler vs the one it replaced.

One run, the same logits for both: [B, 262400] float32 (262144 text ids + 256 vision/audio
placeholders), for B in {1, 8, 32, 128} and each combination of parameters below, every row of a
batch with the same parameters and its own seed. A step is one `sample` call plus, for the old
sampler, the `record` its runner made after it (the new one records inside `sample`). The new
sampler is timed twice: eager, and with its passes over whole rows compiled
(`Sampler(compiled=True)`, what a server with `compile: true` runs: row_passes.py; compiled in
the warm-up step). Reported: the median of `--repeats` steps in ms (after one warm-up step), and
old / new; each combination's cost relative to greedy twice: from those medians, and paired (a
greedy step and the combination's timed back to back, `--pairs` times, the median of the
per-pair ratios: on a shared machine whose speed drifts, the paired number is the one to read);
then ops per step at B=1, eager and compiled: the aten ops `sample` calls (an op called inside
another is not counted again) with each compiled loop counted once, from torch.profiler. On an
accelerator each is at least one kernel launch (a few microseconds each), which at small batches
is the step's cost. Last, a compiled sampler's top_k + top_p step in its one pass
(`_top_k_pick`) vs through its general path, paired, with the ops of each.

The process keeps the memory a step frees, as a runtime on a CPU does (host_heap.py: glibc
otherwise maps and faults in again, every step, tensors of a few megabytes and up);
`--default-heap` leaves glibc's policy as it is, to measure what that costs.

Logits are LM-like: per row, a head of 32 ids at 20 - 2 ln(rank) over a body of N(0, 2^2), at
random ids (the top token holds ~60% of the mass, the 0.95 nucleus ~12 ids). `top_p alone, flat`
repeats top_p on N(0, 4^2) logits, where the nucleus holds thousands of ids (random-weight dev
models look like this): the 128 candidates do not settle it and rows take the rejection path.

Combinations (what a request carries):
  greedy            temperature 0
  temperature       temperature 0.8
  top_k + top_p     top_k 64, top_p 0.95 (Gemma 3n's generation_config)
  top_p alone       top_p 0.95
  min_p             min_p 0.05
  penalties + bias  repetition 1.1, frequency 0.5, presence 0.5, 16 logit_bias ids, a 512-token
                    prompt and 64 generated tokens, with top_k 64 + top_p 0.95 (the defaults such
                    a request gets from the generation_config)
  logprobs 5        logprobs 5, with top_k 64 + top_p 0.95 (likewise)

References in the same run: `torch.argmax` over [B, 262144]; one exp2 pass over it into a
reused buffer; and the sampler's exact normaliser (log-sum-exp, `Sampler._log_normalizer`),
eager (one fused shift-and-scale pass into a reused buffer, exp2 in place, sums of 64-id blocks
then a float64 sum of those) and compiled (one loop: row_passes.py), which every request
with logprobs needs (logprobs are of the raw distribution, so every id's weight enters).
"logprobs floor" is (greedy step + the eager normaliser) / greedy step: the least an eager
logprobs step can cost relative to greedy here, before anything else it does. The "logprobs 5"
row also draws with top_k + top_p (the defaults its request gets), so its own floor is that
draw plus the normaliser: (top_k + top_p step + normaliser) / greedy step, printed eager and
compiled (each with its own normaliser), next to what the row measured.

    PYTHONPATH=. python benchmarks/bench_sampler.py [--threads 1] [--repeats 7] [--old-repeats 3]
        [--pairs 15] [--default-heap]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import profile

from server.runtime.host_heap import keep_freed_memory
from server.runtime.sampler import Sampler, _Rows
from server.vocabulary.sampling_params import SamplingParams

TEXT_VOCAB = 262144
WIDTH = TEXT_VOCAB + 256
EOS = (1, 106)
BATCHES = (1, 8, 32, 128)
GEMMA = {"top_k": 64, "top_p": 0.95}
COMBINATIONS = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top_k + top_p": SamplingParams(**GEMMA),
    "top_p alone": SamplingParams(top_p=0.95),
    "min_p": SamplingParams(min_p=0.05),
    "penalties + bias": SamplingParams(
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        logit_bias={1000 + 37 * i: (-1.0) ** i * 2.0 for i in range(16)},
        max_tokens=4096,
        **GEMMA,
    ),
    "logprobs 5": SamplingParams(logprobs=5, **GEMMA),
    "top_p alone, flat": SamplingParams(top_p=0.95),
}
HISTORY = 64  # tokens generated before the timed steps, for the penalties


def baseline_module():
    """The pre-issue-11 sampler (benchmarks/baseline_sampler.py), loaded by path."""
    path = Path(__file__).with_name("baseline_sampler.py")
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def make_logits(batch: int, flat: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if flat:
        logits = torch.randn(batch, WIDTH, generator=g) * 4
    else:
        logits = torch.randn(batch, WIDTH, generator=g) * 2
        head = 20 - 2 * torch.log(torch.arange(1, 33, dtype=torch.float32))
        ids = torch.stack([torch.randperm(TEXT_VOCAB, generator=g)[:32] for _ in range(batch)])
        logits.scatter_(1, ids, head.expand(batch, -1))
    logits[:, TEXT_VOCAB:] = logits[:, :TEXT_VOCAB].amax(dim=1, keepdim=True)  # never sampled
    return logits


def prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(107, TEXT_VOCAB, (512,), generator=g).tolist()


def new_step(logits: torch.Tensor, params: SamplingParams, compiled: bool = False):
    """A function running one step of a new sampler whose every row has `params` (its own
    seed), after a warm-up step (buffers, the penalty table, compiling if compiled)."""
    sampler = Sampler(TEXT_VOCAB, EOS, compiled=compiled)
    states = [
        sampler.add_request(dataclasses.replace(params, seed=i), prompt(i))
        for i in range(logits.shape[0])
    ]
    if states[0].tracks_output:
        for t in range(HISTORY):
            sampler.record(states, [(t * 7919 + 13 * i) % TEXT_VOCAB for i in range(len(states))])
    step = partial(sampler.sample, logits, states)
    step()
    return step


def time_new(
    logits: torch.Tensor, params: SamplingParams, repeats: int, compiled: bool = False
) -> tuple[float, int]:
    """The median step in seconds, and the ops of one more step (`count_ops`)."""
    step = new_step(logits, params, compiled)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), count_ops(step)


def paired_ratio(step, greedy, pairs: int) -> float:
    """The median over `pairs` of step time / greedy step time, the two timed back to back
    (in alternating order): a machine's drift between blocks of steps cancels in each pair."""
    ratios = []
    for i in range(pairs):
        order = (greedy, step) if i % 2 == 0 else (step, greedy)
        spent = []
        for fn in order:
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
        g, s = spent if i % 2 == 0 else spent[::-1]
        ratios.append(s / g)
    return statistics.median(ratios)


def count_ops(fn) -> int:
    """Top-level aten ops and compiled regions of one call of fn (torch.profiler): an event is
    counted unless an enclosing event is an aten op or a compiled region."""

    def counted(event) -> bool:
        return event.name.startswith("aten::") or event.name.startswith("Torch-Compiled Region")

    with profile() as prof:
        fn()
    n = 0
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not counted(parent):
            parent = parent.cpu_parent
        n += counted(event) and parent is None
    return n


def time_old(old, logits: torch.Tensor, params: SamplingParams, repeats: int) -> float:
    sampler = old.Sampler(TEXT_VOCAB)
    states = [
        old.SamplerState(dataclasses.replace(params, seed=i), prompt(i), TEXT_VOCAB, EOS)
        for i in range(logits.shape[0])
    ]
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1:
        for t in range(HISTORY):
            for i, s in enumerate(states):
                s.record((t * 7919 + 13 * i) % TEXT_VOCAB)

    def step() -> None:
        for s, r in zip(states, sampler.sample(logits, states), strict=True):
            s.record(r.token_id)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_reference(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of the new sampler")
    ap.add_argument("--old-repeats", type=int, default=3, help="timed steps of the old one")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument(
        "--pairs", type=int, default=15, help="steps timed back to back with greedy (0: none)"
    )
    ap.add_argument(
        "--default-heap",
        action="store_true",
        help="leave glibc's heap policy as it is (a CPU runtime keeps freed memory: host_heap.py)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heap = "glibc's default" if args.default_heap else keep_freed_memory() or "freed memory kept"
    batches = [int(b) for b in args.batches.split(",")]
    old = None if args.skip_old else baseline_module()
    print(
        f"torch {torch.__version__}  {platform.machine()}  threads {args.threads}  float32 "
        f"logits [B, {WIDTH}] ({TEXT_VOCAB} text ids)  median of {args.repeats} steps "
        f"(old: {args.old_repeats})  host heap: {heap}\n"
    )
    header = f"{'combination':<20}" + "".join(
        f"{'B=' + str(b) + ' new':>12}{'compiled':>10}{'old':>10}{'x':>7}" for b in batches
    )
    print("ms per step (new: eager; compiled: Sampler(compiled=True); x: old / new)")
    print(header)
    new_ms: dict[tuple[str, int], float] = {}
    compiled_ms: dict[tuple[str, int], float] = {}
    paired: dict[bool, dict[tuple[str, int], float]] = {False: {}, True: {}}
    ops: dict[tuple[str, int], tuple[int, int]] = {}
    for name, params in COMBINATIONS.items():
        cells = []
        for b in batches:
            logits = make_logits(b, flat=name.endswith("flat"))
            new, eager_ops = time_new(logits, params, args.repeats)
            fused, fused_ops = time_new(logits, params, args.repeats, True)
            new *= 1e3
            fused *= 1e3
            new_ms[name, b], compiled_ms[name, b] = new, fused
            ops[name, b] = eager_ops, fused_ops
            if args.pairs:
                for compiled in (False, True):
                    greedy = new_step(logits, COMBINATIONS["greedy"], compiled)
                    step = new_step(logits, params, compiled)
                    paired[compiled][name, b] = paired_ratio(step, greedy, args.pairs)
            cell = f"{new:>12.2f}{fused:>10.2f}"
            if old is None:
                cells.append(f"{cell}{'':>10}{'':>7}")
            else:
                was = time_old(old, logits, params, args.old_repeats) * 1e3
                cells.append(f"{cell}{was:>10.1f}{was / new:>7.0f}")
            del logits
        print(f"{name:<20}" + "".join(cells), flush=True)

    b = min(batches)
    print(f"\nops per step at B={b} (eager / compiled; a compiled loop counts once):")
    for name in COMBINATIONS:
        print(f"  {name:<20}{ops[name, b][0]:>6} / {ops[name, b][1]:<6}")

    print("\nreferences (ms):")
    for b in batches:
        x = make_logits(b, flat=False)[:, :TEXT_VOCAB]
        buf = torch.empty(b, TEXT_VOCAB)
        argmax = time_reference(lambda x=x: x.argmax(dim=1), args.repeats) * 1e3
        exp2 = time_reference(lambda x=x, buf=buf: torch.exp2(x, out=buf), args.repeats) * 1e3
        rows, m = _Rows.of(range(b), b, x.device), x.amax(1)
        lse, lse_c = (
            time_reference(partial(sampler._log_normalizer, x, rows, m), args.repeats) * 1e3
            for sampler in (Sampler(TEXT_VOCAB, EOS), Sampler(TEXT_VOCAB, EOS, compiled=True))
        )
        floor = (new_ms["greedy", b] + lse) / new_ms["greedy", b]
        print(
            f"  B={b:<4} torch.argmax {argmax:7.2f}   one exp2 pass {exp2:7.2f}   "
            f"exact normaliser {lse:7.2f} (compiled {lse_c:5.2f})   "
            f"logprobs floor {floor:4.1f}x greedy"
        )
        drawn = []
        for label, ms, norm in (("eager", new_ms, lse), ("compiled", compiled_ms, lse_c)):
            own = (ms["top_k + top_p", b] + norm) / ms["greedy", b]
            drawn.append(
                f"{label} {own:4.1f}x (measured {ms['logprobs 5', b] / ms['greedy', b]:4.1f}x)"
            )
        print(
            f"{'':8}logprobs 5's own floor, (top_k + top_p + normaliser) / greedy: "
            + ", ".join(drawn)
        )

    for label, ms in (("new", new_ms), ("compiled", compiled_ms)):
        print(f"\n{label}, relative to greedy at the same B:")
        for name in COMBINATIONS:
            ratios = "".join(f"{ms[name, b] / ms['greedy', b]:>8.1f}" for b in batches)
            print(f"  {name:<20}{ratios}")
    if args.pairs:
        for compiled, label in ((False, "new"), (True, "compiled")):
            print(
                f"\n{label}, paired with a greedy step ({args.pairs} pairs, median of the "
                "per-pair ratios):"
            )
            for name in COMBINATIONS:
                ratios = "".join(f"{paired[compiled][name, b]:>8.1f}" for b in batches)
                print(f"  {name:<20}{ratios}")
    if 32 in batches:
        gk = new_ms["top_k + top_p", 32]
        print(
            f"\ntargets at B=32: top_k + top_p {gk:.1f} ms (<= 40), greedy "
            f"{new_ms['greedy', 32]:.1f} ms (<= 10)"
        )
        for label, ms in (("new", new_ms), ("compiled", compiled_ms)):
            over = sorted({n for (n, b), v in ms.items() if v > 3 * ms["greedy", b]})
            print(f"{label}: combinations over 3x greedy at any B: {', '.join(over) or 'none'}")
    for compiled, label in ((False, "new"), (True, "compiled")):
        if args.pairs:
            cells = paired[compiled].items()
            over = [f"{n} (B={b}: {r:.1f}x)" for (n, b), r in sorted(cells) if r > 3]
            print(f"{label}, paired: over 3x greedy: {', '.join(over) or 'none'}")
    if args.pairs:
        one_pass_side_by_side(batches, args.pairs)


def one_pass_side_by_side(batches: list[int], pairs: int) -> None:
    """A compiled sampler's top_k + top_p step in its one pass (`_top_k_pick`) vs the same step
    through its general path (the pass off), the two timed back to back in `pairs` pairs; ops
    per step either way, and whether they draw the same tokens."""
    print(
        f"\ncompiled top_k + top_p, one pass vs the general path ({pairs} pairs, median ms and "
        "the median of the per-pair ratios; ops per step: a compiled loop counts once):"
    )
    for b in batches:
        logits = make_logits(b, flat=False)
        one = new_step(logits, COMBINATIONS["top_k + top_p"], compiled=True)
        general = new_step(logits, COMBINATIONS["top_k + top_p"], compiled=True)
        general.func.__self__._top_k_pick = None
        general()  # compiles the general path's passes
        one()  # so that both have drawn as many tokens (a seeded row's draw depends on it)
        same = [r.token_id for r in one()] == [r.token_id for r in general()]
        times: dict[str, list[float]] = {"one": [], "general": []}
        for i in range(pairs):
            order = (("one", one), ("general", general))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = statistics.median
        ratio = med(g / o for o, g in zip(times["one"], times["general"], strict=True))
        print(
            f"  B={b:<4} one pass {1e3 * med(times['one']):7.2f} ms, general path "
            f"{1e3 * med(times['general']):7.2f} ms: {ratio:.2f}x; ops {count_ops(one)} vs "
            f"{count_ops(general)}; the same draws: {same}"
        )


if __name__ == "__main__":
    main()
