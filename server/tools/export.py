"""Export one subnet as a standalone Hugging Face checkpoint folder (`concentric export`).

Owns the physical slicing that everyone else does at load time, done once and correctly, for
tools that want a plain model (transformers, vLLM): kept layers renumbered, FFN row/column
prefixes cut, the PLE table and its projection re-packed to the kept layers, and a config that
current transformers accepts. Unlike Google's MatFormer Lab notebook it filters `layer_types`
(transformers >= 4.57 rejects an unfiltered list, and older versions silently give layers the
wrong attention type), and rebuilds `num_kv_shared_layers` and `activation_sparsity_pattern` from
the kept layers rather than from E4B's constants.

Streaming: tensors are read from the memory-mapped source one at a time and written to shards of
bounded size; the PLE table is re-packed in row blocks. Tensors that are not the text decoder's
(a real checkpoint's vision and audio towers) are carried over unchanged; so are the consumer
layers' unused K/V weights, as the notebook does, so that tools that still expect them load.

Deliberately does not know: how the exported model is served.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from server.checkpoint.shard import PlannedTensor
from server.checkpoint.store import INDEX_FILE, SINGLE_FILE, CheckpointStore
from server.checkpoint.writer import new_checkpoint_folder, write_json, write_shards
from server.vocabulary.subnets import Subnet

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
_LAYER = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<index>\d+)\.(?P<rest>.+)$")
_PLE_ROWS_PER_BLOCK = 8192


def exported_text_config(store: CheckpointStore, subnet: Subnet) -> dict:
    """The subnet's text config: the source's, with every per-layer field cut to kept layers."""
    raw = store.config.raw
    source = raw["text_config"] if store.config.multimodal else raw
    cfg = copy.deepcopy(source)
    t = store.text
    kept = list(subnet.layers)
    cfg["num_hidden_layers"] = len(kept)
    cfg["intermediate_size"] = list(subnet.widths)
    cfg["layer_types"] = [t.layer_types[i] for i in kept]
    cfg["num_kv_shared_layers"] = sum(1 for i in kept if not t.owns_kv(i))
    cfg["activation_sparsity_pattern"] = [t.activation_sparsity_pattern[i] for i in kept]
    return cfg


def exported_config(store: CheckpointStore, subnet: Subnet) -> dict:
    text_cfg = exported_text_config(store, subnet)
    if store.config.multimodal:
        cfg = copy.deepcopy(store.config.raw)
        cfg["text_config"] = text_cfg
    else:
        cfg = text_cfg
    cfg["concentric_subnet"] = {
        "name": subnet.name,
        "title": subnet.title,
        "layers": list(subnet.layers),
        "widths": list(subnet.widths),
        "kv_key": subnet.kv_key,
    }
    return cfg


def _tensor_plan(store: CheckpointStore, subnet: Subnet) -> list[PlannedTensor]:
    t, prefix = store.text, store.config.text_prefix
    new_index = {old: new for new, old in enumerate(subnet.layers)}
    kept = torch.tensor(subnet.layers)
    n, d = t.num_hidden_layers, t.hidden_size_per_layer_input
    plan: list[PlannedTensor] = []

    def whole(name: str):
        return lambda: store.tensor(name)

    for name in _ordered_names(store):
        dtype, shape = store.dtype(name), store.shape(name)
        match = _LAYER.match(name)
        if match and match["prefix"] == prefix + "layers.":
            old = int(match["index"])
            if old not in new_index:
                continue  # a skipped layer: dropped with all its tensors
            out_name = f"{match['prefix']}{new_index[old]}.{match['rest']}"
            width = subnet.width_of(old)
            rest = match["rest"]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                plan.append(
                    PlannedTensor(
                        out_name,
                        dtype,
                        (width, shape[1]),
                        lambda name=name, w=width: store.tensor(name)[:w],
                    )
                )
            elif rest == "mlp.down_proj.weight":
                plan.append(
                    PlannedTensor(
                        out_name,
                        dtype,
                        (shape[0], width),
                        lambda name=name, w=width: store.tensor(name)[:, :w],
                    )
                )
            else:
                plan.append(PlannedTensor(out_name, dtype, shape, whole(name)))
        elif name == prefix + "embed_tokens_per_layer.weight":
            # [V, L*d] -> [V, L_kept*d]: column chunk l belongs to layer l.
            def ple_blocks(name: str = name) -> Iterator[torch.Tensor]:
                table = store.tensor(name)
                for start in range(0, table.shape[0], _PLE_ROWS_PER_BLOCK):
                    rows = table[start : start + _PLE_ROWS_PER_BLOCK].reshape(-1, n, d)
                    yield rows[:, kept].reshape(rows.shape[0], len(kept) * d)

            plan.append(PlannedTensor(name, dtype, (shape[0], len(kept) * d), ple_blocks))
        elif name == prefix + "per_layer_model_projection.weight":
            # [L*d, H] -> [L_kept*d, H]: row chunk l belongs to layer l.
            plan.append(
                PlannedTensor(
                    name,
                    dtype,
                    (len(kept) * d, shape[1]),
                    lambda name=name, h=shape[1]: (
                        store.tensor(name).reshape(n, d, h)[kept].reshape(-1, h)
                    ),
                )
            )
        else:
            plan.append(PlannedTensor(name, dtype, shape, whole(name)))
    return plan


def _ordered_names(store: CheckpointStore) -> list[str]:
    """Source order: shard by shard, tensors by name within a shard (stable, readable output)."""
    names = list(store.names())
    shard_rank = {s: i for i, s in enumerate(store.shard_names())}
    return sorted(names, key=lambda nm: (shard_rank[store.shard_of(nm)], nm))


def _split(plan: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def export_subnet(
    store: CheckpointStore,
    subnet: Subnet,
    out: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `subnet` of `store` as a standalone checkpoint folder `out` (absent or empty)."""
    out = Path(out)
    if out.resolve() == store.folder.resolve():
        raise ValueError("export target is the source checkpoint folder")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with new_checkpoint_folder(out) as tmp:
        groups = _split(_tensor_plan(store, subnet), max_shard_bytes)
        write_shards(tmp, groups, f"export {subnet.name}", progress)
        write_json(tmp / "config.json", exported_config(store, subnet))
        # Tokenizer, chat template, generation and processor configs travel unchanged.
        for f in sorted(store.folder.iterdir()):
            skip = f.suffix == ".safetensors" or f.name in (INDEX_FILE, SINGLE_FILE, "config.json")
            if f.is_file() and not skip:
                shutil.copy2(f, tmp / f.name)
    return out
