"""Names of token prefixes: the keys the prefix cache files computed K/V under, and the
landmarks by which a fleet's router tells which replica holds a prompt's prefix.

Owns the chain hash of a token sequence's full blocks (block i's hash covers blocks 0..i, so
equal hashes mean equal prefixes), the cache key of a prefix for one KV class (the subnets whose
KV-owning layers and widths are equal, `Subnet.kv_key`: only they can share K/V), and landmarks:
the short ids of the keys at depths 1, 2, 4, 8, ... blocks. A replica reports the landmarks it
holds; a router hashes a prompt once and looks its landmarks up for each KV class, which finds
the cached prefix's length to within a factor of two without either side sending every block.

The token chain does not depend on the KV class, so a router that weighs many classes hashes the
prompt once and only the landmarks once per class.

Deliberately does not know: blocks of memory, requests, or replicas.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def token_chain(
    tokens: Sequence[int], block_size: int, blocks: int, start: int = 0, parent: bytes = b""
) -> list[bytes]:
    """Chain hashes of full blocks start..blocks-1 of `tokens`; `parent` is block start-1's."""
    out = []
    for i in range(start, blocks):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.blake2b(
            struct.pack(f"<{len(block)}q", *block), key=parent, digest_size=16
        ).digest()
        out.append(parent)
    return out


def cache_key(kv_key: str, chain: bytes) -> bytes:
    """What the prefix cache files a prefix's K/V under: its chain hash in one KV class."""
    return kv_key.encode() + b"|" + chain


def is_landmark(index: int) -> bool:
    """Whether block `index` (0-based) ends a prefix of 1, 2, 4, 8, ... blocks."""
    return index & (index + 1) == 0


def landmark_id(key: bytes) -> int:
    """A cache key's short id (64 bits: reports carry thousands of them)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def usable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt the cache can serve: the last token is always computed (its
    logits are what the step is for)."""
    return max(0, num_tokens - 1) // block_size


def landmark_depths(blocks: int) -> list[int]:
    """Depths 1, 2, 4, ... up to `blocks`."""
    depths, d = [], 1
    while d <= blocks:
        depths.append(d)
        d *= 2
    return depths
