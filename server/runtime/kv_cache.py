"""The K/V tensors themselves: one pool of paged blocks shared by every KV-owning layer.

Owns the storage. A block holds `block_size` consecutive positions of ONE layer's keys and values;
which layer and which sequence a block serves is decided by whoever hands out block ids (the
engine's block bookkeeping, server/engine/kv_blocks.py). Sharing one pool across layers is what lets
a subnet that skips a KV-owning layer book fewer blocks, and lets blocks that a sliding-window layer
releases serve a full-attention layer's long context.

Gemma 3n's KV-consumer layers (20..34 in E4B) own no blocks: they read their producer's (18 or 19).

Deliberately does not know: which blocks are free, prefix caching, or scheduling.
"""

from __future__ import annotations

import torch

from server.vocabulary.text_config import TextConfig


class KVCache:
    def __init__(
        self,
        text: TextConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV cache needs at least one block of at least one slot")
        self.text = text
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One block past the pool, never handed out: where rows of a subnet that skips a layer
        # write that layer's K/V when a step runs every row (batch.py, masked layout).
        self.scratch_block = num_blocks
        slots = (num_blocks + 1) * block_size
        shape = (slots, text.num_key_value_heads, text.head_dim)
        # Zero-filled so that a padded gather can never read NaN/inf (masked keys multiply by 0).
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def block_bytes(text: TextConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block: K and V for `block_size` positions of one layer."""
        return 2 * block_size * text.num_key_value_heads * text.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
