"""Replicas on Ray Serve: one engine replica vs two, and routing by headroom vs power-of-two.

Starts `concentric serve --fleet-config` on the tiny dev model (a fresh local Ray each time) and
drives it over HTTP with a fixed closed-loop load: `--clients` concurrent clients, each sending
streamed chat requests back to back (fixed prompt, `--tokens` output tokens, eos ignored through
min_tokens), a third of them gold (priority 0, TTFT target `--gold-ttft`), the rest bronze, for
`--seconds` after a warm-up. Reported per run: completed requests per second, output tokens per
second, p50/p95 time to first token by tier, and gold requests over their TTFT target.

1. Scale: 1 replica vs 2 (each `--replica-cpus` logical CPUs; on a 2-core machine both share
   the same two cores, so the ratio measures the fleet's overhead more than its scaling).
2. Routing under skewed headroom: 2 replicas, replica 0 scripted to no headroom (its memory is
   spoken for), replica 1 ample; gold SLA misses when routing by headroom vs when reports are
   never trusted (stale_after_s tiny: Ray's power-of-two choices).

    python benchmarks/bench_replicas.py [--seconds 20] [--clients 6] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "gemma-3n-tiny"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def start_fleet(
    folder: Path, checkpoint: Path, fleet: dict, keys: dict[str, str], port: int, gold_ttft: float
):
    tiers = {
        "gold": {"priority": 0, "max_concurrent": 64, "requests_per_minute": 10**6,
                 "tokens_per_minute": 10**9, "target_ttft_s": gold_ttft},
        "bronze": {"priority": 10, "max_concurrent": 64, "requests_per_minute": 10**6,
                   "tokens_per_minute": 10**9},
    }  # fmt: skip
    (folder / "tiers.yaml").write_text(yaml.safe_dump({"tiers": tiers}))
    tenants = {n: {"tier": n, "keys": [{"env": f"K_{n.upper()}"}]} for n in tiers}
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    server = {
        "checkpoint": str(checkpoint),
        "model_name": MODEL,
        "kv_cache_bytes": 32 * 1024 * 1024,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
        "max_model_len": 512,
        "tenants_file": "tenants.yaml",
        "tiers_file": "tiers.yaml",
        "custom_subnets": None,
        "log_level": "warning",
    }
    (folder / "server.yaml").write_text(yaml.safe_dump(server))
    (folder / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCENTRIC_")}
    env.update({f"K_{n.upper()}": k for n, k in keys.items()})
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    log = (folder / "fleet.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(folder / "server.yaml"),
         "--fleet-config", str(folder / "fleet.yaml"), "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((folder / "fleet.log").read_text())
        try:
            text = httpx.get(f"{base}/metrics", timeout=5).text
            if text.count("concentric_fleet_replica_info{") >= fleet["replicas"]:
                r = chat(base, keys["bronze"], 2)
                if r is not None:
                    return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the fleet did not start")


def stop_fleet(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def chat(base: str, key: str, tokens: int) -> tuple[float, int] | None:
    """One streamed request: (time to first token, output tokens), or None if it failed."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about nested models."}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    ttft = None
    usage = 0
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {key}"}, timeout=120,
    ) as r:  # fmt: skip
        if r.status_code != 200:
            return None
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return None
            if (
                ttft is None
                and event.get("choices")
                and event["choices"][0]["delta"].get("content")
            ):
                ttft = time.monotonic() - start
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.monotonic() - start), usage


def load(base: str, keys: dict[str, str]) -> dict:
    results: dict[str, list[tuple[float, int]]] = {"gold": [], "bronze": []}
    failures = 0
    stop = time.monotonic() + ARGS.warmup + ARGS.seconds
    measure_from = time.monotonic() + ARGS.warmup
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal failures
        tier = "gold" if i % 3 == 0 else "bronze"
        while time.monotonic() < stop:
            began = time.monotonic()
            r = chat(base, keys[tier], ARGS.tokens)
            if began < measure_from or time.monotonic() > stop:
                continue
            with lock:
                if r is None:
                    failures += 1
                else:
                    results[tier].append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(ARGS.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = results["gold"] + results["bronze"]
    out = {
        "requests_per_s": len(done) / ARGS.seconds,
        "tokens_per_s": sum(n for _, n in done) / ARGS.seconds,
        "failures": failures,
    }
    for tier, rs in results.items():
        ttfts = [t for t, _ in rs]
        out[f"{tier}_n"] = len(rs)
        out[f"{tier}_ttft_p50"] = percentile(ttfts, 0.5)
        out[f"{tier}_ttft_p95"] = percentile(ttfts, 0.95)
    out["gold_misses"] = sum(t > ARGS.gold_ttft for t, _ in results["gold"])
    return out


def run(name: str, checkpoint: Path, fleet: dict, script: dict | None = None) -> dict:
    keys = {n: f"sk-{n}-{secrets.token_hex(6)}" for n in ("gold", "bronze")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if script is not None:
            (folder / "headroom.json").write_text(json.dumps(script))
            fleet = {**fleet, "headroom_script": str(folder / "headroom.json")}
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc, base = start_fleet(folder, checkpoint, fleet, keys, port, ARGS.gold_ttft)
        try:
            out = load(base, keys)
        finally:
            stop_fleet(proc)
    print(
        f"{name:<28} {out['requests_per_s']:6.2f} req/s {out['tokens_per_s']:7.1f} tok/s  "
        f"gold TTFT p50/p95 {out['gold_ttft_p50']:.3f}/{out['gold_ttft_p95']:.3f} s "
        f"(n={out['gold_n']}, over {ARGS.gold_ttft:g} s: {out['gold_misses']})  "
        f"bronze p50/p95 {out['bronze_ttft_p50']:.3f}/{out['bronze_ttft_p95']:.3f} s "
        f"(n={out['bronze_n']})  failures {out['failures']}",
        flush=True,
    )
    return out


def main() -> None:
    from server.tools.dev_model import dev_model_cache

    checkpoint = dev_model_cache("tiny")
    base = {
        "replica_num_cpus": ARGS.replica_cpus,
        "ingress_num_cpus": 0.25,
        "routing_stats_period_s": 0.2,
        "gold_priority": 0,
        "min_headroom_bytes": 10**9,
    }
    print(
        f"tiny model, {ARGS.clients} closed-loop streaming clients (1/3 gold), {ARGS.tokens} "
        f"output tokens, {ARGS.seconds:g} s measured after {ARGS.warmup:g} s, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    one = run("1 replica", checkpoint, {**base, "replicas": 1})
    two = run("2 replicas", checkpoint, {**base, "replicas": 2})
    print(f"throughput ratio 2/1: {two['tokens_per_s'] / max(one['tokens_per_s'], 1e-9):.2f}")
    skew = {"0": 0, "1": 10**10}
    head = run("skewed: by headroom", checkpoint, {**base, "replicas": 2}, skew)
    pow2 = run(
        "skewed: power-of-two", checkpoint, {**base, "replicas": 2, "stale_after_s": 1e-6}, skew
    )
    print(
        f"gold over target: by headroom {head['gold_misses']}/{head['gold_n']}, "
        f"power-of-two {pow2['gold_misses']}/{pow2['gold_n']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--gold-ttft", type=float, default=0.5)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    ARGS = parser.parse_args()
    main()
