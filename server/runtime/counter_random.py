"""Counter-based random numbers: each draw is a pure function of (row key, stream, index).

Owns the sampler's randomness. A request's numbers at one step come from a 64-bit row key that
the host derives from the request's seed and the number of tokens it has generated (`row_key`),
a stream number naming what is drawn (a candidate race, a level of the block race, a rejection
round) and the index of the item drawn for (a token id, a block index). There is no generator
state: a row's numbers do not depend on the other rows, the batch size, the row's position, how
many draws other requests made, or how often a step was retried, and a step costs no Python loop
over rows. This is the scheme of vLLM's model runner V2 and SGLang's seeded sampler (noise as a
hash of seed, position and token id), with a hash that needs no custom kernel.

The hash is murmur3's 32-bit finalizer (fmix32) applied twice, the key's low half (with the
stream in its top byte) injected before the first round and its high half before the second. For
a fixed key and stream it is a bijection of the index, so two tokens of one draw never share a
number. Streams differ in the top byte of the first round's input, so for indices below 2**24
(token ids and block indices) no two streams of one key ever hash the same input. It is a
statistical generator, not a cryptographic one.

Arithmetic: 32-bit values held in int64 tensors. A product by a 32-bit constant c is h * c' mod
2**32 with c' = c - 2**32 when c >= 2**31: the same low 32 bits as h * c, and |h * c'| < 2**63,
so it never overflows (int64 overflow is undefined behaviour in C++, and torch's uint32 and
uint64 lack shifts and additions). One multiply and one mask, where 16-bit halves took six ops;
on an accelerator each op is a kernel launch. The same ops give the same bits on every device.

Deliberately does not know: what the numbers are used for, or where seeds come from.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
STREAM_SHIFT = 24  # streams live in the top byte of a 32-bit word; indices stay below 2**24
MAX_INDEX = 1 << STREAM_SHIFT


def _splitmix64(z: int) -> int:
    """Vigna's SplitMix64 finalizer on a Python int (wraps mod 2**64)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def row_key(seed: int, step: int) -> tuple[int, int]:
    """The (low, high) 32-bit halves of the key for draw number `step` of a request's stream.

    Host-side and cheap (plain Python on two ints): the sampler computes one per row per step.
    """
    key = _splitmix64(_splitmix64(seed & MASK64) ^ (step & MASK64))
    return key & MASK32, key >> 32


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for h in [0, 2**32) and a constant c in [0, 2**32), within int64."""
    signed = c - (1 << 32) if c >= 1 << 31 else c  # in [-2**31, 2**31): |h * signed| < 2**63
    return (h * signed) & MASK32  # two's complement: the low 32 bits of h * c


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(
    key_lo: torch.Tensor, key_hi: torch.Tensor, stream: int, index: torch.Tensor
) -> torch.Tensor:
    """32-bit hashes, int64 in [0, 2**32): key halves [R, 1] (or [R]) against indices [R, n].

    `stream` is an int in [0, 256); `index` holds ints in [0, 2**24).
    """
    if not 0 <= stream < 256:
        raise ValueError(f"stream must be in [0, 256), got {stream}")
    if key_lo.dim() == 1:
        key_lo, key_hi = key_lo[:, None], key_hi[:, None]
    h = _fmix32(index ^ key_lo ^ (stream << STREAM_SHIFT))
    return _fmix32(h ^ key_hi)


def exponentials(
    key_lo: torch.Tensor, key_hi: torch.Tensor, stream: int, index: torch.Tensor
) -> torch.Tensor:
    """Exp(1) variates in float64, one per index: -log(u) with u = (hash + 1/2) / 2**32 in (0, 1).

    u never reaches 0 or 1, so every variate is finite and positive; 32 bits of resolution bias a
    draw by at most ~2**-32, far below what any test of frequencies can see.
    """
    u = (hash32(key_lo, key_hi, stream, index).double() + 0.5) * 2.0**-32
    return -torch.log(u)


def race(
    weights: torch.Tensor,
    key_lo: torch.Tensor,
    key_hi: torch.Tensor,
    stream: int,
    index: torch.Tensor,
) -> torch.Tensor:
    """Per row, the position i of the winner of an exponential race: argmax weights_i / E_i.

    With E_i ~ Exp(1) independent, position i wins with probability weights_i / sum(weights)
    (the "exponential race", equivalent to Gumbel-max): no normalisation, cumsum or search.
    `weights` are non-negative float64 [R, n]; zero weights never win unless a whole row is zero
    (a failed row, whose result is discarded). `index` [R, n] names each position's random number
    (a token id or a block index), so the same item gets the same number however the row's
    candidates were gathered.
    """
    return (weights / exponentials(key_lo, key_hi, stream, index)).argmax(dim=1)
