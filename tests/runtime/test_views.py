"""Subnets are views of one weight copy: proven by storage pointers and by resident memory.

Also: the weights are mapped read-only (a write would fault rather than corrupt what every
subnet shares), and the per-layer embedding table stays in the host mapping, gathered by rows.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from server.engine.offline import GenerationRequest, greedy
from tests.runtime.conftest import generate, prompt_ids

REPO = Path(__file__).resolve().parents[2]


def test_every_subnet_ffn_is_a_view_of_the_one_copy(tiny):
    w = tiny.weights
    for subnet in tiny.subnets:
        for layer, width in zip(subnet.layers, subnet.widths, strict=True):
            full = w.layers[layer]
            gate, up, down = w.ffn(layer, width)
            assert gate.shape[0] == width and down.shape[1] == width
            for view, whole in ((gate, full.gate), (up, full.up), (down, full.down)):
                assert view.data_ptr() == whole.data_ptr()
                assert view.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            # down keeps the full row stride: a strided column prefix, not a compacted copy
            assert down.stride() == full.down.stride()


def test_serving_every_subnet_adds_no_weight_memory(tiny_dir):
    # Measured in a fresh process: resident memory after serving every subnet in turn grows by
    # far less than ONE copy of the FFN weights (a copying server would add ~19 of them).
    script = f"""
import torch
torch.set_num_threads(2)
from server.runtime.elastic import ElasticRuntime
from server.engine.offline import GenerationRequest, greedy
from tests.runtime.conftest import generate
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
rt = ElasticRuntime.open({str(tiny_dir)!r})
p = list(range(110, 150))
for _ in range(2):
    generate(rt, [GenerationRequest(rt.subnets.full, p, greedy(4))])
before = rss()
for s in rt.subnets:
    generate(rt, [GenerationRequest(s, p, greedy(4))])
ffn = sum(layer.gate.nbytes * 3 for layer in rt.weights.layers)
print(rss() - before, ffn, len(rt.subnets))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    growth, ffn_bytes, count = map(int, out.stdout.split())
    assert count >= 19
    assert growth < ffn_bytes, (
        f"RSS grew {growth} B serving {count} subnets (one FFN copy: {ffn_bytes} B)"
    )


def test_weights_are_mapped_read_only_and_never_written(tiny, tiny_dir):
    shard_files = sorted(tiny_dir.glob("*.safetensors"))
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shard_files}
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = [line for line in maps if any(line.endswith(str(f)) for f in shard_files)]
    assert mapped, "the shards are not memory-mapped"
    assert all("w" not in line.split()[1] for line in mapped), mapped
    reqs = [
        GenerationRequest(s, prompt_ids(30, seed=i), greedy(4)) for i, s in enumerate(tiny.subnets)
    ]
    generate(tiny, reqs)
    after = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shard_files}
    assert after == before


def test_ple_table_stays_in_the_host_mapping_and_only_batch_rows_are_gathered(tiny, monkeypatch):
    w = tiny.weights
    table = w.ple_table
    assert table.data_ptr() == tiny.store.text_tensor("embed_tokens_per_layer.weight").data_ptr()
    gathered: list[int] = []
    original = torch.Tensor.index_select

    def spy(self, dim, index):
        if self.data_ptr() == table.data_ptr():
            gathered.append(index.numel())
        return original(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    ids = prompt_ids(23, seed=5)
    generate(tiny, [GenerationRequest(tiny.subnets["e2b"], ids, greedy(3))])
    # prefill gathers the 23 prompt rows, then one row per decode step
    assert gathered == [23, 1, 1]
