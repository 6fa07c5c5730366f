"""The compiled decode step (server/runtime/decode_graph.py) against the eager forward.

Compiled with torch.compile's "aot_eager" backend: the same graph capture (dynamo, fullgraph)
and functionalisation (the KV cache written in place) that inductor compiles, without generating
code, which on this CPU takes minutes per graph (benchmarks/bench_runtime.py measures inductor).

- every subnet, and a batch mixing subnets (skipped layers, other widths, another KV layout),
  gives the same greedy tokens compiled as eager, and logits equal up to float32 rounding (the
  suite's rule: tests/runtime/conftest.py);
- after one step per bucket (the warm-up), every subnet in any mix runs with no new compilation:
  the mix is data (keep and width masks), never a guard. Later steps of a bucket run its code
  directly, without dynamo (decode_graph.py); here each is first checked against the guards
  dynamo made for the bucket, and a failed check fails the step;
- compiling a bucket leaves its code (and what dynamo made with it) frozen out of the garbage
  collector's full passes (object_heap.py), so that no later step stalls walking it;
- a greedy batch-1 step dispatches at most AROUND_GRAPH ops around its graph (planning, the
  upload, the per-layer embedding rows, sampling), a sampled one (top_k, top_p) at most
  AROUND_SAMPLED_GRAPH: on an accelerator each is a launch;
- a captured step (CUDA's recording stood in for by one that replays the same computation)
  copies each step's inputs into the recorded ones and returns the recorded output: the same
  tokens as eager; a resize that replaces FFN buffers makes it record again before it replays;
  a capture that fails leaves its bucket uncaptured, with a warning, and one a CPU replay would
  not redo (kernel_recording.Unrecordable) runs as compiled without one;
- a paged step (attention reading K/V where the cache holds them, FlexAttention) gives the same
  tokens as eager for mixes of subnets, again without recompiling. Run by "aot_eager",
  FlexAttention attends every slot of the pool through its `mask_mod`, so these engines get a
  small pool; test_paged_attention.py checks inductor's kernel, which visits only the blocks a
  block mask lists.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.utils._python_dispatch import _disable_current_modes

from server.engine import offline
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.engine.offline import GenerationRequest, greedy
from server.runtime.decode_graph import DecodeGraphs
from server.runtime.kernel_recording import Unrecordable
from server.vocabulary.residency_levels import residency_levels
from server.vocabulary.sampling_params import SamplingParams
from tests.runtime.conftest import assert_float32_close, decode_reference, prompt_ids
from tests.runtime.test_decode_step import Ops

BACKEND = "aot_eager"
# Ops a greedy batch-1 step dispatches around its graph: 7 with torch 2.13 (the plan's upload 1,
# the per-layer embedding ids and rows 2, the logits' slices to the real rows and to the text
# vocabulary 2, the one read-back's conj/neg checks 2; the sampler's greedy pick is one compiled
# pass, whose kernels dispatch nothing). It was 40 while the pick was ~30 eager ops (block
# maxima, failure codes, first maxima, packing), and 61 while greedy rows also built random keys
# and parameters they never use: a step that starts doing such per-row work again fails here.
AROUND_GRAPH = 7
# A sampled step (Gemma's defaults: top_k 64, top_p 0.95) adds 6: the sampler's one upload of
# its rows' parameters and random keys 3 (the host tensor, its detach, the copy), and its one
# compiled pass's library calls 3 (two top-k selections, top_p's cumulative sum). It was 75 in
# all while a top-k step ran through the sampler's general path (some seventy small ops).
AROUND_SAMPLED_GRAPH = AROUND_GRAPH + 6
MIX = ["full", "e2b", "skip-3-7", "mix-0.75", "e2.98b-layer", "skip-30-33", "e2b"]


@pytest.fixture(scope="module")
def engines(tiny):
    """An eager and a compiled engine, each reused by every test here (a graph is compiled once
    per bucket and runner)."""
    budget = kv_bytes_for(tiny, 16 * 64)
    eager = assemble_engine(tiny, budget, ffn_mode="grouped")
    compiled = assemble_engine(tiny, budget, compile_backend=BACKEND)
    compiled.runner.graphs.check_guards = True  # every direct step is checked against them
    return eager, compiled


@pytest.fixture(scope="module")
def paged(tiny):
    """A compiled engine whose steps read K/V in place; its pool holds what the batches here
    need (7 sequences of up to 3 blocks) and little more."""
    engine = assemble_engine(
        tiny, kv_bytes_for(tiny, 6 * 64), compile_backend=BACKEND, paged_attention=True
    )
    engine.runner.graphs.check_guards = True
    return engine


def generate(engine, requests, keep_logits=False):
    return offline.generate(engine, requests, keep_logits=keep_logits)


def test_every_subnet_alone_decodes_the_same_compiled(tiny, tiny64, engines):
    eager_engine, compiled_engine = engines
    for i, subnet in enumerate(tiny.subnets):
        request = GenerationRequest(subnet, prompt_ids(12 + i % 5, seed=i), greedy(6))
        [eager] = generate(eager_engine, [request], keep_logits=True)
        [compiled] = generate(compiled_engine, [request], keep_logits=True)
        assert compiled.token_ids == eager.token_ids, subnet.name
        exact = decode_reference(tiny64, subnet, list(request.prompt_ids), eager.token_ids)
        # The first logits come from the (eager) prefill step; the rest from compiled decodes.
        assert_float32_close(
            torch.stack(compiled.logits), torch.stack(eager.logits), exact, subnet.name
        )


def test_a_mixed_batch_decodes_the_same_compiled(tiny, engines):
    requests = [
        GenerationRequest(tiny.subnets[name], prompt_ids(9 + 4 * i, seed=50 + i), greedy(8))
        for i, name in enumerate(MIX)
    ]
    eager = generate(engines[0], requests)
    compiled = generate(engines[1], requests)
    assert engines[1].last_step.ffn_mode == "compiled"
    for name, a, b in zip(MIX, eager, compiled, strict=True):
        assert b.token_ids == a.token_ids, name


def test_no_subnet_mix_recompiles_after_warm_up(tiny, engines):
    def run(names: list[str], seed: int) -> None:
        requests = [
            GenerationRequest(tiny.subnets[n], prompt_ids(10 + i, seed=seed + i), greedy(4))
            for i, n in enumerate(names)
        ]
        generate(engines[1], requests)

    names = list(tiny.subnets.names())
    run(names[:1], 0)  # warm-up: rows bucket 1
    run(names[:8], 0)  # rows bucket 8
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for k, name in enumerate(names):
        run([name], 100 + k)
    for k in range(0, len(names), 7):
        run((names[k:] + names)[:8], 200 + k)  # eight at a time, every subnet once at least
        run((names[k:] + names)[5:13], 300 + k)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert set(engines[1].runner.graphs.graphs) == {
        shape for shape in engines[1].runner.graphs.graphs if shape.num_rows in (1, 8)
    }


@pytest.mark.parametrize(
    ("params", "budget"),
    [
        (greedy(6), AROUND_GRAPH),
        (SamplingParams(max_tokens=6, top_k=64, top_p=0.95, seed=3), AROUND_SAMPLED_GRAPH),
    ],
    ids=["greedy", "sampled"],
)
def test_a_step_dispatches_few_ops_around_its_graph(tiny, engines, params, budget):
    engine = engines[1]
    engine.add_request("around", prompt_ids(10, seed=5), tiny.subnets["full"], params)
    for _ in range(3):  # the prefill, then decode steps (compiling the rows-1 bucket, or not)
        engine.step()
    graphs = engine.runner.graphs.graphs
    [shape] = [s for s in graphs if s.num_rows == 1]
    spec, step = graphs[shape]

    def uncounted(*args):
        with _disable_current_modes():
            return step(*args)

    ops = Ops()
    graphs[shape] = (spec, uncounted)
    try:
        with ops:
            [out] = engine.step()
    finally:
        graphs[shape] = (spec, step)
    while not out.finished:
        [out] = engine.step()
    assert ops.count <= budget, f"{ops.count} ops around the graph (budget {budget})"


def test_a_direct_step_is_checked_against_its_buckets_guards(tiny, engines):
    request = GenerationRequest(tiny.subnets["full"], prompt_ids(10, seed=7), greedy(3))
    generate(engines[1], [request])  # compiles (or reuses) the rows-1 bucket
    graphs = engines[1].runner.graphs
    [(_, step)] = [e for shape, e in graphs.graphs.items() if shape.num_rows == 1]
    flat = torch.zeros(3, dtype=torch.int64)  # not the bucket's plan: its guards fail
    with pytest.raises(RuntimeError, match="guards failed"):
        step(flat, torch.zeros(1))
    # Dynamo holds no entry for the step's code once it is captured: its recompile limit (8
    # graphs per code object) can never stop a new bucket from compiling.
    assert not _debug_get_cache_entry_list(DecodeGraphs._step.__code__)


def test_a_compiled_bucket_is_frozen_out_of_full_collections(tiny):
    gc.unfreeze()  # what earlier tests froze: only this compile may freeze the new code
    engine = assemble_engine(tiny, kv_bytes_for(tiny, 64), compile_backend=BACKEND)
    generate(engine, [GenerationRequest(tiny.subnets["full"], prompt_ids(8), greedy(2))])
    [(_, step)] = engine.runner.graphs.graphs.values()
    # A full collection visits every object in the collector's generations: not these.
    assert not any(o is step or o is step.func for o in gc.get_objects())


def test_a_paged_step_decodes_every_mix_the_same_without_recompiling(tiny, engines, paged):
    def run(names: list[str], seed: int) -> None:
        requests = [
            GenerationRequest(tiny.subnets[n], prompt_ids(9 + 4 * i, seed=seed + i), greedy(5))
            for i, n in enumerate(names)
        ]
        eager = generate(engines[0], requests)
        compiled = generate(paged, requests)
        assert paged.last_step.ffn_mode == "compiled"
        for name, a, b in zip(names, eager, compiled, strict=True):
            assert b.token_ids == a.token_ids, name

    run(MIX, 50)  # compiles the bucket (8 rows, 64 keys)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run(list(tiny.subnets.names())[-7:], 400)  # seven other subnets
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert [shape.paged for shape in paged.runner.graphs.graphs] == [True]


def test_a_captured_step_replays_with_each_steps_inputs(tiny, engines):
    """The data flow around a CUDA graph, on a CPU: each bucket's step is recorded once over
    static copies of its inputs, and every later step copies its own inputs in and replays,
    returning the recorded output. The recording here is what a replay does (the captured
    computation again, over the static inputs, into the recorded output's memory), so a replay
    that read stale inputs or returned another tensor would decode other tokens. A capture that
    fails leaves its bucket uncaptured, with a warning, decoding the same."""
    engine = assemble_engine(tiny, kv_bytes_for(tiny, 4 * 64), compile_backend=BACKEND)
    graphs = engine.runner.graphs
    graphs.capture = True
    replays, records = [], []

    def record(run, *static):
        records.append(run)
        out = run(*static)

        def replay():
            replays.append(out.data_ptr())
            out.copy_(run(*static))

        return out, replay

    graphs._record = record
    requests = [
        GenerationRequest(tiny.subnets[n], prompt_ids(9 + 4 * i, seed=70 + i), greedy(6))
        for i, n in enumerate(["full", "e2b"])
    ]
    for a, b in zip(generate(engines[0], requests), generate(engine, requests), strict=True):
        assert b.token_ids == a.token_ids
    assert len(replays) == 4 and len(set(replays)) == 1  # 5 decode steps: 1 recorded, 4 replayed
    assert not graphs.uncaptured and len(records) == 1

    # A shrink and a grow back replace the FFN buffers (new addresses on a device) and leave the
    # widths, so the bucket's key, as they were: its recording is made again before it replays.
    w = tiny.weights
    levels = residency_levels(
        w.full_widths, [(s.layers, s.widths, s.effective_params) for s in tiny.subnets]
    )

    def shrink_and_grow_back() -> None:
        w.resize_ffn(levels[0])
        w.resize_ffn(w.full_widths)

    shrink_and_grow_back()
    for a, b in zip(generate(engines[0], requests), generate(engine, requests), strict=True):
        assert b.token_ids == a.token_ids
    assert len(records) == 2 and records[0] is records[1]  # the same compiled step, recorded again
    assert len(replays) == 4 + 5  # every decode step replays the new recording

    # That recording refused (as CUDA refuses an operation it cannot capture): the bucket runs
    # its step uncaptured from then on, said in a warning, decoding the same.
    def refuse(run, *static):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._record = refuse
    shrink_and_grow_back()
    with pytest.warns(UserWarning, match="runs uncaptured: operation not permitted"):
        compiled = generate(engine, requests)
    for a, b in zip(generate(engines[0], requests), compiled, strict=True):
        assert b.token_ids == a.token_ids
    assert [s.num_rows for s in graphs.uncaptured] == [2] and len(replays) == 9

    # A CPU graph a replay of its kernels would not redo (kernel_recording.Unrecordable, e.g. an
    # operator left to ATen) is expected: its bucket (here rows 1, new) runs as compiled, the
    # reason kept, no warning.
    def unrecordable(run, *static):
        raise Unrecordable("the graph's wrapper calls sort")

    graphs._record = unrecordable
    one = requests[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = generate(engine, one)
    assert compiled[0].token_ids == generate(engines[0], one)[0].token_ids
    assert {s.num_rows: why for s, why in graphs.uncaptured.items()}[1] == (
        "the graph's wrapper calls sort"
    )
