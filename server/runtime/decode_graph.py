"""A compiled decode step: one graph per (rows, context) bucket serves every mix of subnets.

Owns the speed-up wrapped around the model from outside (the forward stays plain PyTorch): a
decode step (every sequence computes one token and samples) is planned as a static step
(batch.py `StaticShape`: rows padded to a bucket, every layer over every row with keep masks,
every FFN at the resident width with per-row width masks, keys read up to a context bucket), so
its shape depends on the buckets alone. The device half of the plan and the forward are then
compiled together with `torch.compile(fullgraph=True)`: inductor on a CPU, with products of few rows
generated as fused loops rather than BLAS calls (narrow_products.py); on CUDA inductor with
`mode="reduce-overhead"`, which replays the step as a captured CUDA graph (its inputs, the step's
integers and the per-layer embedding rows gathered on the host, are copied into the graph's
static buffers before each replay). A graph is compiled once per bucket and resident widths;
after that no subnet mix recompiles (the mix is data: masks, not control flow).

Everything else (prefill chunks, steps mixing prefill and decode) runs the eager forward.

Deliberately does not know: sampling, scheduling, or which subnets exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from server.runtime.batch import StaticShape, StepSpec, materialize, plan_step, upload
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.kv_cache import KVCache
from server.runtime.narrow_products import NARROW, inductor_decompositions
from server.vocabulary.step import StepSequence

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_CONTEXT_BUCKET = 64


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
        self, model: Gemma3nModel, kv: KVCache, block_size: int, backend: str = "inductor"
    ):
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.backend = backend
        cuda = model.w.device.type == "cuda"
        self.mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.compiler = backend if cuda else cpu_backend(backend)
        self.graphs: dict[StaticShape, tuple[StepSpec, object]] = {}

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
        )
        planned = plan_step(
            text, seqs, self.block_size, self.kv.scratch_block, "masked", static=shape
        )
        entry = self.graphs.get(shape)
        if entry is None:
            # Graphs for other resident widths read buffers a resize replaced: drop them, so
            # they hold nothing alive (the widths come back rarely; recompiling then is fine).
            for old in [s for s in self.graphs if s.widths != shape.widths]:
                del self.graphs[old]
            step = partial(self._step, planned.spec)
            compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=self.compiler,
                                     mode=self.mode)  # fmt: skip
            entry = self.graphs[shape] = (planned.spec, compiled)
        spec, compiled = entry
        if planned.spec != spec:
            raise RuntimeError(f"a static step of {shape} planned a different layout")
        flat = upload(planned.values, w.device)
        with torch.no_grad():  # (inference mode's tensors cannot enter a compiled graph)
            logits = compiled(flat, w.ple_rows(planned.host_ids))
        return logits[: planned.num_real_rows], planned

    def _step(self, spec: StepSpec, flat: torch.Tensor, ple_rows: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch = materialize(spec, flat, model.text, model.w.dtype)
        batch.ple_rows = ple_rows
        return model.forward(batch, self.kv)


# Inductor's CPU wrapper asserts every input's size and stride on every call (~850 Python-level
# calls per tiny-preset step, more than all its kernels); dynamo's guards have already checked
# them (static shapes: sizes and strides are guarded) before the graph runs.
CPU_INDUCTOR = {"size_asserts": False, "alignment_asserts": False}


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
