"""Residency levels: the nested resident-FFN-width configurations a subnet table implies.

Owns the arithmetic that turns the subnet table into levels, smallest first (level k serves the
k smallest subnets and every subnet that fits in the same widths; the last level is the full
widths). Plain Python: the elasticity controller decides over these levels, and the runtime's
`FfnResidency` (server/runtime/residency.py) moves the rows.

Deliberately does not know: tensors, memory readings, or requests.
"""

from __future__ import annotations

from collections.abc import Sequence


def residency_levels(
    full: Sequence[int], subnets: Sequence[tuple[Sequence[int], Sequence[int], int]]
) -> list[tuple[int, ...]]:
    """Nested resident-width configurations, smallest first.

    `subnets` are (kept layers, widths, effective params). Level k holds, per layer, the widest
    width any of the k smallest subnets uses there, so each level serves every subnet of the
    levels below it plus at least one more. The last level is the full widths."""
    ordered = sorted(subnets, key=lambda s: s[2])
    levels: list[tuple[int, ...]] = []
    current = [0] * len(full)
    for layers, widths, _ in ordered:
        for layer, w in zip(layers, widths, strict=True):
            current[layer] = max(current[layer], w)
        # a layer no subnet at this level uses keeps a one-row placeholder (widths are > 0)
        level = tuple(w if w else 1 for w in current)
        if not levels or level != levels[-1]:
            levels.append(level)
    if not levels or levels[-1] != tuple(full):
        levels.append(tuple(full))
    return levels
