"""The `concentric` command line.

Owns argument parsing and turning the runtime's errors into one clear line and exit status 2
(never a traceback for a user mistake). Each subcommand is a thin call into the layer that does
the work.

Deliberately does not know: any model math, or how subnets are validated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.vocabulary.compute import COMPUTE_DTYPES
from server.vocabulary.subnets import DEFAULT_CUSTOM_YAML

# Errors a user can cause, reported as one line (their classes live in the runtime).
# NotADirectoryError: an --out that is an existing file.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileExistsError,
    NotADirectoryError,
    MemoryError,
)


def _checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from server.tools.dev_model import default_dev_checkpoint

    folder = default_dev_checkpoint()
    print(f"(no --checkpoint: using the built-in dev model at {folder})", file=sys.stderr)
    return folder


def _custom(args: argparse.Namespace) -> Path | None:
    if getattr(args, "no_custom", False):
        return None
    return Path(args.custom) if getattr(args, "custom", None) else DEFAULT_CUSTOM_YAML


def cmd_make_dev_model(args: argparse.Namespace) -> int:
    from server.tools.dev_model import make_dev_model

    t0 = time.perf_counter()
    out = make_dev_model(args.preset, args.out, progress=not args.quiet)
    print(f"wrote dev model {args.preset!r} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train_dev_model(args: argparse.Namespace) -> int:
    import dataclasses

    from server.tools import trained_preset, training

    plan = training.TrainPlan()
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.cooldown_start is not None:
        plan = dataclasses.replace(
            plan, cooldown_start=args.cooldown_start, cooldown_steps=args.cooldown_steps
        )
    torch_threads(args.threads)
    max_s = None if args.max_minutes is None else args.max_minutes * 60
    state = training.train(Path(args.work), plan, max_seconds=max_s)
    import torch

    step = torch.load(state, weights_only=False)["step"]
    print(f"trained to step {step}/{plan.total_steps}; run state in {state}")
    if args.out and (step >= plan.total_steps or args.package_partial):
        metrics = trained_preset.package(Path(args.work), Path(args.out), plan, args.threads)
        print(f"wrote the trained preset to {args.out}: {json.dumps(metrics['ci_check'])}")
    elif args.out:
        print("not packaged: the run is unfinished (run again to resume, or --package-partial)")
    return 0


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def cmd_measure_quality(args: argparse.Namespace) -> int:
    from server.tools.quality import measure_quality

    names = args.subnets.split(",") if args.subnets else None
    doc = measure_quality(_checkpoint(args), names, write=not args.dry_run)
    for name, rec in doc["subnets"].items():
        print(f"{name:16s} perplexity {rec['perplexity']:9.3f}  top-1 {rec['top1']:.4f}")
    print(f"({doc['tokens']} held-out tokens; {doc['description']})")
    return 0


def cmd_subnets(args: argparse.Namespace) -> int:
    from server.checkpoint.store import CheckpointStore
    from server.vocabulary.measured_quality import read_measured_quality
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV, format_table, load_subnet_table

    store = CheckpointStore.open(_checkpoint(args))
    table = load_subnet_table(
        store.text, DEFAULT_TABLE_CSV, _custom(args), read_measured_quality(store.folder)
    )
    print(format_table(table))
    return 0


def _offline_engine(rt, requests):
    from server.engine.assembly import assemble_engine, kv_bytes_for

    # Each sequence may need one partly filled block per layer beyond its tokens.
    tokens = sum(len(r.prompt_ids) + r.params.max_tokens + 16 for r in requests)
    return assemble_engine(rt, kv_bytes_for(rt, tokens))


def cmd_generate(args: argparse.Namespace) -> int:
    """One prompt through the serving engine (the same sampler, seeds and stops as the server)."""
    from server.engine.offline import GenerationRequest, generate
    from server.runtime.elastic import ElasticRuntime
    from server.vocabulary.sampling_params import SamplingParams

    rt = ElasticRuntime.open(_checkpoint(args), args.dtype, args.device, _custom(args))
    subnet = rt.subnets.get(args.subnet)
    if args.chat:
        prompt_ids = rt.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = rt.tokenizer.encode(args.prompt)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    request = GenerationRequest(subnet, prompt_ids, params)
    t0 = time.perf_counter()
    [result] = generate(_offline_engine(rt, [request]), [request])
    elapsed = time.perf_counter() - t0
    if result.error:
        raise ValueError(f"generation failed: {result.error}")
    if args.json:
        record = {
            "subnet": subnet.name,
            "prompt_token_ids": prompt_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "seconds": round(elapsed, 4),
        }
        if args.logprobs is not None:
            record["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                for lp in result.logprobs
            ]
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(result.text)
        print(
            f"[{subnet.name}: {len(result.token_ids)} tokens in {elapsed:.2f} s, "
            f"{result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from server.checkpoint.store import CheckpointStore
    from server.tools.export import export_subnet
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV, load_subnet_table

    store = CheckpointStore.open(_checkpoint(args))
    table = load_subnet_table(store.text, DEFAULT_TABLE_CSV, _custom(args))
    subnet = table.get(args.subnet)
    out = export_subnet(
        store, subnet, args.out, int(args.max_shard_gb * 1024**3), progress=not args.quiet
    )
    print(
        f"exported subnet {subnet.name!r} ({len(subnet.layers)} layers, "
        f"{subnet.effective_params / 1e9:.3f} B effective parameters) to {out}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Several subnets of one checkpoint answering one prompt, in one batch."""
    from server.engine.offline import GenerationRequest, generate
    from server.runtime.elastic import ElasticRuntime
    from server.vocabulary.sampling_params import SamplingParams

    rt = ElasticRuntime.open(_checkpoint(args), args.dtype, args.device, _custom(args))
    names = args.subnets.split(",") if args.subnets else [s.name for s in rt.subnets][:4]
    subnets = [rt.subnets.get(n) for n in names]
    prompt_ids = rt.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    requests = [GenerationRequest(s, prompt_ids, params) for s in subnets]
    t0 = time.perf_counter()
    results = generate(_offline_engine(rt, requests), requests)
    elapsed = time.perf_counter() - t0
    print(f"prompt: {args.prompt!r} ({len(prompt_ids)} tokens); checkpoint {rt.store.folder}")
    if rt.subnets.quality_source == "measured":
        print(
            "(every subnet is served from one weight copy, in one batch; each one's held-out "
            "perplexity is shown: narrower is cheaper and a little worse)"
        )
    else:
        print(
            "(random dev weights: the text is noise; what matters is that every subnet is "
            "served from one weight copy, in one batch)"
        )
    for s, r in zip(subnets, results, strict=True):
        m = rt.subnets.measured.get(s.name)
        ppl = f", held-out perplexity {m.perplexity:.1f}" if m else ""
        print(
            f"\n[{s.name}] {s.effective_params / 1e6:.1f} M effective params, "
            f"{len(s.layers)} layers{ppl}:\n  {r.text!r}"
        )
    total = sum(len(r.token_ids) for r in results)
    print(f"\n{total} tokens for {len(subnets)} subnets in {elapsed:.2f} s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from server.tools.memory_plan import format_plan, plan
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV, load_subnet_table
    from server.vocabulary.text_config import read_checkpoint_config

    text = read_checkpoint_config(_checkpoint(args)).text  # the config alone: no weights read
    table = load_subnet_table(text, DEFAULT_TABLE_CSV, _custom(args))
    if args.kv_tokens < 0:
        raise ValueError("--kv-tokens must be >= 0")
    print(format_plan(plan(text, table, args.kv_tokens, args.dtype), args.kv_tokens, args.dtype))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.api.serve import serve
    from server.config import flag_overrides, load_config

    config = load_config(args.config, overrides=flag_overrides(args))
    if args.replicas is None and args.fleet_config is None:
        serve(config)  # one process: the default
        return 0
    # N engine replicas on Ray Serve behind one ingress (pip install concentric[ray]).
    from server.fleet.application import serve_fleet
    from server.fleet.fleet_config import load_fleet_config

    serve_fleet(config, load_fleet_config(args.fleet_config, replicas=args.replicas))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from server.tenancy import hash_key

    print(hash_key(args.key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concentric",
        description="Elastic inference server for Gemma 3n: every MatFormer subnet served as a "
        "view of one checkpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, runtime: bool = True) -> None:
        p.add_argument("--checkpoint", help="checkpoint folder (default: the built-in dev model)")
        p.add_argument("--custom", help=f"custom subnets YAML (default: {DEFAULT_CUSTOM_YAML})")
        p.add_argument("--no-custom", action="store_true", help="offer no custom subnets")
        if runtime:
            p.add_argument(
                "--dtype",
                default="auto",
                choices=COMPUTE_DTYPES,
                help="compute dtype (auto: as stored)",
            )
            p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")

    p = sub.add_parser("make-dev-model", help="write a random-weight Gemma 3n dev checkpoint")
    p.add_argument("--preset", required=True, choices=["tiny", "mini", "bench", "bench-262k"])
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_make_dev_model)

    p = sub.add_parser(
        "train-dev-model",
        help="train the small dev model that speaks (deterministic; resumes from --work)",
    )
    p.add_argument("--work", required=True, help="corpus, tokenizer, tokens and run state")
    p.add_argument("--out", help="write the finished run here as the `trained` preset")
    p.add_argument("--steps", type=int, help="total steps (default: the plan's)")
    p.add_argument("--cooldown-start", type=int, help="end early: decay the rate from this step")
    p.add_argument("--cooldown-steps", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--package-partial", action="store_true", help="package an unfinished run")
    p.set_defaults(func=cmd_train_dev_model)

    p = sub.add_parser(
        "measure-quality",
        help="held-out perplexity of every subnet, stored beside the checkpoint "
        "(subnet_quality.json: the subnet table's quality scores from then on)",
    )
    model_args(p, runtime=False)
    p.add_argument("--subnets", help="comma-separated subnet names (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print only; write nothing")
    p.set_defaults(func=cmd_measure_quality)

    p = sub.add_parser("subnets", help="print the subnet table of a checkpoint")
    model_args(p, runtime=False)
    p.set_defaults(func=cmd_subnets)

    p = sub.add_parser(
        "generate",
        help="complete one prompt with one subnet (the server's engine and sampler: the same "
        "seed and parameters give the same tokens as the HTTP API)",
    )
    model_args(p)
    p.add_argument("--subnet", default="full", help="subnet name (default: %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (= --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="(default: %(default)s: no limit)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="(default: %(default)s: none)"
    )
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--logprobs", type=int, help="top logprobs per token, printed with --json")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write one subnet as a standalone HF checkpoint")
    model_args(p, runtime=False)
    p.add_argument("--subnet", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=4.0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    from server.config import DEFAULT_CONFIG, add_flags

    p = sub.add_parser("serve", help="run the OpenAI-compatible server")
    p.add_argument("--config", help=f"server config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument(
        "--replicas",
        type=int,
        help="run N engine replicas on Ray Serve behind one ingress (needs concentric[ray])",
    )
    p.add_argument("--fleet-config", help="fleet settings YAML (replicas, routing, limits)")
    add_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plan", help="print the memory plan per subnet (no weights read)")
    model_args(p, runtime=False)
    p.add_argument("--kv-tokens", type=int, default=8192, help="KV cache token positions")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("hash-key", help="print the SHA-256 of an API key, for tenants.yaml")
    p.add_argument("key")
    p.set_defaults(func=cmd_hash_key)

    p = sub.add_parser("demo", help="several subnets answer one prompt in one batch")
    model_args(p)
    p.add_argument("--prompt", default="Tell me about nested models.")
    p.add_argument("--subnets", help="comma-separated subnet names (default: the first four)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", 1) < 1:
        print("concentric: error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except _USER_ERRORS as e:
        print(f"concentric: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
