"""A compiled decode step: one graph per (rows, context) bucket serves every mix of subnets.

Owns the speed-up wrapped around the model from outside (the forward stays plain PyTorch): a
decode step (every sequence computes one token and samples) is planned as a static step
(batch.py `StaticShape`: rows padded to a bucket, every layer over every row with keep masks,
every FFN at the resident width with per-row width masks, keys read up to a context bucket), so
its shape depends on the buckets alone. The device half of the plan and the forward are then
compiled together with `torch.compile(fullgraph=True)`: inductor on a CPU, with products of few rows
generated as fused loops rather than BLAS calls (narrow_products.py); on CUDA inductor. Each
bucket's step is then recorded and replayed: on CUDA as one CUDA graph (`torch.cuda.CUDAGraph`, as
vLLM's model runner does), on a CPU as its kernels' calls, made again without inductor's Python
wrapper (kernel_recording.py; a bench-preset batch-1 step 1.04-1.08x as fast). Its two
inputs, the step's integers and the per-layer embedding rows gathered on the host, are copied
into the recording's static buffers before each replay; the weights and the cache are read and
written where they are. Not inductor's `mode="reduce-overhead"`: its CUDA graph
trees copy every input that is not an nn.Module's parameter (here: all ~800 weight tensors, GBs at
E4B's sizes) into static buffers before each replay, and stop capturing a graph that writes an
input (the cache); a resize that replaces FFN buffers (whose addresses a recording holds) makes
every captured bucket record again before its next replay. A graph is compiled once per bucket
and resident widths; after that no subnet mix recompiles (the mix is data: masks, not control
flow), and the bucket's steps run the code dynamo made for it directly, without re-checking
dynamo's guards each call.

How attention reads the cache is a choice (`paged`): gathered into a [rows, context bucket] copy
per KV-owning layer and attended with SDPA (the default), or read where the paged cache holds it,
with FlexAttention and a block mask built from the block tables (batch.py `_paged`), copying
nothing. On the 2-core build CPU the paged read is exact but no faster (bench preset, batch 1:
0.94-1.08x the gathered step, timed alternately, within the run's noise; 16 mixed requests: 97
tok/s against 99 in runs of two sessions) and slower to compile (a cold bucket 197-270 s against
125 s at batch 1; 587 s against 79 s at 16 rows): benchmarks/bench_decode.py --paged,
results/bench_decode.txt. Its gain is for an accelerator at long contexts, where the copy is
another pass over every key and value the batch attends; the device script
(benchmarks/gpu_e4b.py) times both there.

Everything else (prefill chunks, steps mixing prefill and decode) runs the eager forward.

Deliberately does not know: sampling, scheduling, or which subnets exist.
"""

from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Sequence
from functools import partial

import torch

from server.runtime.batch import StaticShape, StepSpec, materialize, plan_step, upload
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.kernel_recording import Unrecordable, record
from server.runtime.kv_cache import KVCache
from server.runtime.narrow_products import NARROW, inductor_decompositions
from server.runtime.object_heap import freeze_long_lived
from server.vocabulary.step import StepSequence

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_CONTEXT_BUCKET = 64
# One compile at a time captures its code (the bytecode hook is process-wide).
_capture_lock = threading.Lock()


def row_bucket(n: int) -> int:
    for b in ROW_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"{n} sequences in one step: more than the largest bucket {ROW_BUCKETS[-1]}")


def context_bucket(positions: int, block_size: int) -> int:
    """Keys read by full-attention layers: the next power of two, whole blocks."""
    k = MIN_CONTEXT_BUCKET
    while k < positions:
        k *= 2
    return -(-k // block_size) * block_size


class DecodeGraphs:
    def __init__(
        self,
        model: Gemma3nModel,
        kv: KVCache,
        block_size: int,
        backend: str = "inductor",
        paged: bool = False,
    ):
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.backend = backend
        self.paged = paged
        cuda = model.w.device.type == "cuda"
        self.compiler = backend if cuda else cpu_backend(backend)
        self.graphs: dict[StaticShape, tuple[StepSpec, object]] = {}
        self.check_guards = False  # tests: check dynamo's guards before every direct step
        # Record each bucket's step (benchmarks may not): as a CUDA graph, or on a CPU as its
        # inductor kernels' calls (kernel_recording.py; "aot_eager" generates no kernels).
        self.capture = cuda or backend == "inductor"
        self.uncaptured: dict[StaticShape, str] = {}  # buckets whose capture failed, and why
        self._pool = None  # the graphs' one memory pool: their steps never run concurrently
        # Captured buckets' uncaptured steps, to record again once a resize has replaced FFN
        # buffers whose addresses a recording holds (even at the widths it was made for: a
        # shrink and a grow back, with no compiled step between them, keep the key).
        self._direct_steps: dict[StaticShape, object] = {}
        self._stale: set[StaticShape] = set()
        self._generation = model.w.ffn_generation

    @staticmethod
    def applies(seqs: Sequence[StepSequence]) -> bool:
        """A decode step: every sequence computes one token and samples it."""
        return all(len(s.token_ids) == 1 and s.sample for s in seqs)

    def run(self, seqs: Sequence[StepSequence]):
        """(logits of the real rows, in plan order; the plan)."""
        w, text = self.model.w, self.model.text
        positions = max(s.start for s in seqs) + 1
        shape = StaticShape(
            row_bucket(len(seqs)),
            context_bucket(positions, self.block_size),
            w.resident_widths,
            self.paged,
        )
        planned = plan_step(
            text, seqs, self.block_size, self.kv.scratch_block, "masked", static=shape
        )
        if w.ffn_generation != self._generation:
            self._generation = w.ffn_generation
            self._stale = set(self._direct_steps)
        entry = self.graphs.get(shape)
        if entry is None:
            # Graphs for other resident widths read buffers a resize replaced: drop them, so
            # they hold nothing alive (the widths come back rarely; recompiling then is fine).
            for old in [s for s in self.graphs if s.widths != shape.widths]:
                del self.graphs[old]
                self._direct_steps.pop(old, None)
                self._stale.discard(old)
            entry = self.graphs[shape] = (planned.spec, self._first_run(shape, planned.spec))
        spec, step = entry
        if planned.spec != spec:
            raise RuntimeError(f"a static step of {shape} planned a different layout")
        flat = upload(planned.values, w.device)
        ple_rows = w.ple_rows(planned.host_ids)
        with torch.no_grad():  # (inference mode's tensors cannot enter a compiled graph)
            if shape in self._stale:
                self._stale.discard(shape)
                step = self._captured(shape, self._direct_steps.pop(shape), flat, ple_rows)
                self.graphs[shape] = (spec, step)
            logits = step(flat, ple_rows)
        return logits[: planned.num_real_rows], planned

    def _first_run(self, shape: StaticShape, spec: StepSpec):
        """The bucket's first step: compiled through dynamo, which rewrites `_step`'s bytecode
        into code that gathers the graph's inputs and calls the graph. That code is kept and
        runs every later step of the bucket directly, as vLLM's model runner does: dynamo's
        per-call work (matching its guards on the ~800 weight and cache tensors the step
        reads: a large share of a tiny-preset step on a CPU) buys nothing here, because a
        bucket's inputs have its shapes by construction (the key holds the rows and context
        buckets and the resident widths; `spec` is checked above). With `check_guards`
        (tests), every direct step is still checked against the guards first."""
        # Dynamo is imported here, not with the module: its import is a large share of every
        # process start (server, replica, CLI), and a server without `compile: true` never
        # needs it.
        from torch._dynamo.convert_frame import register_bytecode_hook

        compiled = torch.compile(self._step, fullgraph=True, dynamic=False,
                                 backend=self.compiler)  # fmt: skip

        def first(flat: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
            with _capture_lock:
                made: list[types.CodeType] = []
                hook = register_bytecode_hook(
                    lambda old, new: made.append(new) if old is _STEP_CODE else None
                )
                try:
                    out = compiled(spec, flat, ple_rows)
                finally:
                    hook.remove()
                if len(made) != 1:
                    raise RuntimeError(f"compiling a step of {shape} made {len(made)} frames")
                step = self._direct(made[0], spec)
                if self.capture:
                    step = self._captured(shape, step, flat, ple_rows)
                self.graphs[shape] = (spec, step)
                # Compiling leaves hundreds of thousands of objects alive: frozen, no full
                # garbage collection walks them in a later step.
                freeze_long_lived()
            return out

        return first

    def _direct(self, code: types.CodeType, spec: StepSpec):
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list, remove_from_cache

        [guards] = [e.guard_manager for e in _debug_get_cache_entry_list(_STEP_CODE)
                    if e.code is code]  # fmt: skip
        # Dynamo keeps at most `recompile_limit` (8) graphs per code object and would stop
        # compiling new buckets: its entries are not needed once their code is held here.
        remove_from_cache(_STEP_CODE)
        run = partial(types.FunctionType(code, _STEP_GLOBALS), self, spec)
        if not self.check_guards:
            return run

        def checked(flat: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
            frame = {"self": self, "spec": spec, "flat": flat, "ple_rows": ple_rows}
            if not guards.check(frame):
                raise RuntimeError("a compiled decode step's guards failed: it would recompile")
            return run(flat, ple_rows)

        return checked

    def _captured(self, shape: StaticShape, run, flat: torch.Tensor, ple_rows: torch.Tensor):
        """`run` recorded over static copies of its two inputs; each later step copies its inputs
        in and replays the recording (`.recording` of what is returned: benchmarks time its
        parts): on CUDA one launch for the whole step, on a CPU its kernels called without
        inductor's wrapper. The step writes only the cache slots its inputs name (and rewriting
        one with the same values changes nothing), so the runs a recording makes are harmless.
        A capture that fails (an operation CUDA graphs cannot record) leaves the bucket
        uncaptured, said in a warning; so does a CPU graph a replay of its kernels would not
        redo (kernel_recording.Unrecordable), without one: some are expected (an operator left
        to ATen allocates its output every call), and run as compiled."""
        static_flat, static_ple = flat.clone(), ple_rows.clone()
        try:
            out, replay_graph = self._record(run, static_flat, static_ple)
        except Unrecordable as e:  # expected of some CPU graphs: they run as compiled
            self.uncaptured[shape] = str(e)
            return run
        except RuntimeError as e:
            self.uncaptured[shape] = f"{type(e).__name__}: {e}"
            warnings.warn(f"decode step {shape} runs uncaptured: {e}", stacklevel=2)
            return run
        self._direct_steps[shape] = run

        def replay(flat: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
            static_flat.copy_(flat, non_blocking=True)
            static_ple.copy_(ple_rows, non_blocking=True)
            replay_graph()
            return out

        replay.recording = replay_graph
        return replay

    def _record(self, run, *static: torch.Tensor):
        """(the output of `run(*static)` as recorded, a call that replays the recording): on a
        CPU, its inductor kernels' calls (kernel_recording.py); on CUDA one `torch.cuda.CUDAGraph`,
        after warm-up runs on a side stream (where lazy initialisations, e.g. cuBLAS workspaces,
        happen outside the capture)."""
        device = static[0].device
        if device.type == "cpu":
            return record(run, *static)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a background grow's uploads on another thread may run meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = run(*static)
        return out, graph.replay

    def _step(self, spec: StepSpec, flat: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch = materialize(spec, flat, model.text, model.w.dtype)
        batch.ple_rows = ple_rows
        return model.forward(batch, self.kv)


_STEP_CODE = DecodeGraphs._step.__code__
_STEP_GLOBALS = DecodeGraphs._step.__globals__  # where dynamo puts the graphs its code calls


# Inductor's CPU wrapper asserts every input's size and stride on every call (~850 Python-level
# calls per tiny-preset step, more than all its kernels); dynamo's guards have already checked
# them (static shapes: sizes and strides are guarded) before the graph runs. Epilogue fusion
# would fuse ops after attention into the CPU FlexAttention kernel, which does not take them
# (torch 2.13: "Unsupported for `epilogue_nodes` in CppFlexAttentionTemplate"); nothing else
# in these graphs is a template (no max-autotune), so it costs nothing.
CPU_INDUCTOR = {"size_asserts": False, "alignment_asserts": False, "epilogue_fusion": False}


def cpu_backend(name: str):
    """The torch.compile backend for a CPU step: inductor, or "aot_eager" (the same capture and
    functionalisation, run eagerly: what tests use), each with the narrow products rewritten.

    AOTAutograd's own cache is off for these graphs: its key does not cover a custom
    decomposition table, so it would hand back a graph compiled without (or with other) rewrites.
    Inductor's FX-graph cache, keyed on the rewritten graph, still spares recompiling on restart."""
    import torch._functorch.config as functorch_config

    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def inductor(gm, example_inputs):
            with functorch_config.patch(enable_autograd_cache=False):
                return compile_fx(gm, example_inputs, config_patches=CPU_INDUCTOR,
                                  decompositions=inductor_decompositions())  # fmt: skip

        return inductor
    if name == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_compiler

        nop = make_boxed_compiler(lambda gm, _: gm)
        aot = aot_autograd(fw_compiler=nop, decompositions=dict(NARROW))

        def aot_eager(gm, example_inputs):
            with functorch_config.patch(enable_autograd_cache=False):
                return aot(gm, example_inputs)

        return aot_eager
    return name
