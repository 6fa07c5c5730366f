"""What batch-invariant mode costs, and what it buys: the same mixed-subnet load in each mode.

One checkpoint (default: the `mini` dev preset), one dtype (default bfloat16, where batch variance
shows), N greedy requests over eight subnets (fixed pseudo-random prompt and output lengths, eos
ignored). For each mode of running a step (grouped FFN widths, masked widths, and batch-invariant)
side by side, in one process:

- throughput of the N requests submitted at once (continuous batching), and its ratio to grouped;
- batch-1 decode: median time per output token of one request alone, and its ratio;
- how many of the N requests produced, in the concurrent run, exactly the tokens they produce
  alone in that mode (batch-invariant mode: all of them, by construction).

Timings are taken in rounds that alternate the modes (each number the median over the rounds),
so that a load that drifts on a shared machine weighs on every mode alike.

    python benchmarks/bench_batch_invariant.py [--checkpoint DIR] [--dtype bfloat16]
        [--requests 16] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import GenerationRequest, generate
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import dev_model_cache
from server.vocabulary.sampling_params import SamplingParams

SUBNETS = [
    "full",
    "e2b",
    "e2.98b-layer",
    "mix-0.75",
    "skip-3-7",
    "skip-30-33",
    "e3.39b-layer",
    "e2.49b-block",
]
MODES = {  # name -> assemble_engine options
    "grouped": {"ffn_mode": "grouped"},
    "masked": {"ffn_mode": "masked"},
    "batch-invariant": {"batch_invariant": True},
}


def make_load(rt: ElasticRuntime, n: int, seed: int = 0) -> list[GenerationRequest]:
    rng = random.Random(seed)
    vocab = rt.store.text.vocab_size_per_layer_input
    load = []
    for i in range(n):
        prompt = [2] + [rng.randrange(107, vocab) for _ in range(rng.randint(8, 48))]
        params = SamplingParams(max_tokens=rng.randint(8, 24), temperature=0.0, ignore_eos=True)
        load.append(GenerationRequest(rt.subnets[SUBNETS[i % len(SUBNETS)]], prompt, params))
    return load


def engine(rt: ElasticRuntime, load, options: dict):
    config = SchedulerConfig(
        max_num_seqs=32, max_num_batched_tokens=128, max_prefill_chunk=64, max_model_len=1024
    )
    tokens = sum(len(r.prompt_ids) + r.params.max_tokens + 16 for r in load)
    return assemble_engine(rt, kv_bytes_for(rt, tokens), config, block_size=16, **options)


def concurrent(rt, load, options) -> tuple[float, list[list[int]]]:
    eng = engine(rt, load, options)
    t0 = time.perf_counter()
    out = generate(eng, load)
    seconds = time.perf_counter() - t0
    return sum(len(g.token_ids) for g in out) / seconds, [g.token_ids for g in out]


def batch1_tpot(rt, request, options) -> float:
    eng = engine(rt, [request], options)
    eng.add_request("one", request.prompt_ids, request.subnet, request.params)
    eng.step()  # prefill
    steps = []
    while eng.has_work:
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
    return statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: the mini dev model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folder = Path(a.checkpoint) if a.checkpoint else dev_model_cache("mini")
    rt = ElasticRuntime.open(folder, dtype=a.dtype)
    load = make_load(rt, a.requests)
    one = GenerationRequest(load[0].subnet, load[0].prompt_ids, load[0].params)
    print(
        f"checkpoint {folder.name}  {a.dtype}  threads {a.threads}  {a.requests} greedy requests "
        f"over {len(SUBNETS)} subnets; prompts 9-49 tokens, outputs 8-24 tokens"
    )
    print()
    equal = {}
    for name, options in MODES.items():
        engine(rt, load[:2], options)  # warm-up: allocator and kernels for these shapes
        _, together = concurrent(rt, load, options)
        alone = [generate(engine(rt, [r], options), [r])[0].token_ids for r in load]
        equal[name] = sum(a == b for a, b in zip(alone, together, strict=True))
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in MODES}
    for _ in range(a.rounds):  # the modes alternate within each round
        for name, options in MODES.items():
            times[name][0].append(concurrent(rt, load, options)[0])
            times[name][1].append(batch1_tpot(rt, one, options))
    rows = {
        name: (statistics.median(tps), statistics.median(tpot), equal[name])
        for name, (tps, tpot) in times.items()
    }
    base_tps, base_tpot, _ = rows["grouped"]
    print(
        f"{'mode':<17}{'tok/s (N at once)':>18}{'x grouped':>11}{'batch-1 TPOT ms':>17}"
        f"{'x grouped':>11}{'equal to alone':>16}"
    )
    for name, (tps, tpot, equal) in rows.items():
        print(
            f"{name:<17}{tps:>18.1f}{tps / base_tps:>11.2f}{tpot * 1e3:>17.1f}"
            f"{tpot / base_tpot:>11.2f}{f'{equal} of {len(load)}':>16}"
        )


if __name__ == "__main__":
    main()
