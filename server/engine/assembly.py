"""Assembling an engine over a loaded runtime: the one place the engine meets the torch side.

Owns the wiring every user of the engine would otherwise repeat (the server, `concentric
generate`, the demo, the tests, the benchmarks): as many KV blocks as the byte budget holds, the
block manager over the checkpoint's KV layout, the subnet chooser (with elasticity deciding what
is offered, when there is one), the scheduler with the chooser as its subnet hook, and the
runtime's model runner; and seeding the step-cost model before traffic (`calibrate`).

Deliberately does not know: HTTP, tenants, or how any of the parts works inside.
"""

from __future__ import annotations

from dataclasses import replace

from policies.ordering import FirstComeFirstServed, OrderPolicy
from policies.subnet_choice import SubnetPolicy
from server.engine.chooser import SubnetChooser
from server.engine.elasticity import Elasticity
from server.engine.engine import Engine
from server.engine.kv_blocks import BlockManager, KVLayout
from server.engine.scheduler import Scheduler, SchedulerConfig, named_subnet
from server.runtime.elastic import ElasticRuntime
from server.runtime.kv_cache import KVCache
from server.runtime.runner import ModelRunner
from server.vocabulary.sampling_params import SamplingParams

DEFAULT_KV_BYTES = 64 * 1024 * 1024
# The logits a scoring request's chunk may hold at once (float32 rows of the whole vocabulary):
# 128 rows at Gemma 3n's 262,144 ids.
SCORED_LOGITS_BYTES = 128 * 1024 * 1024


def kv_bytes_for(rt: ElasticRuntime, tokens: int, block_size: int = 16) -> int:
    """A KV budget that holds `tokens` positions on every KV-owning layer (offline runs size
    their cache to their requests: the sum of prompt plus max_tokens over the batch)."""
    text = rt.store.text
    blocks = -(-tokens // block_size) * text.first_kv_shared_layer
    return blocks * KVCache.block_bytes(text, block_size, rt.weights.dtype)


def assemble_engine(
    rt: ElasticRuntime,
    kv_budget_bytes: int = DEFAULT_KV_BYTES,
    config: SchedulerConfig | None = None,
    block_size: int = 16,
    order: OrderPolicy | None = None,
    ffn_mode: str = "auto",
    enable_prefix_cache: bool = True,
    subnet_policy: SubnetPolicy | None = None,
    elasticity: Elasticity | None = None,
    compile_backend: str | None = None,
    batch_invariant: bool = False,
    paged_attention: bool = False,
) -> Engine:
    """An engine over a loaded runtime. With `subnet_policy` None every request must name its
    subnet (offline use); otherwise unpinned requests are given one at admission.
    `compile_backend`: compile decode steps with it (runtime/decode_graph.py); None: eager.
    `paged_attention`: compiled decode steps read K/V in place rather than a gathered copy.
    `batch_invariant`: each row's result independent of the step it shares (runner.py)."""
    text = rt.store.text
    config = config or SchedulerConfig(max_model_len=text.max_position_embeddings)
    scored_rows = max(1, SCORED_LOGITS_BYTES // (4 * text.vocab_size))
    config = replace(config, max_scored_rows=min(config.max_scored_rows, scored_rows))
    num_blocks = kv_budget_bytes // KVCache.block_bytes(text, block_size, rt.weights.dtype)
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds no block")
    n_kv = text.first_kv_shared_layer
    layout = KVLayout(
        n_kv, frozenset(i for i in range(n_kv) if text.is_sliding(i)), text.sliding_window
    )
    blocks = BlockManager(num_blocks, block_size, layout, enable_prefix_cache)
    eos = rt.tokenizer.stop_ids
    chooser = None
    if subnet_policy is not None:
        offered = elasticity.offered if elasticity is not None else (lambda subnet: True)
        chooser = SubnetChooser(rt.subnets, subnet_policy, offered)
    assign = chooser.assign if chooser is not None else named_subnet
    scheduler = Scheduler(config, blocks, order or FirstComeFirstServed(), eos, assign)
    runner = ModelRunner(
        rt.model,
        num_blocks,
        block_size,
        eos,
        ffn_mode,
        compile_backend,
        batch_invariant,
        grammars=rt.grammars,
        paged_attention=paged_attention,
    )
    return Engine(
        runner, scheduler, rt.tokenizer, text.vocab_size_per_layer_input, chooser, elasticity
    )


def calibrate(engine: Engine, bos_id: int, prompt_tokens: int = 32, max_tokens: int = 4) -> None:
    """Seed the step-cost model before real traffic: a few steps on the smallest and the
    largest subnet, alone and batched. Call only while the engine is idle."""
    chooser = engine.chooser
    if chooser is None or engine.has_work:
        return
    ends = sorted(chooser.table, key=lambda s: s.effective_params)
    prompt = [bos_id] + [(7 * i) % 97 + 200 for i in range(prompt_tokens - 1)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for batch in (1, 4):
        for subnet in (ends[0], ends[-1]):
            for i in range(batch):
                engine.add_request(f"calibrate-{subnet.name}-{batch}-{i}", prompt, subnet, params)
            while engine.has_work:
                engine.step()
    chooser.choices.clear()
