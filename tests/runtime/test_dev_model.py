"""Dev checkpoints are what every test, demo and benchmark runs on, so they must be trustworthy:
the same bytes every time, the real `google/gemma-3n-E4B-it` layout (files, tensor names, shards,
index, a config transformers loads as Gemma 3n with E4B's topology, a tokenizer with a chat
template), weights that are not degenerate, and sizes fit for their purpose.

The `mini` and `bench` presets are sized from their tensor plans, which draw no values: nothing
large is generated here.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Gemma3nConfig

from server.checkpoint.store import INDEX_FILE, CheckpointStore
from server.tools.dev_model import (
    PRESETS,
    TorchDraws,
    _tensor_plan,
    make_dev_model,
    write_dev_checkpoint,
)
from server.vocabulary.subnets import load_subnet_table
from server.vocabulary.text_config import FULL, read_checkpoint_config

MB = 1_000_000


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_header(path: Path) -> dict:
    """The JSON header of a safetensors file, parsed here (independently of server/)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def all_tensors(folder: Path):
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def test_same_preset_gives_the_same_bytes(tiny_dir: Path, tmp_path: Path) -> None:
    # tiny_dir was made once for the session; make it again elsewhere and compare every file.
    again = make_dev_model("tiny", tmp_path / "again", progress=False)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert sha256(tiny_dir / name) == sha256(again / name), name


def test_real_layout(tiny_dir: Path) -> None:
    store = CheckpointStore.open(tiny_dir)
    names = set(store.names())
    missing = [n for n in store.expected_shapes() if n not in names]
    assert not missing
    # Consumer layers keep their dead K/V weights, as the real checkpoint does.
    text = store.text
    for layer in range(text.first_kv_shared_layer, text.num_hidden_layers):
        for rel in text.dead_kv_tensor_shapes(layer):
            assert f"model.language_model.layers.{layer}.{rel}" in names
    for kind in ("vision", "audio"):
        embedder = {n for n in names if n.startswith(f"model.embed_{kind}.")}
        assert f"model.embed_{kind}.embedding.weight" in embedder
        assert len(embedder) == 4, embedder

    shards = sorted(tiny_dir.glob("*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((tiny_dir / INDEX_FILE).read_text())
    headers = {p.name: shard_header(p) for p in shards}
    sizes = [
        e["data_offsets"][1] - e["data_offsets"][0] for h in headers.values() for e in h.values()
    ]
    assert index["metadata"]["total_size"] == sum(sizes)
    # The index places every tensor in the shard that holds it, and nothing else.
    held = {name: file for file, h in headers.items() for name in h}
    assert index["weight_map"] == held


def test_config_is_gemma3n_with_e4b_topology(tiny_dir: Path) -> None:
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert isinstance(cfg, Gemma3nConfig)
    t = cfg.text_config
    assert t.num_hidden_layers == 35
    full_layers = [i for i, kind in enumerate(t.layer_types) if kind == FULL]
    assert full_layers == list(range(4, 35, 5))
    assert t.num_kv_shared_layers == 15
    assert t.altup_num_inputs == 4
    sparse = [i for i, p in enumerate(t.activation_sparsity_pattern) if p > 0]
    assert sparse == list(range(10))
    assert all(t.activation_sparsity_pattern[i] == 0.95 for i in sparse)

    ours = read_checkpoint_config(tiny_dir).text
    assert ours.kv_producers == (18, 19)
    # The official table's E2B (8192 of E4B's 16384), scaled to this checkpoint, is the nested
    # half-width model.
    e2b = load_subnet_table(ours)["e2b"]
    assert set(e2b.widths) == {ours.full_width // 2}
    assert ours.full_width == t.intermediate_size[0]


def test_tokenizer_and_generation_config(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<start_of_turn>" in prompt and "Hello" in prompt
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != tok.unk_token_id
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert end_of_turn in gen["eos_token_id"]
    assert tok.eos_token_id in gen["eos_token_id"]
    # Gemma 3n's sampling defaults, which the server applies to fields a request leaves unset.
    assert (gen["do_sample"], gen["top_k"], gen["top_p"]) == (True, 64, 0.95)


def test_weights_are_not_degenerate(tiny_dir: Path) -> None:
    text = read_checkpoint_config(tiny_dir).text
    count = 0
    for name, t in all_tensors(tiny_dir):
        count += 1
        assert t.dtype == torch.float32, name
        assert torch.isfinite(t).all(), name
        assert t.abs().max() > 0, f"{name} is all zeros"
        if t.numel() > 1:
            assert t.std() > 0, f"{name} is constant"
        if name == "model.language_model.embed_tokens.weight":
            # Ids past the text vocabulary (vision/audio) carry the pad row, as Google's
            # converter leaves them; the text rows differ from it.
            pad = t[text.pad_token_id]
            assert torch.equal(
                t[text.vocab_size_per_layer_input :],
                pad.expand_as(t[text.vocab_size_per_layer_input :]),
            )
            assert not torch.equal(t[text.vocab_size_per_layer_input - 1], pad)
    assert count > 35 * 20


def test_sizes_fit_their_purpose(tiny_dir: Path) -> None:
    tiny_bytes = sum(p.stat().st_size for p in tiny_dir.iterdir())
    assert tiny_bytes < 16 * MB

    planned: dict[str, int] = {}
    for name, preset in PRESETS.items():
        rng = np.random.Generator(np.random.PCG64(preset.seed))
        state = rng.bit_generator.state
        planned[name] = sum(t.nbytes for t in _tensor_plan(preset, rng))
        # Planning draws nothing: values come only when the writer calls produce().
        assert rng.bit_generator.state == state
    # The plan is the checkpoint: its sum is what tiny actually wrote.
    index = json.loads((tiny_dir / INDEX_FILE).read_text())
    assert planned["tiny"] == index["metadata"]["total_size"]
    assert 100 * MB < planned["mini"] < 300 * MB
    assert 400 * MB < planned["bench"] < 1000 * MB
    # bench at the real text vocabulary: the embedding table grows 32x (0.54 GB), the
    # per-layer-embedding table 8x (32x the ids at a quarter of the width: 0.59 GB).
    assert 1500 * MB < planned["bench-262k"] < 2000 * MB
    assert PRESETS["bench-262k"].text_vocab == 262144


def test_refuses_a_non_empty_out_folder(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder") as info:
        make_dev_model("tiny", out, progress=False)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_preset_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        make_dev_model("huge", tmp_path / "x", progress=False)
    message = str(info.value)
    assert "'huge'" in message
    for name in PRESETS:
        assert name in message
    assert not (tmp_path / "x").exists()


def test_torch_draws_write_the_same_layout_in_another_dtype(tmp_path: Path) -> None:
    # What benchmarks/gpu_e4b.py does at E4B's sizes on a GPU, here at tiny's on the CPU: values
    # from a torch generator, bf16, in row blocks (24 rows of the embedding per block, so the
    # copied rows past the text vocabulary start inside a block), and a smaller tokenizer.
    p = PRESETS["tiny"]

    def write(name: str) -> Path:
        draws = TorchDraws("cpu", torch.bfloat16, seed=7, block_bytes=24 * p.hidden * 4)
        return write_dev_checkpoint(
            tmp_path / name, "tiny-bf16", p, draws, tokenizer_vocab=400, progress=False
        )

    folder = write("a")
    CheckpointStore.open(folder)  # every tensor the decoder needs, named and shaped as the real one
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(AutoTokenizer.from_pretrained(folder)) == 400
    tensors = dict(all_tensors(folder))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    t = "model.language_model."
    embed = tensors[t + "embed_tokens.weight"]
    assert torch.equal(embed[p.text_vocab :], embed[0].expand_as(embed[p.text_vocab :]))
    assert not torch.equal(embed[p.text_vocab - 1], embed[0])
    # The presets' scales: std 1/sqrt(d) for the PLE table, norms within 20% of 1.
    ple = tensors[t + "embed_tokens_per_layer.weight"].float()
    assert abs(ple.std().item() * p.ple**0.5 - 1) < 0.05
    norm = tensors[t + "norm.weight"].float()
    assert norm.min() >= 0.8 and norm.max() <= 1.2 and norm.std() > 0
    # One seed and block size, one checkpoint.
    again = write("b")
    for shard in sorted(folder.glob("*.safetensors")):
        assert sha256(shard) == sha256(again / shard.name)
