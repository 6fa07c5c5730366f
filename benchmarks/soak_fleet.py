"""Does the fleet keep serving under sustained saturating load? Completed requests per window.

Starts `concentric serve --fleet-config` (tiny dev model, `--replicas` engine replicas, fresh
local Ray) through bench_replicas.start_fleet and drives it for `--seconds` with `--clients`
closed-loop clients, alternately streaming and non-streaming, a third of them gold, each
sending its next request as soon as the last one ends (min_tokens = max_tokens = `--tokens`).
Prints the requests completed and failed in every `--window` seconds; exits 1 if any whole
window completed none (the fleet stalled), as the router did before it served every waiting
request (server/fleet/replica_router.py).

    python benchmarks/soak_fleet.py [--seconds 90] [--clients 12] [--replicas 1]
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_replicas import MODEL, chat, start_fleet, stop_fleet


def complete(base: str, key: str, tokens: int) -> bool:
    """One non-streamed request; True if it completed."""
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about nested models."}],
            "max_tokens": tokens,
            "min_tokens": tokens,
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    return r.status_code == 200


def main(args: argparse.Namespace) -> int:
    from server.tools.dev_model import dev_model_cache

    fleet = {
        "replicas": args.replicas,
        "replica_num_cpus": 0.5,
        "ingress_num_cpus": 0.25,
        "routing_stats_period_s": 0.2,
        "gold_priority": 0,
        "min_headroom_bytes": 0,
    }
    keys = {n: f"sk-{n}-{secrets.token_hex(6)}" for n in ("gold", "bronze")}
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        proc, base = start_fleet(Path(tmp), dev_model_cache("tiny"), fleet, keys, port, 0.5)
        try:
            return drive(base, keys, args)
        finally:
            stop_fleet(proc)


def drive(base: str, keys: dict[str, str], args: argparse.Namespace) -> int:
    done: list[float] = []
    failed: list[float] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + args.seconds

    def client(i: int) -> None:
        key = keys["gold" if i % 3 == 0 else "bronze"]
        while time.monotonic() < stop:
            try:
                ok = (
                    chat(base, key, args.tokens) is not None
                    if i % 2 == 0
                    else complete(base, key, args.tokens)
                )
            except httpx.HTTPError:
                ok = False
            with lock:
                (done if ok else failed).append(time.monotonic() - start)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        f"{args.replicas} replica(s), {args.clients} clients (half streaming), {args.tokens} "
        f"tokens, {args.seconds:g} s",
        flush=True,
    )
    stalled = 0
    w = 0.0
    while w + args.window <= args.seconds:
        n = sum(w <= t < w + args.window for t in done)
        f = sum(w <= t < w + args.window for t in failed)
        stalled += n == 0
        print(f"  {w:5.0f}-{w + args.window:<5.0f}s  {n:4d} completed  {f:3d} failed", flush=True)
        w += args.window
    print(f"total {len(done)} completed, {len(failed)} failed; windows with none: {stalled}")
    return 1 if stalled else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--window", type=float, default=10)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    sys.exit(main(parser.parse_args()))
