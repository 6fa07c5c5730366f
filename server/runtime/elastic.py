"""The elastic runtime as one object: a checkpoint opened once, its subnets, its tokenizer.

Owns the wiring that every user of the runtime repeats otherwise: open and check the store, take
the weights to the compute dtype and device once, build the subnet table against this checkpoint,
load the tokenizer (and, on first use, the structured-output grammars over it), and build the
model. The engine and the CLI hold one of these; every subnet is
served from it without copying a weight.

Deliberately does not know: requests, scheduling, HTTP.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from server.checkpoint.store import CheckpointStore
from server.checkpoint.tokenizer import TextTokenizer
from server.runtime.batch import plan_step
from server.runtime.device import bind, resolve
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.grammar import Grammars
from server.runtime.host_heap import keep_freed_memory
from server.runtime.kv_cache import KVCache
from server.runtime.object_heap import freeze_long_lived
from server.runtime.weights import Weights
from server.vocabulary.compute import COMPUTE_DTYPES, check_choice
from server.vocabulary.measured_quality import read_measured_quality
from server.vocabulary.step import StepSequence
from server.vocabulary.subnets import (
    DEFAULT_CUSTOM_YAML,
    DEFAULT_TABLE_CSV,
    Subnet,
    SubnetTable,
    load_subnet_table,
)


def parse_dtype(name: str) -> torch.dtype | None:
    """A compute dtype by name (server/vocabulary/compute.py); None: as stored."""
    check_choice("dtype", name, COMPUTE_DTYPES)
    return None if name == "auto" else getattr(torch, name)


@dataclass
class ElasticRuntime:
    store: CheckpointStore
    weights: Weights
    model: Gemma3nModel
    subnets: SubnetTable
    tokenizer: TextTokenizer

    @classmethod
    def open(
        cls,
        checkpoint: str | Path,
        dtype: str = "auto",
        device: str = "cpu",
        custom_subnets: Path | None = DEFAULT_CUSTOM_YAML,
        table_csv: Path | None = DEFAULT_TABLE_CSV,
        huge_pages: bool = False,
    ) -> ElasticRuntime:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        device = str(resolve(device))  # "cuda" pinned to an index: every thread reads it alike
        bind(device)  # this thread's current device (each step thread enters it too)
        store = CheckpointStore.open(checkpoint)
        weights = Weights(store, dtype=parse_dtype(dtype), device=device, huge_pages=huge_pages)
        # The checkpoint's measured quality, when it has one, is every subnet's quality score.
        measured = read_measured_quality(store.folder)
        subnets = load_subnet_table(store.text, table_csv, custom_subnets, measured)
        runtime = cls(store, weights, Gemma3nModel(weights), subnets, TextTokenizer(store.folder))
        if weights.device.type == "cpu":  # steps allocate on this host: keep what they free
            why = keep_freed_memory()
            if why is not None:
                warnings.warn(f"freed host memory goes back to the kernel: {why}", stacklevel=2)
        freeze_long_lived()  # no full garbage collection walks the loaded model mid-step
        return runtime

    @cached_property
    def grammars(self) -> Grammars:
        """Structured output's compiler for this checkpoint's tokenizer and text vocabulary
        (its tokenizer description is built on the first compile)."""
        return Grammars(
            self.tokenizer.hf, self.store.text.vocab_size_per_layer_input, self.tokenizer.stop_ids
        )

    def prefill_logits(self, subnet: Subnet, ids: Sequence[int], every_position: bool = True):
        """Logits of one prefill of `ids` by `subnet`, the model alone (no engine, a KV cache of
        its own): [len(ids), vocab] at every position, or [1, vocab] for the last. What offline
        measurements (tools/quality.py) and the tests' references read."""
        text = self.store.text
        n_kv, bs = text.first_kv_shared_layer, 16
        per_layer = -(-len(ids) // bs)
        kv = KVCache(text, n_kv * per_layer, bs, self.weights.dtype)
        table = [
            list(range(i * per_layer, (i + 1) * per_layer)) if subnet.keeps(i) else []
            for i in range(n_kv)
        ]
        seq = StepSequence("prefill", subnet, list(ids), 0, table, sample=True)
        planned = plan_step(text, [seq], bs, kv.scratch_block, all_logits=every_position)
        with torch.inference_mode():
            return self.model.forward(self.model.batch(planned), kv)
