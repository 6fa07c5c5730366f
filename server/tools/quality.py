"""Measuring a checkpoint's subnets on held-out text, through the serving runtime itself.

Owns the held-out slice (documents of the corpus's held-out split, chosen in file order per
source up to a token budget, written as JSON lines beside the checkpoint so the measurement can
be repeated without the corpus), cutting it into fixed windows, and three measurements of any
subnet, all from the same forward the server runs (`Gemma3nModel.forward`, every position's
logits, float32 compute):
- perplexity and top-1 accuracy over every window (`measure_quality`, stored as
  `subnet_quality.json`, which the subnet table then uses as its quality scores);
- the greedy agreement rate between two subnets' next tokens on the same prefixes (`agreement`);
- a unigram baseline (`unigram_perplexity`): the training split's token frequencies, add-one
  smoothed, scored on the same windows.

Deliberately does not know: how the checkpoint was trained, or how scores are used.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from server.runtime.elastic import ElasticRuntime
from server.vocabulary.measured_quality import (
    QUALITY_FILE,
    MeasuredSubnet,
    quality_document,
)

HELDOUT_FILE = "heldout.jsonl"
WINDOW = 256  # predicted tokens per window (a window holds WINDOW + 1 ids)
WINDOWS_PER_SOURCE = 20  # 6 sources x 20 x 256 = 30,720 tokens at most (>= 20k with `devil` short)


@dataclass(frozen=True)
class Window:
    source: str
    ids: tuple[int, ...]  # WINDOW + 1 ids: position i predicts ids[i + 1]


def write_heldout_slice(
    corpus_dir: Path, tokenizer, out: Path, windows_per_source: int = WINDOWS_PER_SOURCE
) -> Path:
    """The held-out documents the windows are cut from: per source, in file order, until the
    source's tokens fill `windows_per_source` windows."""
    from server.tools.corpus import read_documents
    from server.tools.training import encode_documents

    need = windows_per_source * (WINDOW + 1)
    lines = []
    for path in sorted((Path(corpus_dir) / "heldout").glob("*.jsonl")):
        have = 0
        for doc in read_documents(path):
            if have >= need:
                break
            lines.append(json.dumps({"source": path.stem, "text": doc}, ensure_ascii=False))
            have += len(encode_documents(tokenizer, [doc])[0])
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def heldout_windows(
    rt: ElasticRuntime, slice_path: Path, windows_per_source: int = WINDOWS_PER_SOURCE
) -> list[Window]:
    """Each source's held-out documents tokenized with the checkpoint's tokenizer (`<bos>` first,
    `<eos>` after plain text, as in training), concatenated, cut into whole windows."""
    from server.tools.training import encode_documents, load_tokenizer

    tokenizer = load_tokenizer(rt.store.folder)
    by_source: dict[str, list[str]] = {}
    for line in Path(slice_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_source.setdefault(rec["source"], []).append(rec["text"])
    out = []
    for source in sorted(by_source):
        docs = encode_documents(tokenizer, by_source[source])
        ids = [int(t) for doc in docs for t in doc]
        n = min(windows_per_source, len(ids) // (WINDOW + 1))
        out += [
            Window(source, tuple(ids[i * (WINDOW + 1) : (i + 1) * (WINDOW + 1)])) for i in range(n)
        ]
    return out


def window_logits(rt: ElasticRuntime, subnet, ids: Sequence[int]) -> torch.Tensor:
    """[len(ids), vocab] logits of one prefill of `ids` by `subnet`, every position."""
    return rt.prefill_logits(subnet, ids).float()


def window_scores(rt: ElasticRuntime, subnet, w: Window) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, correct argmaxes) over the window's targets."""
    logits = window_logits(rt, subnet, w.ids[:-1])
    target = torch.tensor(w.ids[1:])
    nll = F.cross_entropy(logits, target, reduction="sum").item()
    return nll, int((logits.argmax(-1) == target).sum())


def measure_subnet(rt: ElasticRuntime, subnet, windows: Iterable[Window]) -> MeasuredSubnet:
    nll, correct, n = 0.0, 0, 0
    for w in windows:
        a, b = window_scores(rt, subnet, w)
        nll, correct, n = nll + a, correct + b, n + len(w.ids) - 1
    return MeasuredSubnet(
        subnet.name, subnet.layers, subnet.widths, math.exp(nll / n), correct / max(1, n)
    )


def measure_quality(
    checkpoint: Path, names: Sequence[str] | None = None, write: bool = True
) -> dict:
    """Perplexity of every subnet (or `names`) on the checkpoint's held-out slice; written to
    `subnet_quality.json` in the checkpoint folder unless `write` is False."""
    rt = ElasticRuntime.open(checkpoint, dtype="float32")
    slice_path = Path(checkpoint) / HELDOUT_FILE
    if not slice_path.is_file():
        raise ValueError(f"{checkpoint}: no {HELDOUT_FILE} (the held-out slice to measure on)")
    windows = heldout_windows(rt, slice_path)
    tokens = len(windows) * WINDOW
    results = []
    for subnet in rt.subnets:
        if names is not None and subnet.name not in names:
            continue
        m = measure_subnet(rt, subnet, windows)
        print(
            f"{subnet.name:16s} {subnet.effective_params / 1e6:7.3f} M  perplexity "
            f"{m.perplexity:8.3f}  top-1 {m.top1:.4f}",
            file=sys.stderr,
        )
        results.append(m)
    doc = quality_document(
        f"{HELDOUT_FILE}: {len(windows)} windows of {WINDOW} predicted tokens, float32 compute "
        "through the serving runtime",
        tokens,
        results,
        {"sources": sorted({w.source for w in windows})},
    )
    if write:
        (Path(checkpoint) / QUALITY_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def agreement(rt: ElasticRuntime, draft, target, windows: Iterable[Window]) -> tuple[float, int]:
    """Share of positions where `draft`'s argmax equals `target`'s on the same prefix."""
    same = n = 0
    for w in windows:
        a = window_logits(rt, draft, w.ids[:-1]).argmax(-1)
        b = window_logits(rt, target, w.ids[:-1]).argmax(-1)
        same += int((a == b).sum())
        n += len(a)
    return same / n, n


def tokens_per_verification(alpha: float, drafted: int = 4) -> float:
    """Expected tokens accepted per verification with `drafted` drafted tokens and per-token
    acceptance `alpha` (independent): (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(drafted + 1)
    return (1 - alpha ** (drafted + 1)) / (1 - alpha)


def unigram_perplexity(counts: torch.Tensor, windows: Iterable[Window]) -> float:
    """Perplexity of add-one-smoothed unigram frequencies `counts` [vocab] on the windows."""
    logp = torch.log((counts.double() + 1) / (counts.double() + 1).sum())
    nll, n = 0.0, 0
    for w in windows:
        nll -= logp[torch.tensor(w.ids[1:])].sum().item()
        n += len(w.ids) - 1
    return math.exp(nll / n)
