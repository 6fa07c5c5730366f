"""The decode step is fit for an accelerator: few ops, nothing that waits on the device.

Counted with a TorchDispatchMode (every aten op the step dispatches; deterministic for a given
torch version, which the project pins):
- a whole batch-1 decode step of the engine (planning, forward, sampling, bookkeeping) on the
  tiny preset in float32 dispatches at most OP_BUDGET ops (transformers' eager loop: ~6,800);
- planning the step and the forward never synchronise host and device: no op whose result size
  or value the host must read (`nonzero`, `item`/`_local_scalar_dense`, boolean-mask indexing,
  `masked_select`, `is_nonzero`), for one subnet, mixed subnets, skipped layers, in both layouts;
- the step's integer inputs cross to the device once: the forward and planning create no tensor
  from Python data, the batch one for the device (plus the host-side ids the per-layer embedding
  rows are gathered with, which never leave the host).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import server.runtime.runner as runner_module
from server.engine.assembly import assemble_engine, kv_bytes_for
from server.vocabulary.sampling_params import SamplingParams
from tests.runtime.conftest import prompt_ids

OP_BUDGET = 2500  # issue 12's target: ~2.6x fewer than transformers' ~6,800


class Ops(TorchDispatchMode):
    """Counts dispatched aten ops; remembers the synchronising ones and tensors made from data."""

    SYNCING = ("aten.nonzero", "aten._local_scalar_dense", "aten.item", "aten.masked_select",
               "aten.is_nonzero", "aten.unique", "aten._unique2")  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.syncing: list[str] = []
        self.from_data = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        name = str(func.overloadpacket)
        if name in self.SYNCING:
            self.syncing.append(name)
        if name in ("aten.index", "aten.index_put_", "aten.index_put"):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.syncing.append(f"{name} with a boolean mask")
        if name == "aten.lift_fresh":
            self.from_data += 1
        return func(*args, **(kwargs or {}))


def decode_engine(tiny, layout: str, subnets: list[str]):
    engine = assemble_engine(tiny, kv_bytes_for(tiny, 512), ffn_mode=layout)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(subnets):
        engine.add_request(f"r{i}", prompt_ids(20 + 3 * i, seed=i), tiny.subnets[name], params)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()  # prefill
    engine.step()  # the first decode step (warm)
    return engine


def test_a_batch_one_decode_step_stays_within_its_op_budget(tiny):
    engine = decode_engine(tiny, "grouped", ["full"])
    ops = Ops()
    with ops:
        engine.step()
    assert ops.count <= OP_BUDGET, f"{ops.count} ops per decode step (budget {OP_BUDGET})"


@pytest.mark.parametrize("layout", ["grouped", "masked"])
@pytest.mark.parametrize(
    "subnets", [["full"], ["full", "e2b", "skip-3-7", "mix-0.75"]], ids=["one", "mixed"]
)
def test_planning_and_the_forward_never_wait_on_the_device(tiny, monkeypatch, layout, subnets):
    engine = decode_engine(tiny, layout, subnets)
    model = engine.runner.model
    forward, plan, make = model.forward, runner_module.plan_step, model.batch
    seen: dict[str, Ops] = {}

    def watched(name, fn):
        def call(*args, **kwargs):
            ops = seen.setdefault(name, Ops())
            with ops:
                return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(model, "forward", watched("forward", forward))
    monkeypatch.setattr(runner_module, "plan_step", watched("plan", plan))
    monkeypatch.setattr(model, "batch", watched("batch", make))
    for _ in range(3):
        assert engine.step(), "no decode step ran"
    for name in ("plan", "batch", "forward"):
        assert seen[name].syncing == [], f"{name}: {seen[name].syncing}"
    assert seen["forward"].from_data == 0
    # Per step, in the batch: the one integer buffer for the device, and the host-side ids the
    # per-layer embedding rows are gathered with. Planning itself makes no tensor.
    assert seen["plan"].from_data == 0 and seen["batch"].from_data == 2 * 3
