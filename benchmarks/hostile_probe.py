"""Issue 10's attacks against a live server, one line of status, time and RSS each.

Usage: python benchmarks/hostile_probe.py CHECKOUT CHECKPOINT FINDING...

CHECKOUT is a checkout of this repository (run it on two, e.g. a worktree at the commit before
a fix and one after, to compare); the server is started from it with its own tests/api/live.py
(test tenants and tiers). CHECKPOINT is a tiny dev checkpoint
(`concentric make-dev-model --preset tiny --out DIR`).
FINDING: 1 2 3 3b 4 5 6 7 8 9 9h 10 11 (the numbers of the issue; 3b: long prompts that get
tokenized; 9h: /health after a failed load). Every victim latency is the bystander tenant's
(alice) worst single request while the attack ran. Not a test: numbers, not verdicts.
"""

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(sys.argv[1]).resolve()
CKPT = Path(sys.argv[2]).resolve()
sys.path.insert(0, str(REPO))
os.chdir(REPO)

import httpx  # noqa: E402

from tests.api.live import MODEL, start_server  # noqa: E402


def rss(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) // 1024
    return out


def hostport(s):
    h, p = s.base_url.removeprefix("http://").split(":")
    return h, int(p)


def victim_latency(s, n=5):
    lat = []
    with s.client("alice") as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": [2, 300], "max_tokens": 1},
            )
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return max(lat)


def watch_victim(s, stop_evt, out):
    with s.client("alice") as c:
        while not stop_evt.is_set():
            t = time.perf_counter()
            c.post("/v1/completions", json={"model": MODEL, "prompt": [2, 300], "max_tokens": 1})
            out.append(time.perf_counter() - t)
            time.sleep(0.02)


def with_victim(s, fn):
    evt, lat = threading.Event(), []
    th = threading.Thread(target=watch_victim, args=(s, evt, lat))
    th.start()
    time.sleep(0.3)
    try:
        res = fn()
    finally:
        evt.set()
        th.join()
    return res, max(lat) if lat else None


def p1(s):
    base = victim_latency(s)
    print(f"[1] victim max latency idle: {base:.3f}s")
    for n in (2000, 4000, 8000, 16000):
        before = rss(s.proc.pid)
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stop": ["x" * n]}

        def go(body=body):
            t = time.perf_counter()
            with s.client("bob") as c:
                r = c.post("/v1/completions", json=body)
            return r.status_code, time.perf_counter() - t

        (status, dt), vic = with_victim(s, go)
        after = rss(s.proc.pid)
        print(
            f"[1] stop string of {n} chars: status {status}, {dt:.2f}s, victim max {vic:.2f}s, "
            f"RSS {before['VmRSS']}->{after['VmRSS']} MiB, peak {after['VmHWM']} MiB"
        )


def p2(s):
    h, p = hostport(s)
    size = 20 * 1024 * 1024
    before = rss(s.proc.pid)

    def go():
        t = time.perf_counter()
        sock = socket.create_connection((h, p))
        sock.settimeout(60)
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {s.keys['bob']}\r\n".encode()
            + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head)
        payload = b'{"model": "gemma-3n-tiny", "prompt": "' + b"a" * size + b'", "max_tokens": 1}'
        step = 1 << 20
        status = None
        try:
            for i in range(0, len(payload), step):
                part = payload[i : i + step]
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError as e:
            status = f"send stopped ({type(e).__name__})"
        try:
            data = sock.recv(200)
            status = (status or "") + " " + data.split(b"\r\n")[0].decode()
        except OSError as e:
            status = (status or "") + f" recv {type(e).__name__}"
        sock.close()
        return status, time.perf_counter() - t

    (status, dt), vic = with_victim(s, go)
    after = rss(s.proc.pid)
    print(
        f"[2] CL:10 + chunked 20 MiB: {status}, {dt:.2f}s, victim max {vic:.2f}s, "
        f"RSS {before['VmRSS']}->{after['VmRSS']} MiB, peak {after['VmHWM']} MiB"
    )


def p3(s):
    base = victim_latency(s)
    text = "hello world the quick brown fox " * (1_000_000 // 32)
    before = rss(s.proc.pid)

    async def flood():
        async with httpx.AsyncClient(
            base_url=s.base_url, headers=s.headers("bob"), timeout=120
        ) as c:
            rs = await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}
                    )
                    for _ in range(20)
                )
            )
        return sorted({r.status_code for r in rs})

    def go():
        t = time.perf_counter()
        st = asyncio.run(flood())
        return st, time.perf_counter() - t

    (st, dt), vic = with_victim(s, go)
    after = rss(s.proc.pid)
    print(
        f"[3] 20 x 1 MB prompts: statuses {st}, {dt:.2f}s; "
        f"victim max {vic:.2f}s (idle {base:.3f}s); "
        f"RSS {before['VmRSS']}->{after['VmRSS']} MiB, peak {after['VmHWM']} MiB"
    )


def p3b(s):
    base = victim_latency(s)
    text = "hello world the quick brown fox " * (250_000 // 32)
    before = rss(s.proc.pid)

    async def flood():
        async with httpx.AsyncClient(
            base_url=s.base_url, headers=s.headers("bob"), timeout=120
        ) as c:
            rs = await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}
                    )
                    for _ in range(20)
                )
            )
        return sorted({r.status_code for r in rs})

    def go():
        t = time.perf_counter()
        st = asyncio.run(flood())
        return st, time.perf_counter() - t

    (st, dt), vic = with_victim(s, go)
    after = rss(s.proc.pid)
    print(
        f"[3b] 20 x 250K-char prompts (tokenized, then too many tokens): statuses {st}, {dt:.2f}s; "
        f"victim max {vic:.2f}s (idle {base:.3f}s); "
        f"RSS {before['VmRSS']}->{after['VmRSS']} MiB, peak {after['VmHWM']} MiB"
    )


def _saturate(s, count=64):
    """Long streams from alice that fill max_num_seqs, so later requests queue."""
    socks = []
    h, p = hostport(s)
    for i in range(count):
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": f"x{i}",
                "max_tokens": 200,
                "min_tokens": 200,
                "stream": True,
            }
        ).encode()
        sock = socket.create_connection((h, p))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {s.keys['alice']}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        socks.append(sock)
    return socks


def p4(s):
    h, p = hostport(s)
    for mode in ("json", "stream"):
        for _ in range(4):
            socks = _saturate(s)
            time.sleep(0.5)
            body = json.dumps(
                {
                    "model": MODEL,
                    "prompt": "hi",
                    "n": 4,
                    "max_tokens": 5,
                    "stream": mode == "stream",
                }
            ).encode()
            sock = socket.create_connection((h, p))
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {s.keys['bob']}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.3)
            sock.close()
            for x in socks:
                x.close()
            time.sleep(0.5)
        time.sleep(1.0)
        with s.client("bob") as c:
            r = c.post(
                "/v1/completions", json={"model": MODEL, "prompt": [[2, 300]] * 16, "max_tokens": 1}
            )
        msg = r.json()["error"]["message"] if r.status_code != 200 else ""
        print(
            f"[4] after 4 disconnected n=4 ({mode}) requests: 16 choices (the tier's "
            f"max_concurrent) from the same tenant -> {r.status_code} {msg}"
        )
        if r.status_code != 200:
            return


def p5(s):
    # own server: drain_timeout_s=3
    h, p = hostport(s)
    socks = _saturate(s, 64)
    time.sleep(1.0)
    # queued non-streaming requests (from carol, premium; all seqs busy)
    queued = []
    for i in range(3):
        body = json.dumps(
            {"model": MODEL, "prompt": f"q{i}", "max_tokens": 200, "min_tokens": 200}
        ).encode()
        sock = socket.create_connection((h, p))
        sock.settimeout(60)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {s.keys['carol']}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        queued.append(sock)
    time.sleep(0.5)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(120)
    exit_s = time.monotonic() - t0
    statuses = []
    for q in queued:
        try:
            data = b""
            while True:
                chunk = q.recv(65536)
                if not chunk:
                    break
                data += chunk
            statuses.append(
                data.split(b"\r\n")[0].decode()
                + " | "
                + data.split(b"\r\n\r\n", 1)[-1][:80].decode(errors="replace")
            )
        except OSError as e:
            statuses.append(type(e).__name__)
    ends = []
    for x in socks[:2]:
        data = b""
        try:
            while True:
                chunk = x.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        tail = data[-200:].decode(errors="replace").replace("\r\n", " ").replace("\n", " ")
        ends.append(tail[-120:])
    log = s.log_text()
    print(f"[5] drain_timeout_s=3: exit after {exit_s:.1f}s; queued got: {statuses}")
    print(f"[5] stream ends: {ends}")
    print(f"[5] log: {log.count('Traceback')} tracebacks, {log.count('ERROR')} ERROR lines")


def p6(s):
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 3,
        "min_tokens": 2,
        "stop_token_ids": list(range(512)),
    }
    with s.client("alice") as c:
        r = c.post("/v1/completions", json=body)
        print(
            f"[6] min_tokens + stop_token_ids covering the vocabulary: "
            f"{r.status_code} {r.text[:160]}"
        )
        r = c.post("/v1/completions", json={**body, "stream": True})
        print(f"[6] ... streamed: {r.status_code} {r.text[:200]!r}")


def p7(s):
    with s.client("rpm2") as c:
        bad = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "logit_bias": {"abc": 1}}
        a = c.post("/v1/completions", json=bad)
        b = c.post("/v1/completions", json=bad)
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    print(
        f"[7] rpm-2 tier: two invalid ({a.status_code}, {b.status_code}) then a valid one: "
        f"{ok.status_code} {ok.text[:120]}"
    )


def p8(s):
    h, p = hostport(s)
    results = {}

    def idle():
        sock = socket.create_connection((h, p))
        sock.settimeout(40)
        t = time.monotonic()
        try:
            data = sock.recv(100)
            return f"closed after {time.monotonic() - t:.1f}s ({data[:30]!r})"
        except TimeoutError:
            return "still open after 40 s"
        finally:
            sock.close()

    def slow_headers():
        sock = socket.create_connection((h, p))
        sock.settimeout(1)
        t = time.monotonic()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
        try:
            for b in head:
                sock.sendall(bytes([b]))
                try:
                    data = sock.recv(100)
                    return f"closed after {time.monotonic() - t:.1f}s ({data[:30]!r})"
                except TimeoutError:
                    pass
                if time.monotonic() - t > 40:
                    break
            return "still open after 40 s"
        except OSError as e:
            return f"closed after {time.monotonic() - t:.1f}s ({type(e).__name__})"
        finally:
            sock.close()

    def slow_body():
        sock = socket.create_connection((h, p))
        sock.settimeout(1)
        t = time.monotonic()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {s.keys['alice']}\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        try:
            while time.monotonic() - t < 40:
                sock.sendall(b" ")
                try:
                    data = sock.recv(100)
                    return f"closed after {time.monotonic() - t:.1f}s ({data[:30]!r})"
                except TimeoutError:
                    pass
            return "still open after 40 s"
        except OSError as e:
            return f"closed after {time.monotonic() - t:.1f}s ({type(e).__name__})"
        finally:
            sock.close()

    ths = []
    for name, fn in (("idle", idle), ("slow headers", slow_headers), ("slow body", slow_body)):
        th = threading.Thread(target=lambda n=name, f=fn: results.__setitem__(n, f()))
        th.start()
        ths.append(th)
    for th in ths:
        th.join()
    for k, v in results.items():
        print(f"[8] {k}: {v}")


def p9(s):
    with s.client("bob") as c:
        roots = [m.get("root") for m in c.get("/v1/models").json()["data"][:1]]
    print(f"[9] /v1/models root of the base model: {roots}")
    h, p = hostport(s)
    sock = socket.create_connection((h, p))
    sock.sendall(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        + f"Authorization: Bearer {s.keys['alice']}\r\n\r\n".encode()
    )
    line = sock.recv(100).split(b"\r\n")[0].decode()
    print(f"[9] two Authorization headers (bad, good): {line}")
    sock.close()


def p9_health(tmp):
    # device cuda on a CPU-only torch: the load fails after the config is checked
    import subprocess

    from tests.api.live import free_port, write_config

    cfg = write_config(tmp / "cfg9", CKPT, device="cuda")  # CPU-only torch: the load fails
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCENTRIC_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(cfg), "--port", str(port)],
        cwd=REPO,
        env={**env, **{f"K_{n.upper()}": "x" for n in ("alice",)}},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 503:
                    print(
                        "[9] /health after a failed load, unauthenticated: "
                        f"{r.status_code} {r.text[:200]}"
                    )
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            print("[9] health: server never reported the failed load")
    finally:
        proc.terminate()
        proc.wait(10)


def p10(s):
    with s.client("alice") as c:

        def usage(content):
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 1,
                },
            )
            return r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else r.status_code

        plain = usage("hi start_of_turn")
        forged = usage("hi <start_of_turn>")
        modal = usage("hi <start_of_image>")
        print(
            f"[10] chat prompt tokens: 'hi start_of_turn' {plain}, "
            f"'hi <start_of_turn>' {forged}, 'hi <start_of_image>' {modal}"
        )
        a = c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 1}
        ).json()
        b = c.post(
            "/v1/completions", json={"model": MODEL, "prompt": "<bos>hello", "max_tokens": 1}
        ).json()
        print(
            f"[10] completions prompt tokens: 'hello' {a['usage']['prompt_tokens']}, "
            f"'<bos>hello' {b['usage']['prompt_tokens']}"
        )


def p11(s):
    h, p = hostport(s)
    with s.client("alice") as c:
        r = c.post(
            "/v1/completions",
            content=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}),
            headers={"content-type": "text/plain"},
        )
        print(f"[11] JSON as text/plain: {r.status_code} {r.json()['error']['message']!r}")
        r = c.post("/v1/completions", content=b"", headers={"content-type": "application/json"})
        print(
            f"[11] empty body: {r.status_code} {r.json()['error']['message']!r} "
            f"param={r.json()['error']['param']!r}"
        )
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": None}]},
        )
        print(
            f"[11] content null: {r.status_code} {r.json()['error']['message']!r} "
            f"param={r.json()['error']['param']!r}"
        )
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
        )
        print(
            f"[11] image part: {r.status_code} {r.json()['error']['message']!r} "
            f"param={r.json()['error']['param']!r}"
        )
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 100000,
            },
        )
        print(f"[11] max_tokens over tier: {r.status_code} {r.json()['error']['message']!r}")
    sock = socket.create_connection((h, p))
    sock.sendall(
        b"GET /v1/models/ HTTP/1.1\r\nHost: evil.example\r\n"
        + f"Authorization: Bearer {s.keys['alice']}\r\n\r\n".encode()
    )
    data = sock.recv(1000).decode(errors="replace")
    loc = [line for line in data.split("\r\n") if line.lower().startswith("location")]
    print(f"[11] GET /v1/models/ with Host: evil.example: {data.splitlines()[0]} {loc}")
    sock.close()


def main():
    import tempfile

    findings = sys.argv[3:]
    tmp = Path(tempfile.mkdtemp(prefix="hostile-probe-"))
    if "9h" in findings:
        p9_health(tmp)
    shared = [f for f in findings if f not in ("5", "9h")]
    if shared:
        s = start_server(
            tmp / "srv", CKPT, max_body_bytes=2_200_000 if {"3", "3b", "2"} & set(shared) else 65536
        )
        try:
            for f in shared:
                globals()[f"p{f}"](s)
        finally:
            s.stop()
    if "5" in findings:
        s = start_server(tmp / "drain", CKPT, drain_timeout_s=3)
        try:
            p5(s)
        finally:
            s.stop()


main()
