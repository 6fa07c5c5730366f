"""The host weight store: one Gemma 3n checkpoint folder, opened once, memory-mapped, checked.

Owns: finding the shards (`model.safetensors`, or shards listed by `model.safetensors.index.json`),
mapping them, reading `config.json` in either layout (multimodal `model.language_model.*` with a
`text_config`, or text-only `model.*` with a flat config), and proving before anything runs that
every tensor the text decoder needs is present with the shape the config implies. Every failure
is one `CheckpointError` that names the folder and everything wrong with it.

Tensors are handed out as zero-copy views of the mapped files; the vision and audio towers and the
consumer layers' dead K/V weights are never touched, so they cost address space, not memory.

Deliberately does not know: compute dtypes, devices, subnets, or the forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from server.checkpoint.shard import DTYPES, Shard, ShardError
from server.vocabulary.text_config import CheckpointConfig, ConfigError, read_checkpoint_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served; the message says why, all of it."""


class CheckpointStore:
    """A Gemma 3n checkpoint folder, mapped read-only. Build it with `CheckpointStore.open`."""

    def __init__(
        self,
        folder: Path,
        config: CheckpointConfig,
        shards: dict[str, Shard],
        weight_map: dict[str, str],
    ):
        self.folder = folder
        self.config = config
        self.text = config.text
        self._shards = shards
        self._weight_map = weight_map  # tensor name -> shard file name

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> CheckpointStore:
        folder = Path(folder)
        if not folder.exists():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint path {folder} is not a folder")
        try:
            config = read_checkpoint_config(folder)
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {folder}: {e}") from None
        shard_files = _shard_files(folder)
        shards: dict[str, Shard] = {}
        weight_map: dict[str, str] = {}
        for file_name, expected in shard_files.items():
            try:
                shard = Shard(folder / file_name)
            except ShardError as e:
                raise CheckpointError(f"checkpoint {folder}: {e}") from None
            shards[file_name] = shard
            for name in shard.entries:
                weight_map[name] = file_name
            missing = sorted(n for n in expected if n not in shard.entries)
            if missing:
                raise CheckpointError(
                    f"checkpoint {folder}: the index places {len(missing)} tensor(s) in "
                    f"{file_name} that it does not contain, e.g. {missing[0]}"
                )
        store = cls(folder, config, shards, weight_map)
        store.validate()
        return store

    def validate(self) -> None:
        """Check every text-decoder tensor by name, shape and dtype; report all problems at once."""
        problems: list[str] = []
        for name, shape in self.expected_shapes().items():
            if name not in self._weight_map:
                problems.append(f"missing: {name} {list(shape)}")
                continue
            entry = self._entry(name)
            if entry.shape != shape:
                problems.append(
                    f"wrong shape: {name}: expected {list(shape)}, found {list(entry.shape)}"
                )
            elif entry.dtype not in _FLOAT_DTYPES:
                problems.append(f"wrong dtype: {name}: {entry.dtype} is not a float type")
        if problems:
            shown = problems[:50] + (
                [f"... and {len(problems) - 50} more"] if len(problems) > 50 else []
            )
            raise CheckpointError(
                f"checkpoint {self.folder} is not a complete Gemma 3n text decoder "
                f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown)
            )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full names and shapes of every tensor the text decoder reads."""
        t, p = self.text, self.config.text_prefix
        shapes = {p + k: v for k, v in t.global_tensor_shapes().items()}
        for layer in range(t.num_hidden_layers):
            for k, v in t.layer_tensor_shapes(layer).items():
                shapes[f"{p}layers.{layer}.{k}"] = v
        if not t.tie_word_embeddings:
            shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
        return shapes

    # ---- access -----------------------------------------------------------------------------

    def names(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only view of a tensor, by its full checkpoint name."""
        try:
            shard = self._shards[self._weight_map[name]]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.folder} has no tensor {name}") from None
        return shard.tensor(name)

    def text_tensor(self, relative: str) -> torch.Tensor:
        """A text-decoder tensor by its name relative to the text prefix (e.g. `norm.weight`)."""
        return self.tensor(self.config.text_prefix + relative)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name).dtype]

    def shard_of(self, name: str) -> str:
        return self._weight_map[name]

    def shard_names(self) -> list[str]:
        return list(self._shards)

    def _entry(self, name: str):
        return self._shards[self._weight_map[name]].entries[name]


def _shard_files(folder: Path) -> dict[str, set[str]]:
    """Shard file name -> the tensor names the index promises it holds (empty for a single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"checkpoint {folder}: {INDEX_FILE} is corrupt") from None
        files: dict[str, set[str]] = {}
        for name, file_name in weight_map.items():
            if not isinstance(file_name, str) or "/" in file_name or file_name.startswith("."):
                raise CheckpointError(
                    f"checkpoint {folder}: {INDEX_FILE} names an invalid shard {file_name!r}"
                )
            files.setdefault(file_name, set()).add(name)
        missing = sorted(f for f in files if not (folder / f).is_file())
        if missing:
            raise CheckpointError(
                f"checkpoint {folder}: shard(s) named by {INDEX_FILE} are missing: "
                + ", ".join(missing)
            )
        return files
    if (folder / SINGLE_FILE).is_file():
        return {SINGLE_FILE: set()}
    raise CheckpointError(
        f"checkpoint {folder}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})"
    )
