"""`concentric export` writes a subnet as a standalone Hugging Face checkpoint that is right on
disk: shards that open and an index that adds up, a config cut to the kept layers (layer_types,
KV sharing and sparsity filtered, not E4B's constants), tensors renamed to their new layer
indices and sliced to the subnet's widths, the per-layer-embedding table re-packed, the
multimodal embedders and tokenizer files carried over unchanged, and a folder transformers loads
with no missing weights. It refuses to write over anything.

Whether the exported model computes what the elastic runtime computes is test_oracle.py's job.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, Gemma3nForCausalLM

from server.checkpoint.store import INDEX_FILE, CheckpointStore
from server.runtime.elastic import ElasticRuntime
from server.tools.export import export_subnet
from server.vocabulary.subnets import Subnet

SUBNETS = ("e2b", "skip-3-7")
TEXT = "model.language_model."
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@pytest.fixture(scope="module")
def exported(tiny: ElasticRuntime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {
        name: export_subnet(tiny.store, tiny.subnets[name], root / name, progress=False)
        for name in SUBNETS
    }


def data_size(path: Path) -> int:
    """Bytes of a safetensors file after its 8-byte length and its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = f.get_tensor(name)
    return out


def load_hf(folder: Path):
    cfg = AutoConfig.from_pretrained(folder)
    return Gemma3nForCausalLM.from_pretrained(
        folder, config=cfg.text_config, output_loading_info=True
    )


@pytest.mark.parametrize("name", SUBNETS)
def test_index_and_shards_agree(exported: dict[str, Path], name: str) -> None:
    folder = exported[name]
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(folder.glob("*.safetensors"))
    assert shards
    assert index["metadata"]["total_size"] == sum(data_size(p) for p in shards)
    for path in shards:
        with safe_open(path, framework="pt") as f:
            held = set(f.keys())
        assert held == {n for n, file in index["weight_map"].items() if file == path.name}


@pytest.mark.parametrize("name", SUBNETS)
def test_config_is_cut_to_the_kept_layers(tiny: ElasticRuntime, exported, name: str) -> None:
    subnet: Subnet = tiny.subnets[name]
    source = tiny.store.text
    cfg = json.loads((exported[name] / "config.json").read_text())["text_config"]
    kept = list(subnet.layers)
    assert len(kept) < 35  # both subnets skip layers: the cuts below are real cuts
    assert cfg["num_hidden_layers"] == len(kept)
    assert cfg["intermediate_size"] == list(subnet.widths)
    assert cfg["layer_types"] == [source.layer_types[i] for i in kept]
    consumers = [i for i in kept if i >= 20]
    assert cfg["num_kv_shared_layers"] == len(consumers)
    sparsity = cfg["activation_sparsity_pattern"]
    assert len(sparsity) == len(kept)
    assert [i for i, p in zip(kept, sparsity, strict=True) if p == 0.95] == [
        i for i in kept if i < 10
    ]
    assert all(p == 0.0 for i, p in zip(kept, sparsity, strict=True) if i >= 10)
    # Our own reader accepts it, and agrees on which layers now own and share KV.
    store = CheckpointStore.open(exported[name])
    assert store.text.first_kv_shared_layer == len(kept) - len(consumers)
    assert len(store.text.kv_producers) == 2


@pytest.mark.parametrize("name", SUBNETS)
def test_transformers_loads_it_with_nothing_missing(tiny: ElasticRuntime, exported, name) -> None:
    model, info = load_hf(exported[name])
    assert model.config.num_hidden_layers == len(tiny.subnets[name].layers)
    assert not info["missing_keys"]
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]
    # A causal LM has no multimodal embedders, and transformers 5 does not build consumer
    # layers' K/V: those are the only tensors it may leave unused.
    first_consumer = model.config.num_hidden_layers - model.config.num_kv_shared_layers
    for key in info["unexpected_keys"]:
        if key.startswith(("model.embed_vision.", "model.embed_audio.")):
            continue
        layer = int(key.split(".")[2])
        assert layer >= first_consumer, key
        assert key.split(".", 3)[3] in (
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.k_norm.weight",
        ), key


@pytest.mark.parametrize("name", SUBNETS)
def test_multimodal_embedders_are_byte_identical(tiny: ElasticRuntime, exported, name) -> None:
    out = read_tensors(exported[name])
    embedders = [
        n for n in tiny.store.names() if n.startswith(("model.embed_vision.", "model.embed_audio."))
    ]
    assert len(embedders) == 8
    for n in embedders:
        src = tiny.store.tensor(n)
        assert out[n].dtype == src.dtype and out[n].shape == src.shape, n
        assert out[n].numpy().tobytes() == src.numpy().tobytes(), n


@pytest.mark.parametrize("name", SUBNETS)
def test_kept_layers_are_renamed_and_sliced(tiny: ElasticRuntime, exported, name: str) -> None:
    subnet: Subnet = tiny.subnets[name]
    out = read_tensors(exported[name])
    n_kept = len(subnet.layers)
    layer_indices = {int(k.split(".")[3]) for k in out if k.startswith(TEXT + "layers.")}
    assert layer_indices == set(range(n_kept))
    store = tiny.store
    for new, old in enumerate(subnet.layers):
        width = subnet.width_of(old)
        src_prefix, out_prefix = f"{TEXT}layers.{old}.", f"{TEXT}layers.{new}."
        src_names = [n for n in store.names() if n.startswith(src_prefix)]
        out_names = [n for n in out if n.startswith(out_prefix)]
        assert len(out_names) == len(src_names), (new, old)
        for src_name in src_names:
            rest = src_name[len(src_prefix) :]
            got, src = out[out_prefix + rest], store.tensor(src_name)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                expected = src[:width]
            elif rest == "mlp.down_proj.weight":
                expected = src[:, :width]
            else:
                expected = src
            assert torch.equal(got, expected), out_prefix + rest
    # A layer at a different width than its neighbours keeps its own (skip-3-7: layer 4 full).
    if name == "skip-3-7":
        new4 = subnet.layers.index(4)
        assert out[f"{TEXT}layers.{new4}.mlp.gate_proj.weight"].shape[0] == 256
        assert out[f"{TEXT}layers.{new4 + 1}.mlp.gate_proj.weight"].shape[0] == 128


@pytest.mark.parametrize("name", SUBNETS)
def test_per_layer_embeddings_are_repacked(tiny: ElasticRuntime, exported, name: str) -> None:
    subnet: Subnet = tiny.subnets[name]
    text = tiny.store.text
    d = text.hidden_size_per_layer_input
    out = read_tensors(exported[name])
    src_table = tiny.store.text_tensor("embed_tokens_per_layer.weight")
    table = out[TEXT + "embed_tokens_per_layer.weight"]
    assert table.shape == (src_table.shape[0], len(subnet.layers) * d)
    src_proj = tiny.store.text_tensor("per_layer_model_projection.weight")
    proj = out[TEXT + "per_layer_model_projection.weight"]
    assert proj.shape == (len(subnet.layers) * d, src_proj.shape[1])
    for new, old in enumerate(subnet.layers):
        # Column chunk j of the table and row chunk j of the projection are kept layer j's.
        assert torch.equal(table[:, new * d : (new + 1) * d], src_table[:, old * d : (old + 1) * d])
        assert torch.equal(proj[new * d : (new + 1) * d], src_proj[old * d : (old + 1) * d])


def test_tokenizer_files_are_copied(tiny_dir: Path, exported) -> None:
    for folder in exported.values():
        for file in COPIED:
            assert (folder / file).read_bytes() == (tiny_dir / file).read_bytes(), file


def test_small_shards_still_load(tiny: ElasticRuntime, tmp_path: Path) -> None:
    limit = 1_000_000
    out = export_subnet(
        tiny.store, tiny.subnets["e2b"], tmp_path / "small", max_shard_bytes=limit, progress=False
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 5
    index = json.loads((out / INDEX_FILE).read_text())
    for path in shards:
        with safe_open(path, framework="pt") as f:
            # A shard is within the limit unless one tensor alone exceeds it.
            assert data_size(path) <= limit or len(f.keys()) == 1, path.name
        assert path.name.endswith(f"-of-{len(shards):05d}.safetensors")
    assert index["metadata"]["total_size"] == sum(data_size(p) for p in shards)
    CheckpointStore.open(out)
    _, info = load_hf(out)
    assert not info["missing_keys"]


def test_refuses_a_non_empty_folder(tiny: ElasticRuntime, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_subnet(tiny.store, tiny.subnets["e2b"], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_refuses_a_file_as_the_target(tiny: ElasticRuntime, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"someone's file")
    # Refused by name like a non-empty folder (it once escaped as NotADirectoryError).
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_subnet(tiny.store, tiny.subnets["e2b"], out, progress=False)
    assert out.read_bytes() == b"someone's file"


def test_refuses_a_shard_limit_below_one_byte(tiny: ElasticRuntime, tmp_path: Path) -> None:
    # A limit of 0 would put every tensor in a shard of its own (hundreds of files).
    with pytest.raises(ValueError, match="max_shard_bytes"):
        export_subnet(
            tiny.store, tiny.subnets["e2b"], tmp_path / "x", max_shard_bytes=0, progress=False
        )
    assert not any(tmp_path.iterdir())


def test_refuses_the_source_folder(tiny: ElasticRuntime, tiny_dir: Path) -> None:
    before = sorted(p.name for p in tiny_dir.parent.iterdir())
    # Spelled another way, so only resolving the path can tell it is the source. ValueError,
    # not the FileExistsError any non-empty folder gets: the source is recognised as such.
    with pytest.raises(ValueError, match="source"):
        export_subnet(
            tiny.store, tiny.subnets["e2b"], tiny_dir / ".." / tiny_dir.name, progress=False
        )
    assert sorted(p.name for p in tiny_dir.parent.iterdir()) == before
