"""KV block bookkeeping: which physical blocks each request holds, per KV-owning layer.

Owns the accounting, in plain Python, of the pool that `runtime/kv_cache.py` stores. A block holds
`block_size` positions of ONE layer. A request books blocks only for the KV-owning layers its
subnet keeps (Gemma 3n's layers >= 20 reuse layer 18's or 19's K/V and own none; a subnet that
skips a layer below 20 books nothing for it). Sliding-window layers give back blocks whose
positions no future query can see (older than the window), so a long sequence holds at most
window/block_size + 1 blocks per sliding layer.

Prefix caching: once a token block (positions [i*bs, (i+1)*bs)) is computed, its layer blocks are
registered under the key of its prefix (the chain hash of blocks 0..i) in the subnet's KV class
(vocabulary/prefix_chain.py). KV contents depend on the widths of the KV-owning layers, so only
subnets of the same class can share them. Freed blocks that carry a key stay cached (at the back
of the free queue) until the space is needed; evicting any layer block of a cached token block
drops the whole entry. The landmarks among the cached keys (prefixes of 1, 2, 4, ... blocks),
most recently used last, are what a fleet replica reports to its router (`cached_landmarks`).

Deliberately does not know: tensors, scheduling order, or sampling.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from server.engine.request import Request
from server.vocabulary.prefix_chain import (
    cache_key,
    is_landmark,
    landmark_id,
    token_chain,
    usable_blocks,
)


@dataclass(frozen=True)
class KVLayout:
    """The model facts block accounting needs."""

    num_kv_layers: int  # layers 0..num_kv_layers-1 own a KV cache
    sliding_layers: frozenset[int]
    sliding_window: int


@dataclass
class _Held:
    """A request's blocks: one list per KV-owning layer, indexed by token block (-1: released)."""

    layers: tuple[int, ...]  # the KV-owning layers its subnet keeps
    table: list[list[int]]
    hashes: list[bytes] = field(default_factory=list)  # token-chain hashes of its full blocks


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, layout: KVLayout, enable_prefix_cache: bool = True
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = layout
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # Free blocks in reuse order: plain ones first, cached ones after (least recent first).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cache: dict[bytes, dict[int, int]] = {}  # cache key -> {layer: block}
        # Landmark id -> None for the cached landmark keys, least recently used first; a plain
        # dict, so that a reader in another thread copies it whole (`cached_landmarks`).
        self._landmarks: dict[int, None] = {}
        self._held: dict[str, _Held] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- queries ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, request_id: str) -> list[list[int]]:
        held = self._held.get(request_id)
        return held.table if held else [[] for _ in range(self.layout.num_kv_layers)]

    def num_held(self, request_id: str) -> int:
        held = self._held.get(request_id)
        return 0 if held is None else sum(b >= 0 for t in held.table for b in t)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """New blocks `allocate(req, num_new_tokens)` would take (after window releases)."""
        held = self._held.get(req.request_id)
        end = req.num_computed_tokens + num_new_tokens
        need = 0
        for layer in req.subnet.kv_layers:
            first, last = self._span(layer, req.num_computed_tokens, end)
            table = held.table[layer] if held else []
            need += sum(1 for i in range(first, last) if i >= len(table) or table[i] < 0)
        return need

    # ---- admission and growth ---------------------------------------------------------------

    def admit(self, req: Request) -> int:
        """Start booking for a request about to run (new or preempted): attach the longest cached
        prefix of its tokens; returns the number of tokens it need not compute."""
        assert req.request_id not in self._held, f"{req.request_id} already holds blocks"
        layers = tuple(req.subnet.kv_layers)
        held = _Held(layers, [[] for _ in range(self.layout.num_kv_layers)])
        self._held[req.request_id] = held
        hit = 0
        # A request that wants its prompt's logprobs computes every position (as vLLM: it
        # never reads the prefix cache; its blocks still fill it for others).
        if self.enable_prefix_cache and req.params.prompt_logprobs is None:
            tokens = req.all_token_ids
            kv = req.subnet.kv_key
            parent = b""
            for i in range(usable_blocks(len(tokens), self.block_size)):
                (chain,) = token_chain(tokens, self.block_size, i + 1, i, parent)
                key = cache_key(kv, chain)
                entry = self._cache.get(key)
                if entry is None or set(entry) != set(layers):
                    break
                for layer, block in entry.items():
                    self._ref(block)
                    held.table[layer].append(block)
                held.hashes.append(chain)
                if is_landmark(i):  # used again: reported as recent
                    self._touch(landmark_id(key))
                parent = chain
                hit += self.block_size
            self.prefix_queries += len(tokens)
            self.prefix_hits += hit
        req.num_computed_tokens = hit
        req.num_cached_tokens = hit
        return hit

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Book blocks so that positions up to num_computed + num_new_tokens can be written.
        All or nothing: returns False, booking nothing new, if the pool is short."""
        held = self._held[req.request_id]
        start, end = req.num_computed_tokens, req.num_computed_tokens + num_new_tokens
        self._release_out_of_window(held, start)
        if self.blocks_needed(req, num_new_tokens) > len(self._free):
            return False
        for layer in held.layers:
            first, last = self._span(layer, start, end)
            table = held.table[layer]
            while len(table) < last:
                table.append(-1)
            for i in range(first, last):
                if table[i] < 0:
                    table[i] = self._take()
        return True

    def commit(self, req: Request) -> None:
        """After a step: register the request's newly full token blocks in the prefix cache."""
        if not self.enable_prefix_cache:
            return
        held = self._held[req.request_id]
        tokens = req.all_token_ids
        full = req.num_computed_tokens // self.block_size
        if len(held.hashes) >= full:
            return
        parent = held.hashes[-1] if held.hashes else b""
        start = len(held.hashes)
        kv = req.subnet.kv_key
        for i, chain in enumerate(token_chain(tokens, self.block_size, full, start, parent), start):
            held.hashes.append(chain)
            key = cache_key(kv, chain)
            blocks = {layer: held.table[layer][i] for layer in held.layers}
            if key in self._cache or any(b < 0 or self.block_hash[b] for b in blocks.values()):
                continue  # already cached by someone else, or a block already serves an entry
            self._cache[key] = blocks
            for b in blocks.values():
                self.block_hash[b] = key
            if is_landmark(i):
                self._touch(landmark_id(key))

    def _touch(self, lid: int) -> None:
        """A landmark cached or used again: the most recent now."""
        self._landmarks.pop(lid, None)
        self._landmarks[lid] = None

    def cached_landmarks(self, limit: int) -> tuple[int, ...]:
        """The ids of up to `limit` cached landmark keys, most recently used last. Safe to call
        from another thread than the one booking: copying a dict of ints is one step under
        CPython's GIL (no Python code runs during it)."""
        ids = tuple(self._landmarks)
        return ids[-limit:] if limit > 0 else ()

    def free(self, req: Request) -> None:
        """Give back everything a request holds (finish, abort, preemption)."""
        held = self._held.pop(req.request_id, None)
        if held is None:
            return
        for table in held.table:
            for block in table:
                if block >= 0:
                    self._unref(block)

    # ---- internals --------------------------------------------------------------------------

    def _span(self, layer: int, start: int, end: int) -> tuple[int, int]:
        """Token blocks layer `layer` must hold for a step computing positions [start, end)."""
        bs = self.block_size
        last = -(-end // bs)
        if layer in self.layout.sliding_layers:
            # The step's earliest query (position `start`) sees keys from start - window + 1.
            first = max(0, start - self.layout.sliding_window + 1) // bs
            return min(first, last), last
        return 0, last

    def _release_out_of_window(self, held: _Held, start: int) -> None:
        for layer in held.layers:
            if layer not in self.layout.sliding_layers:
                continue
            first, _ = self._span(layer, start, start)
            table = held.table[layer]
            for i in range(min(first, len(table))):
                if table[i] >= 0:
                    self._unref(table[i])
                    table[i] = -1

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self.block_hash[block]
        if key is not None:  # evicting a cached block drops its whole token-block entry
            for b in self._cache.pop(key, {}).values():
                self.block_hash[b] = None
            self._landmarks.pop(landmark_id(key), None)  # if it was one
        self.ref_count[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            self._free[block] = None
            if self.block_hash[block] is None:
                self._free.move_to_end(block, last=False)  # plain blocks are reused first
