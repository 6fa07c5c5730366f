"""The elastic runtime as one object: a checkpoint opened once, its subnets, its tokenizer.

Owns the wiring that every user of the runtime repeats otherwise: open and check the store, take
the weights to the compute dtype and device once, build the subnet table against this checkpoint,
load the tokenizer, and build the model. The engine and the CLI hold one of these; every subnet is
served from it without copying a weight.

Deliberately does not know: requests, scheduling, HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.checkpoint.store import CheckpointStore
from server.checkpoint.tokenizer import TextTokenizer
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.weights import Weights
from server.vocabulary.subnets import (
    DEFAULT_CUSTOM_YAML,
    DEFAULT_TABLE_CSV,
    SubnetTable,
    load_subnet_table,
)

DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype | None:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}") from None


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
        ffn_mode: str = "grouped",
        table_csv: Path | None = DEFAULT_TABLE_CSV,
    ) -> ElasticRuntime:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        store = CheckpointStore.open(checkpoint)
        weights = Weights(store, dtype=parse_dtype(dtype), device=device)
        subnets = load_subnet_table(store.text, table_csv, custom_subnets)
        return cls(
            store, weights, Gemma3nModel(weights, ffn_mode), subnets, TextTokenizer(store.folder)
        )
