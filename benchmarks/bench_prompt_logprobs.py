"""What scoring a prompt costs: prefill with and without prompt logprobs, through the engine.

A request with `prompt_logprobs` (or `echo` with `logprobs`) gets logits at every row of its
prefill chunks (the LM head over the whole vocabulary per prompt token, the layers past the KV
producers for every row instead of only the last, and a float64 normaliser) and never reads the
prefix cache. This prints the median wall time of one request (prefill plus one token) each way,
alone on the engine (the fastest of the reps, variants run round-robin), and the per-token
cost of scoring.

    python benchmarks/bench_prompt_logprobs.py [--checkpoint DIR] [--prompt 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import GenerationRequest, greedy
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import dev_model_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="default: the `bench` dev preset")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subnets", default="full,e2b")
    args = ap.parse_args()
    folder = Path(args.checkpoint) if args.checkpoint else dev_model_cache("bench")
    rt = ElasticRuntime.open(folder, dtype="float32")
    vocab = rt.store.text.vocab_size_per_layer_input
    g = torch.Generator().manual_seed(0)
    ids = [2, *torch.randint(107, min(vocab, 4000), (args.prompt - 1,), generator=g).tolist()]
    config = SchedulerConfig(
        max_num_seqs=4,
        max_num_batched_tokens=args.chunk,
        max_prefill_chunk=args.chunk,
        max_model_len=args.prompt + 16,
    )
    print(
        f"checkpoint {folder.name}, vocabulary {vocab}, prompt {args.prompt} tokens, "
        f"chunks of {args.chunk}, {torch.get_num_threads()} threads, best of {args.reps}"
    )
    variants = (
        ("plain", {}),
        ("prompt_logprobs=0", {"prompt_logprobs": 0}),
        ("prompt_logprobs=5", {"prompt_logprobs": 5}),
    )
    for name in args.subnets.split(","):
        subnet = rt.subnets[name]
        runs: dict[str, list[float]] = {label: [] for label, _ in variants}
        # Round-robin, so drift in what else the machine runs hits every variant alike; the
        # fastest run is the least disturbed one.
        for rep in range(args.reps + 1):  # the first round warms up
            for label, fields in variants:
                engine = assemble_engine(rt, kv_bytes_for(rt, args.prompt + 16), config)
                request = GenerationRequest(subnet, ids, greedy(1, **fields))
                t0 = time.perf_counter()
                offline.generate(engine, [request])
                if rep:
                    runs[label].append(time.perf_counter() - t0)
        base = min(runs["plain"])
        for label, times in runs.items():
            t = min(times)
            extra = (t - base) / args.prompt * 1e3
            print(
                f"  {name:>6} {label:<18} {t * 1e3:8.1f} ms  ({t / base:4.2f}x, "
                f"{extra:+.3f} ms per prompt token; median {statistics.median(times) * 1e3:.1f})"
            )


if __name__ == "__main__":
    main()
