"""Helpers for tests against a live `concentric serve` process on 127.0.0.1.

Owns starting and stopping a server subprocess on the tiny dev checkpoint with test tenants and
tiers, reading its Prometheus metrics, parsing server-sent events, and the in-process reference
the live answers are compared with (greedy tokens and logprobs from `ElasticRuntime`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import yaml

if TYPE_CHECKING:
    from server.runtime.elastic import ElasticRuntime

REPO = Path(__file__).resolve().parents[2]
MODEL = "gemma-3n-tiny"  # the base model's name in the API (server.yaml: model_name)
MAX_MODEL_LEN = 512  # small, so "longer than the context" is cheap to construct
MAX_BODY_BYTES = 65536

# Tiers chosen so every limit can be hit, and its recovery seen, within a few seconds. Token
# buckets hold one minute's allowance and refill at allowance/60 per second:
# - rpm-2: a third request at once is refused, and Retry-After must say ~30 s (1 / (2/60));
# - rpm-60 (1 request/s): one request of 60 choices (15 prompts x n=4; every choice counts as a
#   request) empties the bucket at once, so the next request is refused with a Retry-After of
#   1-2 s and succeeds after it, without 60 round trips or a 30 s wait;
# - tpm-120 (2 tokens/s): a 110-token reservation leaves 10, so a 15-token one is refused for
#   ~2.5 s and succeeds after Retry-After;
# - solo: one request in flight at a time;
# - fuzz: 4 output tokens at most, so schemathesis' valid bodies stay cheap to serve;
# - strict: targets no request can meet (1 ms), so every request it finishes is an SLA miss and
#   a downgrade; one request at a time, so a second is a 429. Least important (priority 9), so
#   the sla policy never holds other tiers' requests back for it.
# - hostile: the attacker of test_hostile.py: generous rates (so its attacks are refused for
#   what they are, not for their rate), 4 choices in flight, prompts of up to 16384 tokens (so
#   long prompts pass the character cap and really get tokenized), 16 output tokens.
TIERS: dict[str, dict[str, Any]] = {
    "premium": {
        "priority": 0,
        "subnets": ["*"],
        "max_concurrent": 128,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
        "max_prompt_tokens": 8192,
        "max_output_tokens": 256,
    },
    "restricted": {"priority": 5, "subnets": ["e2b"], "max_concurrent": 16},
    "rpm-2": {"requests_per_minute": 2},
    "rpm-60": {"requests_per_minute": 60, "max_concurrent": 128},
    "tpm-120": {"tokens_per_minute": 120},
    "solo": {"max_concurrent": 1},
    "fuzz": {
        "max_concurrent": 64,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
        "max_prompt_tokens": 512,
        "max_output_tokens": 4,
    },
    "strict": {
        "priority": 9,
        "max_concurrent": 1,
        "target_ttft_s": 0.001,
        "target_tpot_s": 0.001,
    },
    "hostile": {
        "priority": 5,
        "max_concurrent": 4,
        "requests_per_minute": 100_000,
        "tokens_per_minute": 100_000_000,
        "max_prompt_tokens": 16384,
        "max_output_tokens": 16,
    },
}
TENANTS = {
    "alice": "premium",
    "carol": "premium",
    "bob": "restricted",
    "rpm2": "rpm-2",
    "rpm60": "rpm-60",
    "tpm": "tpm-120",
    "solo": "solo",
    "fuzz": "fuzz",
    "strict": "strict",
    "mallory": "hostile",
    "trudy": "hostile",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    keys: dict[str, str]  # tenant -> API key
    proc: subprocess.Popen[bytes]
    log: Path
    model: str = MODEL
    _log_file: Any = field(default=None, repr=False)

    def headers(self, tenant: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def client(self, tenant: str = "alice", **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(tenant), timeout=60, **kw)

    def openai(self, tenant: str = "alice") -> openai.OpenAI:
        # max_retries=0: the client would otherwise retry 429s and 5xx behind the test's back.
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=60
        )

    def langchain(self, model: str, tenant: str = "alice", **kw: Any):
        """LangChain's `ChatOpenAI` on this server (imported here: only its tests need it)."""
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            model=model,
            base_url=f"{self.base_url}/v1",
            api_key=self.keys[tenant],
            max_retries=0,
            timeout=60,
            **kw,
        )

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics (gauges and counters), by name."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        return {
            name: float(value)
            for name, value in re.findall(r"^(concentric_[a-z_]+) (\S+)$", text, re.M)
        }

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()


def write_config(folder: Path, checkpoint: Path, **settings: Any) -> Path:
    """server.yaml, tiers.yaml and tenants.yaml in `folder`; keys come from K_<TENANT>."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiers.yaml").write_text(yaml.safe_dump({"tiers": TIERS}))
    tenants = {
        name: {"tier": tier, "keys": [{"env": f"K_{name.upper()}"}]}
        for name, tier in TENANTS.items()
    }
    (folder / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    config = {
        "checkpoint": str(checkpoint),
        "model_name": MODEL,
        "kv_cache_bytes": 16 * 1024 * 1024,
        "max_num_seqs": 64,  # 50 concurrent streams fit in one batch
        "max_num_batched_tokens": 512,
        "max_prefill_chunk": 128,
        "max_model_len": MAX_MODEL_LEN,
        "tenants_file": "tenants.yaml",  # relative: resolved against this file's folder
        "tiers_file": "tiers.yaml",
        "max_body_bytes": MAX_BODY_BYTES,
        "max_n": 8,
        "drain_timeout_s": 30,
        "log_level": "warning",
        **settings,
    }
    path = folder / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_server(
    folder: Path, checkpoint: Path, timeout: float = 60, **settings: Any
) -> LiveServer:
    """Start `python -m server serve` on a free port and wait until /ready is 200."""
    server = launch_server(folder, checkpoint, **settings)
    wait_ready(
        "the server", server.proc, f"{server.base_url}/ready", server.stop, server.log_text, timeout
    )
    return server


def launch_server(folder: Path, checkpoint: Path, **settings: Any) -> LiveServer:
    """Start `python -m server serve` on a free port, without waiting for anything."""
    config = write_config(folder, checkpoint, **settings)
    keys = {name: f"sk-{name}-{secrets.token_hex(8)}" for name in TENANTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCENTRIC_")}
    env.update({f"K_{name.upper()}": key for name, key in keys.items()})
    # Two cores: the server must not spin OpenMP threads against the test process.
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    port = free_port()
    log = folder / "server.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return LiveServer(f"http://127.0.0.1:{port}", keys, proc, log, _log_file=log_file)


def wait_ready(what: str, proc: subprocess.Popen, url: str, stop, log_text, timeout: float) -> None:
    """Poll `url` until it answers 200; if the process dies or time runs out, stop it and raise
    with its log."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            stop()
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"{what} was not ready in {timeout} s:\n{log_text()}")
        time.sleep(0.2)


def sse_events(lines: Iterable[str]) -> list[Any]:
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]` (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI error envelope of a response, checked for shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- the in-process reference --------------------------------------------------------------


@dataclass
class Reference:
    tokens: list[int]  # greedy tokens, the stop token included when it ended the generation
    finish_reason: str
    logprobs: list[float]  # the chosen token's log-probability per step
    top: list[list[tuple[int, float]]]  # the top k (id, logprob) per step, highest first
    # How far the server's float32 logprobs may lie from these: log_softmax moves by at most
    # twice the largest logit change, and logits by the suite's float32 bound (measured against
    # float64, tests/runtime/conftest.py). Only computed when a float64 runtime is given.
    logprob_bound: float | None = None


def reference(
    rt: ElasticRuntime,
    subnet: str,
    prompt_ids: Sequence[int],
    max_tokens: int,
    k: int = 0,
    rt64: ElasticRuntime | None = None,
) -> Reference:
    """Greedy generation alone in the in-process runtime, with logprobs as the server defines
    them: log_softmax of the raw logits over the text vocabulary."""
    import torch

    from server.engine.offline import GenerationRequest
    from server.vocabulary.sampling_params import SamplingParams
    from tests.runtime.conftest import alone, decode_reference, float32_bound

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    result = alone(rt, GenerationRequest(rt.subnets[subnet], list(prompt_ids), params), True)
    vocab = rt.store.text.vocab_size_per_layer_input
    lps, tops = [], []
    for token, logits in zip(result.token_ids, result.logits, strict=True):
        lp = torch.log_softmax(logits[:vocab].float(), dim=0)
        lps.append(float(lp[token]))
        values, ids = torch.topk(lp, k) if k else (torch.empty(0), torch.empty(0))
        tops.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    bound = None
    if rt64 is not None:
        exact = decode_reference(rt64, rt.subnets[subnet], list(prompt_ids), result.token_ids)
        bound = 2 * float32_bound(torch.stack(result.logits)[:, :vocab], exact[:, :vocab])
    return Reference(list(result.token_ids), result.finish_reason, lps, tops, bound)


def token_text(rt: ElasticRuntime, token_id: int) -> str:
    """A token as the API shows it in logprobs (special tokens spelled out)."""
    return rt.tokenizer.decode([token_id], skip_special_tokens=False)


def text_of(rt: ElasticRuntime, token_ids: Sequence[int]) -> str:
    """The text the server streams for these generated ids. That is the engine's incremental
    detokenizer's, which equals decode(all ids) except in its documented corner (byte-fallback
    runs of random weights, e.g. an ASCII byte token before an invalid byte: decode() turns the
    whole run into U+FFFD, the stream keeps the ASCII); so it is the reference, and the ids
    themselves are checked through the per-token logprob entries."""
    from server.engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(rt.tokenizer)
    for t in token_ids:
        detok.push(t)
    detok.finish()
    return detok.text
