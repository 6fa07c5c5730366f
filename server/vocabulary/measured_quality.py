"""Measured quality: each subnet's held-out perplexity, as stored beside a checkpoint.

Owns the file `subnet_quality.json` that `concentric measure-quality` writes into a checkpoint
folder (what was measured, on how many tokens, and per subnet its kept layers, widths, perplexity
and top-1 accuracy), reading it back, and turning a perplexity into the score the tiers and
policies compare: `100 / perplexity`, the geometric-mean probability (in percent) the subnet
gives each held-out token. Higher is better, like the MMLU percentages it replaces.

A measurement counts for a subnet only when the subnet's layers and widths are those measured: a
custom subnet redefined after the measurement falls back to the stand-in, never to a stale score.

Deliberately does not know: how the perplexity is measured (server/tools/quality.py), tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUALITY_FILE = "subnet_quality.json"
FORMAT = "concentric-subnet-quality/1"


class QualityFileError(ValueError):
    """A quality file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class MeasuredSubnet:
    name: str
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    perplexity: float
    top1: float  # share of held-out tokens that are the subnet's argmax

    @property
    def score(self) -> float:
        return score_of(self.perplexity)


@dataclass(frozen=True)
class MeasuredQuality:
    """Every measured subnet of one checkpoint, and what the measurement was."""

    path: Path
    tokens: int
    description: str
    subnets: dict[str, MeasuredSubnet]

    def for_subnet(
        self, name: str, layers: Sequence[int], widths: Sequence[int]
    ) -> MeasuredSubnet | None:
        m = self.subnets.get(name)
        if m is None or m.layers != tuple(layers) or m.widths != tuple(widths):
            return None
        return m


def score_of(perplexity: float) -> float:
    """The quality score of a perplexity: 100 / perplexity (percent, higher is better)."""
    return 100.0 / perplexity


def quality_document(
    description: str, tokens: int, subnets: Sequence[MeasuredSubnet], extra: dict | None = None
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "metric": "held-out perplexity (score = 100 / perplexity)",
        "description": description,
        "tokens": tokens,
        **(extra or {}),
        "subnets": {
            s.name: {
                "layers": list(s.layers),
                "widths": list(s.widths),
                "perplexity": round(s.perplexity, 4),
                "top1": round(s.top1, 5),
            }
            for s in subnets
        },
    }


def read_measured_quality(folder: Path | str) -> MeasuredQuality | None:
    """The checkpoint folder's measured quality, or None when it has no quality file."""
    path = Path(folder) / QUALITY_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QualityFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise QualityFileError(f"{path}: not a {FORMAT} file")
    out = {}
    try:
        for name, rec in doc["subnets"].items():
            ppl = float(rec["perplexity"])
            if not (math.isfinite(ppl) and ppl >= 1.0):
                raise QualityFileError(f"{path}: subnet {name!r}: perplexity {ppl} is not >= 1")
            out[name] = MeasuredSubnet(
                name,
                tuple(int(x) for x in rec["layers"]),
                tuple(int(x) for x in rec["widths"]),
                ppl,
                float(rec["top1"]),
            )
        return MeasuredQuality(path, int(doc["tokens"]), str(doc["description"]), out)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, QualityFileError):
            raise
        raise QualityFileError(f"{path}: malformed ({type(e).__name__}: {e})") from None
