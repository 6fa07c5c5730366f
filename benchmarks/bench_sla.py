"""SLA under a load ramp: the `sla` policy vs a fixed full-width server vs a fixed E2B server.

One run, one checkpoint (default: the `bench` dev preset, float32). Two tiers share the server:
`gold` (priority 0, a p95 time-per-output-token target) and `bronze` (priority 10, no target).
The same open-loop arrival schedule (a bounded number of requests, the arrival rate rising in
phases) is replayed against three engines that differ only in the subnet policy:

- fixed full: every request on the full subnet (a conventional server of the big model);
- fixed e2b: every request on E2B (a conventional server of the small model);
- sla: per request, the best subnet the tier allows whose predicted TTFT / time per token meet
  the tier's targets at the current load, never slowing a running gold request past its target.

Per phase and policy it prints gold's p95 time per output token (and whether it meets the
target), bronze's, and the average quality served (the subnets' MMLU from Google's table).

    python benchmarks/bench_sla.py [--checkpoint DIR] [--target-tpot 0.2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch

from policies.snapshots import TierView
from policies.subnet_choice import FixedPolicy, SlaPolicy
from server.engine.assembly import assemble_engine, calibrate
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import dev_model_cache
from server.vocabulary.sampling_params import SamplingParams

PHASES = [(0.6, 8), (1.4, 12), (2.8, 16), (4.5, 16)]  # (arrivals per second, requests)


def schedule(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for phase, (rate, count) in enumerate(PHASES):
        for _ in range(count):
            t += rng.expovariate(rate)
            tier = "gold" if rng.random() < 0.4 else "bronze"
            prompt = [2] + [rng.randrange(107, vocab) for _ in range(rng.randint(16, 48))]
            arrivals.append((t, phase, tier, prompt, rng.randint(12, 24)))
    return arrivals


def run(rt: ElasticRuntime, policy, tiers: dict[str, TierView], arrivals) -> list[dict]:
    config = SchedulerConfig(
        max_num_seqs=32,
        max_num_batched_tokens=256,
        max_prefill_chunk=64,
        max_model_len=rt.store.text.max_position_embeddings,
    )
    eng = assemble_engine(rt, 256 * 1024 * 1024, config, subnet_policy=policy)
    calibrate(eng, rt.tokenizer.bos_id)
    done: dict[str, dict] = {}
    meta = {}
    pending = list(enumerate(arrivals))
    t0 = time.monotonic()
    while pending or eng.has_work:
        now = time.monotonic() - t0
        while pending and pending[0][1][0] <= now:
            i, (_, phase, tier, prompt, n) = pending.pop(0)
            rid = f"r{i}"
            eng.add_request(
                rid,
                prompt,
                None,
                SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                priority=tiers[tier].priority,
                tier=tiers[tier],
            )
            meta[rid] = (phase, tier)
        if not eng.has_work:
            time.sleep(max(0.0, pending[0][1][0] - (time.monotonic() - t0)))
            continue
        for out in eng.step():
            if out.finished:
                lat = out.latency
                done[out.request_id] = {
                    "phase": meta[out.request_id][0],
                    "tier": meta[out.request_id][1],
                    "subnet": out.subnet,
                    "tpot": lat.tpot_s or 0.0,
                    "ttft": lat.ttft_s,
                    "quality": rt.subnets.scores[out.subnet],
                }
    return list(done.values())


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint")
    ap.add_argument("--target-tpot", type=float, default=0.20, help="gold's p95 seconds/token")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    checkpoint = Path(args.checkpoint) if args.checkpoint else dev_model_cache("bench")
    rt = ElasticRuntime.open(checkpoint, dtype="float32")
    tiers = {
        "gold": TierView("gold", 0, ("*",), None, args.target_tpot, None, None),
        "bronze": TierView("bronze", 10, ("*",), None, None, None, None),
    }
    arrivals = schedule(rt.store.text.vocab_size_per_layer_input)
    print(
        f"checkpoint {checkpoint}  float32  threads {args.threads}  {len(arrivals)} requests; "
        f"gold target: p95 time per output token <= {args.target_tpot * 1e3:.0f} ms"
    )
    print("phases (arrivals/s x requests): " + ", ".join(f"{r}/s x {n}" for r, n in PHASES))
    results = {}
    for name, policy in (
        ("fixed full", FixedPolicy("full")),
        ("fixed e2b", FixedPolicy("e2b")),
        ("sla", SlaPolicy()),
    ):
        t0 = time.perf_counter()
        results[name] = run(rt, policy, tiers, arrivals)
        print(f"  ran {name:<11} in {time.perf_counter() - t0:.0f} s")

    print(
        f"\n{'phase':<7}{'policy':<12}{'gold p95 TPOT ms':>17}{'meets':>7}"
        f"{'bronze p95 ms':>15}{'avg quality':>13}{'subnets served'}"
    )
    for phase, (rate, _) in enumerate(PHASES):
        for name, rows in results.items():
            rows = [r for r in rows if r["phase"] == phase]
            gold = p95([r["tpot"] for r in rows if r["tier"] == "gold"])
            bronze = p95([r["tpot"] for r in rows if r["tier"] == "bronze"])
            quality = statistics.mean(r["quality"] for r in rows)
            mix: dict[str, int] = {}
            for r in rows:
                mix[r["subnet"]] = mix.get(r["subnet"], 0) + 1
            meets = "yes" if gold <= args.target_tpot else "NO"
            mix_s = " " + ", ".join(f"{k}:{v}" for k, v in sorted(mix.items()))
            print(
                f"{rate:<7}{name:<12}{gold * 1e3:>17.0f}{meets:>7}{bronze * 1e3:>15.0f}"
                f"{quality:>13.1f}{mix_s}"
            )
    print(
        "\noverall average quality served: "
        + ", ".join(
            f"{name} {statistics.mean(r['quality'] for r in rows):.1f}"
            for name, rows in results.items()
        )
    )


if __name__ == "__main__":
    main()
