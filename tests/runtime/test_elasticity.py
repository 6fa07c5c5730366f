"""Elasticity on the tiny model: resident widths follow a scripted headroom, requests stay whole.

The FFN buffers are private copies here (as on an accelerator), so growing really uploads rings
and shrinking really releases them, on the CPU. Free memory drops step by step: the resident
widths shrink level by level, the subnets on offer shrink with them, running requests are moved
or finish, and no request fails; memory returns and the widths grow back. An out-of-memory error
in a step shrinks and retries instead of failing anyone.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from policies.subnet_choice import LargestFitsPolicy
from server.checkpoint.store import CheckpointStore
from server.checkpoint.tokenizer import TextTokenizer
from server.engine.assembly import assemble_engine
from server.engine.elasticity import Elasticity, ElasticityConfig
from server.engine.offline import GenerationRequest
from server.engine.scheduler import SchedulerConfig
from server.runtime.elastic import ElasticRuntime
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.weights import Weights
from server.telemetry.headroom import ProbeSampler, ScriptedProbe
from server.vocabulary.residency_levels import residency_levels
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import load_subnet_table
from tests.runtime.conftest import alone, prompt_ids

MB = 1024 * 1024


def elastic_engine(tiny_dir, free_mb: float, config: ElasticityConfig | None = None):
    store = CheckpointStore.open(tiny_dir)
    weights = Weights(store, private_ffn=True)
    rt = ElasticRuntime(
        store,
        weights,
        Gemma3nModel(weights),
        load_subnet_table(store.text),
        TextTokenizer(tiny_dir),
    )
    probe = ScriptedProbe(total_bytes=100 * MB, free_bytes=int(free_mb * MB))
    sampler = ProbeSampler(probe)
    el = Elasticity(weights, rt.subnets, sampler, config or ElasticityConfig(20 * MB, 40 * MB))
    config = SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=64, max_prefill_chunk=32, max_model_len=1024
    )
    eng = assemble_engine(
        rt, 8 * MB, config, block_size=8, subnet_policy=LargestFitsPolicy(), elasticity=el
    )
    return eng, el, probe, sampler, rt


def test_residency_levels_are_nested_and_end_at_full(tiny):
    subnets = [(s.layers, s.widths, s.effective_params) for s in tiny.subnets]
    levels = residency_levels(tiny.weights.residency.full, subnets)
    assert levels[-1] == tiny.weights.residency.full
    for lower, upper in itertools.pairwise(levels):
        assert all(a <= b for a, b in zip(lower, upper, strict=True)) and lower != upper
    smallest = min(tiny.subnets, key=lambda s: s.effective_params)
    assert all(
        w <= levels[0][layer] for layer, w in zip(smallest.layers, smallest.widths, strict=True)
    )


def test_grow_uploads_only_the_ring_and_shrink_releases_it(tiny_dir):
    store = CheckpointStore.open(tiny_dir)
    w = Weights(store, private_ffn=True)
    full = w.residency.full
    half = tuple(k // 2 for k in full)
    before = w.residency.resident_bytes
    report = w.resize_ffn(half)
    assert report.released_bytes == before - w.residency.resident_bytes > 0
    assert report.uploaded_bytes == 0
    gate_half = w.layers[3].gate
    assert gate_half.shape[0] == full[3] // 2
    host_gate = store.text_tensor("layers.3.mlp.gate_proj.weight")
    assert torch.equal(gate_half, host_gate[: full[3] // 2])
    report = w.resize_ffn(full)
    ring = sum(3 * (f - h) * store.text.hidden_size * 4 for f, h in zip(full, half, strict=True))
    assert report.uploaded_bytes == ring  # only the missing rows crossed
    assert torch.equal(w.layers[3].down, store.text_tensor("layers.3.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="resident"):
        w.resize_ffn(half)
        w.ffn(3, full[3])


def test_growth_is_prepared_in_the_background_and_swapped_in_between_steps(tiny_dir):
    store = CheckpointStore.open(tiny_dir)
    w = Weights(store, private_ffn=True)
    full = w.residency.full
    half = tuple(k // 2 for k in full)
    w.resize_ffn(half)
    pending = w.prepare_ffn(full)
    # until the commit, the forward keeps reading the old (half-width) buffers
    assert w.layers[5].gate.shape[0] == full[5] // 2
    report = w.commit_ffn(pending)
    assert pending.done() and report.uploaded_bytes > 0
    assert w.layers[5].gate.shape[0] == full[5]
    assert torch.equal(w.layers[5].up, store.text_tensor("layers.5.mlp.up_proj.weight"))
    stale = w.prepare_ffn(half)
    w.resize_ffn(tuple(k // 4 for k in full))  # widths moved on meanwhile: refuse the stale one
    with pytest.raises(RuntimeError, match="changed while a resize"):
        w.commit_ffn(stale)


def _serve(eng, count, start, phase_hook, max_tokens=10):
    """Submit `count` requests over time; call phase_hook(step) before each step."""
    outputs, finished = {}, {}
    step = 0
    submitted = 0
    while submitted < count or eng.has_work:
        if submitted < count and step % 2 == 0:
            rid = f"q{start + submitted}"
            eng.add_request(
                rid,
                prompt_ids(12 + submitted % 9, seed=start + submitted),
                None,
                SamplingParams(max_tokens=max_tokens, temperature=0.0),
            )
            submitted += 1
        phase_hook(step)
        for out in eng.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < 5000
    return outputs, finished


def test_scripted_headroom_shrinks_then_grows_and_no_request_fails(tiny_dir, tiny):
    eng, el, probe, sampler, _ = elastic_engine(tiny_dir, free_mb=60)
    top = len(el.levels) - 1
    assert el.current == top
    levels_seen, largest_offered = [], []

    def script(step):
        if 6 <= step < 6 + 3 * top:
            probe.set_free(10 * MB)  # under the low-water mark: shrink, level by level
        elif step >= 6 + 3 * top:
            probe.set_free(90 * MB)  # memory is back: grow
        sampler.sample()
        levels_seen.append(el.current)
        offered = [s for s in eng.chooser.table if el.offered(s)]
        largest_offered.append(max(s.effective_params for s in offered))

    outputs, finished = _serve(eng, 40, 0, script)
    assert len(finished) == 40
    assert all(o.finish_reason in ("length", "stop") for o in finished.values())
    low = min(levels_seen)
    assert low < top and levels_seen[-1] == top, levels_seen
    # the subnets on offer shrank with the widths and came back
    assert min(largest_offered) < largest_offered[0] and largest_offered[-1] == largest_offered[0]
    assert el.counters.shrinks >= 1 and el.counters.grows >= 1
    # requests that were never moved produced exactly what their subnet gives alone
    unmoved = [rid for rid in sorted(finished) if rid not in el.moved]
    assert unmoved
    for rid in unmoved[::4]:
        i, out = int(rid[1:]), finished[rid]
        params = SamplingParams(max_tokens=10, temperature=0.0)
        prompt = prompt_ids(12 + i % 9, seed=i)
        request = GenerationRequest(tiny.subnets[out.subnet], prompt, params)
        assert outputs[rid] == alone(tiny, request).token_ids, rid
    blocks = eng.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_out_of_memory_in_a_step_shrinks_and_retries(tiny_dir, monkeypatch):
    eng, el, _probe, _sampler, rt = elastic_engine(tiny_dir, free_mb=60)
    top = len(el.levels) - 1
    forward = rt.model.forward
    calls = {"n": 0}

    def flaky(batch, kv):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(batch, kv)

    monkeypatch.setattr(rt.model, "forward", flaky)
    _, finished = _serve(eng, 6, 100, lambda step: None)
    assert len(finished) == 6
    assert all(o.finish_reason in ("length", "stop") for o in finished.values())
    # shrunk one level, and not grown back by the (stale, roomy) reading during the cool-down
    assert el.counters.oom_shrinks == 1 and el.current == top - 1 and el.counters.grows == 0


def test_resident_widths_follow_the_host_probe_on_a_cpu(tiny_dir):
    # The CPU path of a real server: the host probe reports this process's resident memory
    # against a configured budget. A budget just above what we use leaves no headroom: the
    # widths shrink; a generous budget gives headroom back: they grow.
    from server.telemetry.headroom import HostProbe

    eng, el, _, sampler, _ = elastic_engine(tiny_dir, free_mb=60)
    probe = HostProbe(budget_bytes=1)
    sampler.probe = probe
    top = len(el.levels) - 1
    probe.budget = sampler.probe.read().process_bytes + 5 * MB  # 5 MB free < 20 MB low water
    seen = []

    def script(step):
        if step == 20:
            probe.budget = probe.read().process_bytes + 500 * MB  # plenty again
        sampler.sample()
        seen.append(el.current)

    _, finished = _serve(eng, 30, 200, script)
    assert all(o.finish_reason in ("length", "stop") for o in finished.values())
    assert min(seen) < top and seen[-1] == top, seen
    assert sampler.latest.source == "host"


def test_a_failed_background_grow_is_counted_and_no_request_fails(tiny_dir, monkeypatch):
    """The grow's build runs out of memory on its thread (the headroom went elsewhere): the
    engine's steps go on, no request fails, the widths stay, the failure is counted; once the
    back-off has passed and the build works again, the widths grow back."""
    config = ElasticityConfig(20 * MB, 40 * MB, grow_backoff_s=0.0)
    eng, el, probe, sampler, rt = elastic_engine(tiny_dir, free_mb=60, config=config)
    top = len(el.levels) - 1
    residency = rt.weights.residency
    build = residency._grow_layer

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the grow's build)")

    monkeypatch.setattr(residency, "_grow_layer", out_of_memory)
    seen = []

    def script(step):
        probe.set_free((10 if step < 4 else 90) * MB)  # down a level, then room to grow
        if step == 12:
            monkeypatch.setattr(residency, "_grow_layer", build)  # the memory is there now
        sampler.sample()
        if el._growing is not None:
            el._growing[1].thread.join()  # let the background build end before the tick
        seen.append(el.current)

    _, finished = _serve(eng, 16, 400, script)
    assert len(finished) == 16
    assert all(o.error is None and o.finish_reason in ("length", "stop") for o in finished.values())
    assert el.counters.grow_failures >= 1 and min(seen) < top
    assert el.current == top and rt.weights.resident_widths == el.levels[top]
    full = rt.store.text_tensor("layers.7.mlp.gate_proj.weight")
    assert torch.equal(rt.weights.layers[7].gate, full)


def test_transient_bytes_are_what_a_resize_holds_beside_the_resident_buffers(tiny_dir):
    """A grow builds every grown layer whole beside the old buffers; a shrink copies one layer's
    kept prefix at a time. Private buffers only: views cost nothing."""
    store = CheckpointStore.open(tiny_dir)
    w = Weights(store, private_ffn=True)
    full = w.residency.full
    hidden, item = store.text.hidden_size, 4
    half = tuple(k // 2 for k in full)
    assert w.transient_bytes(half) == 3 * max(half) * hidden * item
    w.resize_ffn(half)
    mixed = (full[0], *half[1:])  # only layer 0 grows
    assert w.transient_bytes(mixed) == 3 * full[0] * hidden * item
    assert w.transient_bytes(full) == 3 * sum(full) * hidden * item
    assert Weights(store).transient_bytes(half) == 0  # views of the mapping


def test_a_shrink_replaces_one_layer_at_a_time(tiny_dir):
    """Each layer's old buffers are dropped before the next layer is copied (the peak is one
    layer), and what each layer holds afterwards is its own prefix. Freed by reference counting
    alone: no garbage collection runs (a buffer kept alive by a cycle would not be released
    until one did, and the peak would be more than a layer)."""
    import weakref

    store = CheckpointStore.open(tiny_dir)
    w = Weights(store, private_ffn=True)
    half = tuple(k // 2 for k in w.residency.full)
    olds = [weakref.ref(w.residency.buffers[i][0]) for i in range(len(half))]
    alive_at_swap = []

    def on_replace(layer, buffers):
        alive_at_swap.append([ref() is not None for ref in olds])
        w._replace_ffn(layer, buffers)

    w.residency.on_replace = on_replace
    w.resize_ffn(half)
    # when layer i is replaced, the old buffers of the layers before it are gone already and
    # those after it are still there: one layer at a time
    n = len(half)
    assert alive_at_swap == [[False] * i + [True] * (n - i) for i in range(n)]
    gate = store.text_tensor("layers.9.mlp.gate_proj.weight")
    assert torch.equal(w.layers[9].gate, gate[: half[9]]) and w.layers[9].gate.is_contiguous()
