"""Runtime benchmark: greedy decode speed and subnet-switch cost, ours vs transformers.

For each subnet (default: the full model and E2B), in one run and on one checkpoint (default: the
`bench` dev preset, float32, made on first use):

- ours: one request through the serving engine (scheduler, runner, sampler: the one generation
  path), its prompt prefilled, then greedy decode steps, every subnet a view of the same weights;
- transformers: `Gemma3nForCausalLM.from_pretrained` of `concentric export` of that subnet (the
  physically sliced model every other tool serves), then `generate()` greedy with the same prompt
  and the same number of new tokens.

Switching subnet: ours is the next request's first token (nothing to load); transformers' is
`from_pretrained` of the other subnet's export plus its first token.

Decode time is total minus prefill; medians over --repeats runs. float32 on CPU (bf16 matmul is
several times slower than float32 on CPUs without AVX512-BF16). Prints one table and ratios.

    python benchmarks/bench_runtime.py [--checkpoint DIR] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from server.engine.assembly import assemble_engine, kv_bytes_for
from server.runtime.elastic import ElasticRuntime
from server.tools.dev_model import dev_model_cache
from server.tools.export import export_subnet
from server.vocabulary.sampling_params import SamplingParams


def ours_decode(rt: ElasticRuntime, subnet, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `tokens` greedy tokens), through the engine: the
    first step prefills and samples the first token, every later step decodes one."""
    engine = assemble_engine(rt, kv_bytes_for(rt, len(prompt) + tokens + 16))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request("bench", prompt, subnet, params)
    while not engine.step():
        pass
    t1 = time.perf_counter()
    while engine.has_work:
        engine.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def hf_load(folder: Path):
    from transformers import AutoConfig, Gemma3nForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    return Gemma3nForCausalLM.from_pretrained(
        folder, config=cfg.text_config, dtype=torch.float32
    ).eval()


def hf_decode(model, prompt: list[int], tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, (t2 - t1) - prefill


def memory_bandwidth(rt: ElasticRuntime) -> dict[str, float]:
    """GB/s of a plain read (sum of 256 MiB) and of the decode GEMV on this checkpoint's FFN
    weights as stored ([out, in]: x @ W.T) and transposed ([in, out]: x @ W)."""
    out: dict[str, float] = {}
    a = torch.ones(64 * 1024 * 1024)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        a.sum()
    out["read (sum)"] = 5 * a.nbytes / 1e9 / (time.perf_counter() - t0)
    gates = [layer.gate for layer in rt.weights.layers]
    transposed = [g.T.contiguous() for g in gates]
    x = torch.randn(1, gates[0].shape[1])
    nbytes = sum(g.nbytes for g in gates)
    for name, mats, fn in (
        ("GEMV [out, in]", gates, lambda w: x @ w.T),
        ("GEMV [in, out]", transposed, lambda w: x @ w),
    ):
        for w in mats:
            fn(w)
        t0 = time.perf_counter()
        for _ in range(3):
            for w in mats:
                fn(w)
        out[name] = 3 * nbytes / 1e9 / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", help="default: the bench dev preset (made on first use)")
    ap.add_argument("--subnets", default="full,e2b")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    checkpoint = Path(args.checkpoint) if args.checkpoint else dev_model_cache("bench")
    rt = ElasticRuntime.open(checkpoint, dtype="float32")
    names = args.subnets.split(",")
    prompt = [2] + [107 + (i * 37) % 300 for i in range(args.prompt_tokens - 1)]
    print(
        f"checkpoint {checkpoint}  torch {torch.__version__}  transformers "
        f"{transformers.__version__}  threads {args.threads}  float32"
    )
    print(f"prompt {len(prompt)} tokens, {args.tokens} greedy tokens, median of {args.repeats}\n")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        exports, export_s = {}, {}
        for name in names:
            t0 = time.perf_counter()
            exports[name] = export_subnet(
                rt.store, rt.subnets[name], Path(tmp) / name, progress=False
            )
            export_s[name] = time.perf_counter() - t0
        for name in names:
            subnet = rt.subnets[name]
            ours_decode(rt, subnet, prompt, 4)  # warm-up
            ours = [ours_decode(rt, subnet, prompt, args.tokens) for _ in range(args.repeats)]
            loads, hf = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model = hf_load(exports[name])
                loads.append(time.perf_counter() - t0)
                hf_decode(model, prompt, 2)  # warm-up
                hf.append(hf_decode(model, prompt, args.tokens))
                del model
            med = statistics.median
            rows[name] = {
                "ours_prefill": med(p for p, _ in ours),
                "ours_tps": (args.tokens - 1) / med(d for _, d in ours),
                "hf_prefill": med(p for p, _ in hf),
                "hf_tps": (args.tokens - 1) / med(d for _, d in hf),
                "hf_load": med(loads),
                "export": export_s[name],
            }

    print(
        f"{'subnet':<14}{'ours tok/s':>11}{'HF tok/s':>10}{'ratio':>7}"
        f"{'ours TTFT ms':>14}{'HF TTFT ms':>12}{'ratio':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:<14}{r['ours_tps']:>11.1f}{r['hf_tps']:>10.1f}"
            f"{r['ours_tps'] / r['hf_tps']:>7.2f}{r['ours_prefill'] * 1e3:>14.1f}"
            f"{r['hf_prefill'] * 1e3:>12.1f}{r['hf_prefill'] / r['ours_prefill']:>7.2f}"
        )
    if len(names) >= 2:
        a, b = names[0], names[1]
        print(
            f"\nwidth scaling, decode tok/s {b} / {a}: ours "
            f"{rows[b]['ours_tps'] / rows[a]['ours_tps']:.2f}, HF "
            f"{rows[b]['hf_tps'] / rows[a]['hf_tps']:.2f}; effective params "
            f"{rt.subnets[b].effective_params / rt.subnets[a].effective_params:.2f}"
        )
        ours_switch = rows[b]["ours_prefill"]
        hf_switch = rows[b]["hf_load"] + rows[b]["hf_prefill"]
        print(
            f"switch {a} -> {b} (until the first token of the new subnet): ours "
            f"{ours_switch * 1e3:.1f} ms (next request, no load), HF {hf_switch * 1e3:.1f} ms "
            f"(from_pretrained of the export {rows[b]['hf_load'] * 1e3:.0f} ms + prefill); "
            f"ratio {hf_switch / ours_switch:.1f}x"
        )
        print(f"(one-time export of {b}: {rows[b]['export'] * 1e3:.0f} ms)")
    bw = memory_bandwidth(rt)
    print("memory bandwidth, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))


if __name__ == "__main__":
    main()
