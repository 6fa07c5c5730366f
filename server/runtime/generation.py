"""Offline generation: a batch of prompts, each with its own subnet, run to completion.

Owns a deliberately simple loop for the CLI (`concentric generate`), the tests and the
benchmarks: all prompts are prefilled in one step, then every unfinished sequence decodes one token
per step in one mixed-subnet forward; sequences leave as they finish. KV blocks come from a plain
free list, booked only for the KV-owning layers each subnet keeps.

This is not the serving engine (no arrivals, chunking, preemption or streaming; see
`server/engine/`), but it drives the same model, batch and cache code.

Deliberately does not know: tokenizers, HTTP, or scheduling policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from server.runtime.batch import SequenceInput, build_forward_batch
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.kv_cache import KVCache
from server.vocabulary.subnets import Subnet


@dataclass(frozen=True)
class GenerationRequest:
    subnet: Subnet
    prompt_ids: Sequence[int]
    max_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] = ()  # generation ends after emitting one of these


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, when asked for
    finish_reason: str = "length"


class BlockPool:
    """A free list of KV block ids."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks - 1, -1, -1))

    def take(self) -> int:
        if not self.free:
            raise MemoryError("the KV cache is full; give the generator more blocks")
        return self.free.pop()

    def give_back(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


class _Sequence:
    def __init__(self, req: GenerationRequest, num_kv_layers: int, device: torch.device):
        self.req = req
        self.tokens = list(req.prompt_ids)
        self.cached = 0  # tokens whose K/V are in the cache
        self.blocks: list[list[int]] = [[] for _ in range(num_kv_layers)]
        self.kv_layers = set(req.subnet.kv_layers)
        self.result = GenerationResult()
        self.rng = None
        if not req.greedy:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(req.seed if req.seed is not None else torch.seed())


class Generator:
    def __init__(self, model: Gemma3nModel, num_blocks: int = 512, block_size: int = 16):
        self.model = model
        self.text = model.text
        self.block_size = block_size
        self.cache = KVCache(self.text, num_blocks, block_size, model.w.dtype, model.w.device)
        self.pool = BlockPool(num_blocks)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        keep_logits: bool = False,
        ffn_mode: str | None = None,
    ) -> list[GenerationResult]:
        device = self.model.w.device
        n_kv = self.text.first_kv_shared_layer
        seqs = [_Sequence(r, n_kv, device) for r in requests]
        for s in seqs:
            if not s.tokens:
                raise ValueError("a prompt needs at least one token")
            if len(s.tokens) + s.req.max_tokens > self.text.max_position_embeddings:
                raise ValueError("prompt plus max_tokens exceeds the model's context length")
        running = [s for s in seqs if s.req.max_tokens > 0]
        try:
            while running:
                inputs = []
                for s in running:
                    new = s.tokens[s.cached :]
                    self._book(s, len(s.tokens))
                    inputs.append(SequenceInput(s.req.subnet, new, s.cached, s.blocks))
                batch = build_forward_batch(inputs, n_kv, self.block_size, device)
                logits = self.model.forward(batch, self.cache, ffn_mode)
                for b, i in enumerate(batch.order):
                    s = running[i]
                    s.cached = len(s.tokens)
                    token = self._choose(s, logits[b])
                    if keep_logits:
                        s.result.logits.append(logits[b].clone())
                    s.tokens.append(token)
                    s.result.token_ids.append(token)
                    if token in s.req.stop_ids:
                        s.result.finish_reason = "stop"
                still = []
                for s in running:
                    done = (
                        s.result.finish_reason == "stop"
                        or len(s.result.token_ids) >= s.req.max_tokens
                    )
                    if done:
                        self._release(s)
                    else:
                        still.append(s)
                running = still
        finally:
            for s in running:
                self._release(s)
        return [s.result for s in seqs]

    def _book(self, s: _Sequence, length: int) -> None:
        need = -(-length // self.block_size)
        for layer in s.kv_layers:
            while len(s.blocks[layer]) < need:
                s.blocks[layer].append(self.pool.take())

    def _release(self, s: _Sequence) -> None:
        for blocks in s.blocks:
            self.pool.give_back(blocks)
            blocks.clear()

    def _choose(self, s: _Sequence, logits: torch.Tensor) -> int:
        # Ids past the text vocabulary are vision/audio placeholders: never generated as text.
        logits = logits[: self.text.vocab_size_per_layer_input].float()
        if s.req.greedy:
            return int(torch.argmax(logits))
        logits = logits / max(s.req.temperature, 1e-5)
        if s.req.top_k > 0:
            kth = torch.topk(logits, min(s.req.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > s.req.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=s.rng))
