"""Offline throughput: the engine vs transformers on the same mixed-subnet load.

One run, one checkpoint (default: the `bench-262k` dev preset, float32: `bench`'s sizes with
Gemma 3n's 262144-id text vocabulary, so that the LM head and the sampler weigh what they weigh
on the real model), N requests with realistic prompt and output lengths spread over four subnets
(fixed pseudo-random lengths; greedy; eos ignored so every request produces exactly its output
length):

- engine: all N requests submitted at once, continuous batching, mixed subnets in each step;
- HF sequential: transformers `generate()` on the export of each request's subnet, one request at
  a time;
- HF padded: one left-padded `generate()` batch per subnet (it runs until the group's longest
  output; only each request's own tokens count as useful).

Then the engine alone: the same load sampled with Gemma 3n's generation_config defaults (top_k
64, top_p 0.95, seeded) rather than greedily; the cost of heterogeneity (the same load on one
subnet vs spread over four); and what each way of running mixed FFN widths costs (forced
"grouped", forced "masked", and "auto", which measures both per kind of step and keeps the
faster).

    python benchmarks/bench_engine.py [--checkpoint DIR] [--requests 16] [--skip-hf]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from server.engine.assembly import assemble_engine
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import dev_model_cache
from server.tools.export import export_subnet
from server.vocabulary.sampling_params import SamplingParams

SUBNETS = ["full", "e3.39b-layer", "e2.98b-block", "e2b"]


def make_load(n: int, vocab: int, subnets: list[str], seed: int = 0):
    rng = random.Random(seed)
    load = []
    for i in range(n):
        prompt = [2] + [rng.randrange(107, vocab) for _ in range(rng.randint(24, 96))]
        load.append((f"q{i}", subnets[i % len(subnets)], prompt, rng.randint(12, 40)))
    return load


GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
GEMMA_DEFAULTS = SamplingParams(top_k=64, top_p=0.95, ignore_eos=True)


def run_engine(
    rt: ElasticRuntime, load, ffn_mode: str = "auto", sampling: SamplingParams = GREEDY
) -> dict:
    config = SchedulerConfig(
        max_num_seqs=32,
        max_num_batched_tokens=256,
        max_prefill_chunk=128,
        max_model_len=rt.store.text.max_position_embeddings,
    )
    eng = assemble_engine(rt, 256 * 1024 * 1024, config, ffn_mode=ffn_mode)
    for i, (rid, subnet, prompt, out_len) in enumerate(load):
        eng.add_request(
            rid,
            prompt,
            rt.subnets[subnet],
            dataclasses.replace(sampling, max_tokens=out_len, seed=i),
        )
    tokens = 0
    modes: dict[str, int] = {}
    t0 = time.perf_counter()
    while eng.has_work:
        for out in eng.step():
            tokens += len(out.token_ids)
        if eng.last_step.ffn_mode:
            modes[eng.last_step.ffn_mode] = modes.get(eng.last_step.ffn_mode, 0) + 1
    seconds = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "steps": eng.num_steps,
        "modes": modes,
        "chooser": eng.runner.chooser.summary(),
    }


def hf_models(rt: ElasticRuntime, names, tmp: Path):
    from transformers import AutoConfig, Gemma3nForCausalLM

    models = {}
    for name in names:
        out = export_subnet(rt.store, rt.subnets[name], tmp / name, progress=False)
        cfg = AutoConfig.from_pretrained(out)
        models[name] = Gemma3nForCausalLM.from_pretrained(
            out, config=cfg.text_config, dtype=torch.float32
        ).eval()
    return models


def run_hf_sequential(models, load) -> dict:
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, subnet, prompt, out_len in load:
            models[subnet].generate(
                torch.tensor([prompt]),
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
                pad_token_id=0,
            )
            tokens += out_len
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def run_hf_padded(models, load) -> dict:
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for subnet, model in models.items():
            group = [(p, n) for _, s, p, n in load if s == subnet]
            if not group:
                continue
            width = max(len(p) for p, _ in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
            longest = max(n for _, n in group)
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
            )
            tokens += sum(n for _, n in group)  # useful tokens only
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    checkpoint = Path(args.checkpoint) if args.checkpoint else dev_model_cache("bench-262k")
    rt = ElasticRuntime.open(checkpoint, dtype="float32")
    vocab = rt.store.text.vocab_size_per_layer_input
    load = make_load(args.requests, vocab, SUBNETS)
    print(
        f"checkpoint {checkpoint}  float32  threads {args.threads}  {len(load)} requests over "
        f"{', '.join(SUBNETS)}; prompts {min(len(p) for _, _, p, _ in load)}-"
        f"{max(len(p) for _, _, p, _ in load)} tokens, outputs "
        f"{min(n for *_, n in load)}-{max(n for *_, n in load)} tokens, greedy\n"
    )

    run_engine(rt, load[:4])  # warm-up
    rows = {"engine (continuous batching)": run_engine(rt, load)}
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            models = hf_models(rt, SUBNETS, Path(tmp))
            rows["HF generate, one request at a time"] = run_hf_sequential(models, load)
            rows["HF generate, padded batch per subnet"] = run_hf_padded(models, load)
            del models
    base = rows["engine (continuous batching)"]
    base_tps = base["tokens"] / base["seconds"]
    print(f"{'mixed load':<40}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'engine x':>10}")
    for name, r in rows.items():
        tps = r["tokens"] / r["seconds"]
        print(f"{name:<40}{r['tokens']:>8}{r['seconds']:>9.1f}{tps:>8.1f}{base_tps / tps:>10.2f}")

    sampled = run_engine(rt, load, sampling=GEMMA_DEFAULTS)
    print(
        f"\nsampling (engine, the mixed load): greedy {base_tps:.1f} tok/s, top_k 64 + top_p 0.95 "
        f"{sampled['tokens'] / sampled['seconds']:.1f} tok/s ({sampled['steps']} steps)"
    )

    print("\nheterogeneity (engine, same prompts and lengths):")
    hetero = {"spread over 4 subnets": base}
    for name in ("full", "e2b"):
        hetero[f"all on {name}"] = run_engine(rt, [(r, name, p, n) for r, _, p, n in load])
    for name, r in hetero.items():
        print(f"  {name:<28}{r['tokens'] / r['seconds']:>8.1f} tok/s  ({r['steps']} steps)")

    print("\nmixed FFN widths (engine, the mixed load):")
    for mode in ("grouped", "masked", "auto"):
        r = base if mode == "auto" else run_engine(rt, load, ffn_mode=mode)
        extra = f"  steps per mode chosen: {r['modes']}" if mode == "auto" else ""
        print(f"  {mode:<8}{r['tokens'] / r['seconds']:>8.1f} tok/s{extra}")
    print("  median step seconds measured by the auto chooser, per kind of step:")
    for key, per_mode in sorted(base["chooser"].items()):
        cells = ", ".join(f"{m} {s * 1e3:.0f} ms" for m, s in sorted(per_mode.items()))
        print(f"    {key[0]:<8} ~{key[1]:>4} tokens: {cells}")


if __name__ == "__main__":
    main()
