"""The host weight store on real files: every broken checkpoint is refused with a message that
names the folder (or file) and what is wrong with it; both real layouts (sharded or single-file,
multimodal or text-only) load and compute the same logits; tensors are read-only memory-mapped
views of the shard files, and the bytes the text decoder never reads are never held; a bf16
checkpoint computed in float32 is converted once, at load, exactly.

Broken checkpoints are copies of the session's tiny dev checkpoint, edited with safetensors and
json like a user's tools would leave them; the session's folder itself is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.checkpoint.store import INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointStore
from server.runtime.elastic import ElasticRuntime
from server.runtime.weights import LayerWeights, Weights
from tests.runtime.conftest import assert_float32_close, prefill_logits, prompt_ids

TEXT = "model.language_model."
SHARD_2 = "model-00002-of-00002.safetensors"


# ---- building broken (and rewritten) checkpoints -------------------------------------------------


def copy_of(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may corrupt."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def rewrite_tensors(
    folder: Path,
    edit: Callable[[str, torch.Tensor], torch.Tensor | None],
    rename: Callable[[str], str] = lambda name: name,
) -> None:
    """Rewrite every shard with `edit` applied to each tensor (None drops it) and `rename` to its
    name, and the index to match, so that only the edited tensors are wrong, not the bookkeeping
    around them."""
    index_path = folder / INDEX_FILE
    index = read_json(index_path)
    weight_map: dict[str, str] = {}
    for path in shard_paths(folder):
        kept: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(path).items():
            new = edit(name, tensor)
            if new is not None:
                kept[rename(name)] = new.contiguous()
                weight_map[rename(name)] = path.name
        tmp = path.with_suffix(".tmp")
        save_file(kept, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    index["weight_map"] = weight_map
    index["metadata"]["total_size"] = sum(
        t.numel() * t.element_size() for p in shard_paths(folder) for t in load_file(p).values()
    )
    write_json(index_path, index)


def open_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        CheckpointStore.open(folder)
    return str(info.value)


def full_logits(folder: Path, ids: list[int], dtype: str = "auto") -> torch.Tensor:
    rt = ElasticRuntime.open(folder, dtype=dtype)
    return prefill_logits(rt, rt.subnets.full, ids)


# Logits of two layouts holding the same float32 values: the code path is the same, only where
# each tensor sits in its file (its alignment) differs, which some BLAS kernels let change the
# last bits of a reduction. They are compared with the suite's float32 rule (conftest.py);
# anything really wrong (a tensor mis-mapped or swapped) moves logits of magnitude ~16 by units.


# ---- the folder and its config -------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    message = open_error(missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_a_file_is_not_a_checkpoint_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a folder")
    message = open_error(path)
    assert str(path) in message
    assert "not a folder" in message


def test_no_config_json(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    (folder / "config.json").unlink()
    message = open_error(folder)
    assert str(folder) in message
    assert "no config.json" in message


def test_config_json_that_is_not_json(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    # A download cut short: the first half of the real file.
    text = (folder / "config.json").read_text(encoding="utf-8")
    (folder / "config.json").write_text(text[: len(text) // 2], encoding="utf-8")
    message = open_error(folder)
    assert str(folder / "config.json") in message
    assert "not valid JSON" in message


def test_config_without_gemma3n_fields_names_every_missing_field(
    tiny_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    # Llama 3.2 1B's architecture fields, without its model_type: only the field check can tell
    # that this is not a Gemma 3n decoder (defaults would otherwise describe E4B).
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    }
    write_json(folder / "config.json", llama)
    message = open_error(folder)
    assert str(folder) in message
    assert "not a Gemma 3n config" in message
    gemma3n_only = (
        "hidden_size_per_layer_input",
        "vocab_size_per_layer_input",
        "altup_num_inputs",
        "laurel_rank",
        "num_kv_shared_layers",
    )
    for field in gemma3n_only:
        assert field in message, field
    # Fields the config does have are not reported as missing.
    assert "missing fields: " in message
    missing_part = message.split("missing fields: ", 1)[1]
    assert "num_attention_heads" not in missing_part


def test_wrong_model_type(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    cfg = read_json(folder / "config.json")
    # Gemma 3 (not 3n): a near miss that has every field we require.
    cfg["text_config"]["model_type"] = "gemma3_text"
    write_json(folder / "config.json", cfg)
    message = open_error(folder)
    assert str(folder) in message
    assert "'gemma3_text'" in message
    assert "model_type" in message


def test_unfiltered_layer_types_of_a_matformer_lab_export(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    cfg = read_json(folder / "config.json")
    text = cfg["text_config"]
    # What Google's notebook writes for a 30-layer subnet: layer count and widths cut, the
    # 35-entry layer_types of E4B left as it was.
    text["num_hidden_layers"] = 30
    text["intermediate_size"] = text["intermediate_size"][:30]
    assert len(text["layer_types"]) == 35
    write_json(folder / "config.json", cfg)
    message = open_error(folder)
    assert str(folder) in message
    assert "layer_types has 35 entries for 30 layers" in message


# ---- finding and reading the shards --------------------------------------------------------------


def test_no_weights_at_all(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    for path in shard_paths(folder):
        path.unlink()
    (folder / INDEX_FILE).unlink()
    message = open_error(folder)
    assert str(folder) in message
    assert "no weights found" in message
    assert SINGLE_FILE in message and INDEX_FILE in message


def test_corrupt_index_json(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    (folder / INDEX_FILE).write_text('{"metadata": {"total_size": 1}, "weight_map": {', "utf-8")
    message = open_error(folder)
    assert str(folder) in message
    assert f"{INDEX_FILE} is corrupt" in message


def test_index_naming_a_missing_shard(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    (folder / SHARD_2).unlink()  # an interrupted download
    message = open_error(folder)
    assert str(folder) in message
    assert "missing" in message
    assert SHARD_2 in message


def test_truncated_shard(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    path = folder / SHARD_2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    message = open_error(folder)
    assert str(path) in message
    assert "truncated" in message


@pytest.mark.parametrize("where", ["length", "json"])
def test_shard_with_garbage_header(tiny_dir: Path, tmp_path: Path, where: str) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    path = folder / SHARD_2
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    if where == "length":
        data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"  # claims a header of exabytes
    else:
        data[8 : 8 + header_len] = b"\xff\x00" * (header_len // 2) + b"\xff" * (header_len % 2)
    path.write_bytes(bytes(data))
    message = open_error(folder)
    assert str(path) in message
    assert "corrupt" in message


def test_index_placing_a_tensor_in_a_shard_that_lacks_it(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    index = read_json(folder / INDEX_FILE)
    name = f"{TEXT}layers.2.mlp.gate_proj.weight"
    other = {f for f in index["weight_map"].values() if f != index["weight_map"][name]}
    wrong = other.pop()
    index["weight_map"][name] = wrong
    write_json(folder / INDEX_FILE, index)
    message = open_error(folder)
    assert str(folder) in message
    assert wrong in message
    assert name in message


# ---- the text decoder's tensors ------------------------------------------------------------------


def test_missing_and_misshaped_tensors_are_reported_together(
    tiny_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    removed = {f"{TEXT}layers.3.mlp.up_proj.weight", f"{TEXT}norm.weight"}
    reshaped = f"{TEXT}layers.7.self_attn.q_proj.weight"
    original_shape: list[int] = []

    def edit(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if name in removed:
            return None
        if name == reshaped:
            original_shape.extend(t.shape)
            return t[: t.shape[0] // 2]  # half the heads: a checkpoint of another size
        return t

    rewrite_tensors(folder, edit)
    with pytest.raises(CheckpointError) as info:
        CheckpointStore.open(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "3 problem(s)" in message
    for name in removed:
        assert f"missing: {name}" in message
    q_out, hidden = original_shape
    assert (
        f"wrong shape: {reshaped}: expected {[q_out, hidden]}, found {[q_out // 2, hidden]}"
        in message
    )


def test_non_float_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    name = f"{TEXT}layers.5.post_attention_layernorm.weight"
    rewrite_tensors(folder, lambda n, t: t.to(torch.int32) if n == name else t)
    message = open_error(folder)
    assert str(folder) in message
    assert f"wrong dtype: {name}: I32 is not a float type" in message


# ---- other real layouts --------------------------------------------------------------------------


def test_single_file_layout_loads_with_the_same_logits(
    tiny, tiny64, tiny_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    tensors: dict[str, torch.Tensor] = {}
    for path in shard_paths(folder):
        tensors.update(load_file(path))
        path.unlink()
    (folder / INDEX_FILE).unlink()
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})

    store = CheckpointStore.open(folder)
    assert store.shard_names() == [SINGLE_FILE]
    assert sorted(store.names()) == sorted(tiny.store.names())

    ids = prompt_ids(40, seed=11)
    ours = full_logits(folder, ids)
    ref = prefill_logits(tiny, tiny.subnets.full, ids)
    assert_float32_close(ours, ref, prefill_logits(tiny64, tiny.subnets.full, ids))


def test_text_only_layout_loads_with_the_same_logits(
    tiny, tiny64, tiny_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(tiny_dir, tmp_path)
    cfg = read_json(folder / "config.json")
    flat = dict(cfg["text_config"], model_type="gemma3n_text")
    flat["architectures"] = ["Gemma3nForCausalLM"]
    write_json(folder / "config.json", flat)

    # model.language_model.X -> model.X; the vision/audio embedders dropped.
    rewrite_tensors(
        folder,
        lambda name, t: t if name.startswith(TEXT) else None,
        lambda name: "model." + name[len(TEXT) :],
    )

    store = CheckpointStore.open(folder)
    assert not store.config.multimodal
    assert not any(
        n.startswith((TEXT, "model.embed_vision.", "model.embed_audio.")) for n in store.names()
    )

    ids = prompt_ids(40, seed=12)
    ours = full_logits(folder, ids)
    ref = prefill_logits(tiny, tiny.subnets.full, ids)
    assert_float32_close(ours, ref, prefill_logits(tiny64, tiny.subnets.full, ids))


# ---- memory mapping ------------------------------------------------------------------------------


def mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[1], parts[5] if len(parts) == 6 else ""))
    return out


def mapping_of(address: int, maps: list[tuple[int, int, str, str]]) -> tuple[str, str]:
    """(perms, path) of the mapping holding `address`."""
    for lo, hi, perms, path in maps:
        if lo <= address < hi:
            return perms, path
    raise AssertionError(f"address {address:#x} is in no mapping")


def held_tensors(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a Weights object holds, wherever it holds it (fields, lists, layers)."""

    def walk(name: str, value: object) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from walk(f"{name}.{i}", v)
        elif isinstance(value, LayerWeights):
            for k, v in vars(value).items():
                yield from walk(f"{name}.{k}", v)

    for key, value in vars(weights).items():
        yield from walk(key, value)


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    assert t.is_contiguous()
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_are_read_only_views_of_the_shard_files(tiny, tiny_dir: Path) -> None:
    store = tiny.store
    weights = Weights(store)
    text = store.text
    maps = mappings()

    for layer, w in enumerate(weights.layers):
        name = f"{TEXT}layers.{layer}.mlp.gate_proj.weight"
        perms, path = mapping_of(w.gate.data_ptr(), maps)
        assert os.path.realpath(path) == os.path.realpath(tiny_dir / store.shard_of(name))
        # A stray in-place write into the weights every subnet shares must fault.
        assert "w" not in perms, (layer, perms)
        consumer = layer >= text.first_kv_shared_layer
        assert (w.k_proj is None) == consumer and (w.v_proj is None) == consumer
        assert (w.k_norm is None) == consumer
    assert text.first_kv_shared_layer == 20

    # Bytes the text decoder never reads: consumer layers' K/V and the multimodal embedders.
    never_read = [
        f"{TEXT}layers.{layer}.self_attn.{k}.weight"
        for layer in range(text.first_kv_shared_layer, text.num_hidden_layers)
        for k in ("k_proj", "v_proj", "k_norm")
    ] + [n for n in store.names() if n.startswith(("model.embed_vision.", "model.embed_audio."))]
    assert len(never_read) == 15 * 3 + 8
    forbidden = {n: byte_range(store.tensor(n)) for n in never_read}
    # They live in the same file mappings as the held tensors, so an overlap would be a real one.
    for name, (lo, _) in forbidden.items():
        assert mapping_of(lo, maps)[1].endswith(store.shard_of(name)), name

    held = list(held_tensors(weights))
    assert len(held) > 35 * 20
    for held_name, t in held:
        lo, hi = byte_range(t)
        for name, (flo, fhi) in forbidden.items():
            assert not (lo < fhi and flo < hi), f"{held_name} overlaps {name}"


def test_bf16_checkpoint_computed_in_float32_is_converted_once(
    tiny, tiny_dir: Path, tmp_path: Path
) -> None:
    bf16 = copy_of(tiny_dir, tmp_path)
    rewrite_tensors(bf16, lambda n, t: t.to(torch.bfloat16))
    # The same values kept in float32: what an exact conversion must reproduce.
    rounded = Path(shutil.copytree(tiny_dir, tmp_path / "rounded"))
    rewrite_tensors(rounded, lambda n, t: t.to(torch.bfloat16).to(torch.float32))

    store = CheckpointStore.open(bf16)
    assert store.dtype(f"{TEXT}layers.0.mlp.gate_proj.weight") == torch.bfloat16
    weights = Weights(store, dtype=torch.float32)
    maps = mappings() if Path("/proc/self/maps").exists() else None
    for name, t in held_tensors(weights):
        # The PLE table alone stays host-resident in the stored dtype; rows convert per step.
        expected = torch.bfloat16 if name == "ple_table" else torch.float32
        assert t.dtype == expected, name

    full = store.text.intermediate_size[0]
    for layer, w in enumerate(weights.layers):
        if maps is not None:
            # A converted copy in private memory, not the mapped bf16 bytes.
            assert not mapping_of(w.gate.data_ptr(), maps)[1].endswith(".safetensors")
        for width in (full // 2, full):
            gate, up, down = weights.ffn(layer, width)
            # Every subnet's FFN is a view of the one converted tensor, never its own copy.
            assert gate.data_ptr() == w.gate.data_ptr(), (layer, width)
            assert up.data_ptr() == w.up.data_ptr(), (layer, width)
            assert down.data_ptr() == w.down.data_ptr(), (layer, width)
            assert gate.dtype == torch.float32

    ids = prompt_ids(40, seed=13)
    ours = full_logits(bf16, ids, dtype="float32")
    # Exact conversion: the same float32 values, whether converted at load or stored so.
    same = full_logits(rounded, ids, dtype="float32")
    assert_float32_close(ours, same, full_logits(rounded, ids, dtype="float64"))
    # Against the float32 original, bf16 keeps 8 bits of mantissa: 35 layers move logits by
    # ~1 (of ~16) but the ranking of the top token survives almost everywhere.
    ref = prefill_logits(tiny, tiny.subnets.full, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert (ours - ref).abs().max() < 3.0
