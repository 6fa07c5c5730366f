"""Engines over the fake runner, a subnet table with KV-compatible families, and run helpers.

The table (on the small Gemma-3n-shaped config of tests/unit/engine_fixtures.py: 35 layers,
KV-owning layers 0..19, full width 256) has two KV layout families plus a loner, so elasticity has
moves to make and requests it cannot move:

    name      KV layers' width  other layers  quality  KV family
    full      256               256           60       A
    lite      256               64            55       A   (full's KV: a full request may move here)
    mid       128               128           50       B
    mid-lite  128               32            45       B
    small     64 (skips 3, 7)   64            40       C   (books fewer KV blocks)

Residency levels (smallest first) are then: small | +mid-lite | +mid | +lite | full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from policies.ordering import FirstComeFirstServed, OrderPolicy
from policies.snapshots import TierView
from policies.subnet_choice import LargestFitsPolicy, SubnetPolicy
from server.engine.chooser import SubnetChooser
from server.engine.elasticity import Elasticity, ElasticityConfig
from server.engine.engine import Engine
from server.engine.kv_blocks import BlockManager
from server.engine.outputs import RequestOutput
from server.engine.scheduler import Scheduler, SchedulerConfig, named_subnet
from server.telemetry.headroom import ProbeSampler, ScriptedProbe
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet, SubnetTable, make_subnet
from tests.engine.fake_runner import (
    EOS,
    ByteDecoder,
    FakeClock,
    FakeFfn,
    FakeRunner,
    NextToken,
    hashed_token,
    reference,
)
from tests.unit.engine_fixtures import layout, small_text

TEXT = small_text()
N_KV = TEXT.first_kv_shared_layer
VOCAB = TEXT.vocab_size_per_layer_input


def family(name: str, kv_width: int, rest: int, quality: float, skip=()) -> Subnet:
    layers = [i for i in range(TEXT.num_hidden_layers) if i not in skip]
    widths = [kv_width if i < N_KV else rest for i in layers]
    return make_subnet(TEXT, name, layers, widths, quality=quality)


FULL = family("full", 256, 256, 60.0)
LITE = family("lite", 256, 64, 55.0)
MID = family("mid", 128, 128, 50.0)
MID_LITE = family("mid-lite", 128, 32, 45.0)
SMALL = family("small", 64, 64, 40.0, skip=(3, 7))
TABLE = SubnetTable([FULL, LITE, MID, MID_LITE, SMALL])

LOW_WATER, HIGH_WATER = 1_000, 2_000  # bytes of headroom (FakeFfn: one byte per FFN row)
ROOMY, TIGHT = 1_000_000, 10  # headroom that grows to full widths; that shrinks to the least
STEADY = 1_500  # between the marks (the hysteresis): neither shrinks nor grows


def tier(
    name: str = "any",
    subnets: tuple[str, ...] = ("*",),
    priority: int = 0,
    floor: float | None = None,
    ceiling: float | None = None,
    ttft: float | None = None,
    tpot: float | None = None,
) -> TierView:
    return TierView(name, priority, subnets, ttft, tpot, floor, ceiling)


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def prompt(n: int, seed: int = 0) -> list[int]:
    """n printable bytes, different for each seed."""
    return [32 + (seed * 31 + i * 7) % 95 for i in range(n)]


@dataclass
class Harness:
    engine: Engine
    runner: FakeRunner
    scheduler: Scheduler
    blocks: BlockManager
    chooser: SubnetChooser | None = None
    elasticity: Elasticity | None = None
    ffn: FakeFfn | None = None
    probe: ScriptedProbe | None = None
    sampler: ProbeSampler | None = None
    outputs: dict[str, list[RequestOutput]] = field(default_factory=dict)
    prompts: dict[str, list[int]] = field(default_factory=dict)
    aborted: list[RequestOutput] = field(default_factory=list)  # seen by an async observer

    def add(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        subnet: Subnet | None = FULL,
        params: SamplingParams | None = None,
        **kw,
    ):
        self.prompts[request_id] = list(prompt_ids)
        return self.engine.add_request(request_id, prompt_ids, subnet, params or greedy(), **kw)

    def step(self) -> list[RequestOutput]:
        outs = self.engine.step()
        self.collect(outs)
        return outs

    def collect(self, outs: Sequence[RequestOutput]) -> None:
        for out in outs:
            self.outputs.setdefault(out.request_id, []).append(out)

    def run(self, max_steps: int = 2_000, before_step: Callable[[int], None] | None = None):
        """Step until no work is left; returns the number of steps taken."""
        for n in range(max_steps):
            if before_step is not None:
                before_step(n)
            if not self.engine.has_work:
                return n
            self.step()
        raise AssertionError(f"still busy after {max_steps} steps")

    def tokens(self, request_id: str) -> list[int]:
        return [t for out in self.outputs.get(request_id, []) for t in out.token_ids]

    def text(self, request_id: str) -> str:
        return "".join(out.text for out in self.outputs.get(request_id, []))

    def final(self, request_id: str) -> RequestOutput:
        outs = self.outputs[request_id]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]), outs
        return outs[-1]

    def expected(self, request_id: str, subnet: Subnet, params: SamplingParams | None = None):
        return reference(
            self.runner.next_token, subnet.name, self.prompts[request_id], params or greedy()
        )

    def replayed(self, request_id: str) -> list[int]:
        """The tokens the fake model gives the request's prompt when each token is computed on
        the subnet the runner actually used for it (for requests moved between subnets)."""
        context, out = list(self.prompts[request_id]), []
        for subnet, _ in self.runner.samples.get(request_id, []):
            out.append(self.runner.next_token(subnet, context))
            context.append(out[-1])
        return out

    def sampled(self, request_id: str) -> list[int]:
        return [t for _, t in self.runner.samples.get(request_id, [])]

    def assert_clean(self) -> None:
        """The runner and the weights saw no breach of their contracts."""
        assert not self.runner.violations, self.runner.violations[:5]
        assert self.ffn is None or not self.ffn.violations, self.ffn.violations

    def assert_idle(self) -> None:
        """Nothing left anywhere: no request, no held block, no runner state."""
        self.assert_clean()
        s = self.scheduler
        assert not s.has_work and not s.requests, (s.waiting, s.running, s.requests)
        assert self.blocks.num_free_blocks == self.blocks.num_blocks
        assert not self.blocks._held, self.blocks._held
        assert not self.runner.live, self.runner.live
        assert not self.engine._detok, self.engine._detok


def build(
    num_blocks: int = 4_000,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_prefill_chunk: int = 16,
    max_model_len: int = 512,
    max_scored_rows: int = 128,
    next_token: NextToken = hashed_token,
    step_seconds=0.01,
    clock: FakeClock | None = None,
    prefix_cache: bool = True,
    order: OrderPolicy | None = None,
    policy: SubnetPolicy | None = None,
    elastic: bool = False,
    free_bytes: int = ROOMY,
    table: SubnetTable = TABLE,
) -> Harness:
    """An engine over a fake runner. `policy` (or `elastic`) gives it a subnet chooser;
    `elastic` also resident widths that follow a scripted headroom (starting at full widths)."""
    lay = layout(TEXT)
    blocks = BlockManager(num_blocks, block_size, lay, prefix_cache)
    config = SchedulerConfig(
        max_num_seqs, max_num_batched_tokens, max_prefill_chunk, max_model_len, max_scored_rows
    )
    ffn = probe = sampler = el = chooser = None
    if elastic:
        ffn = FakeFfn(TEXT.intermediate_size)
        probe = ScriptedProbe(10 * ROOMY, free_bytes)
        sampler = ProbeSampler(probe)
        el = Elasticity(ffn, table, sampler, ElasticityConfig(LOW_WATER, HIGH_WATER))
    if policy is not None or elastic:
        offered = el.offered if el is not None else (lambda subnet: True)
        chooser = SubnetChooser(table, policy or LargestFitsPolicy(), offered)
    assign = chooser.assign if chooser is not None else named_subnet
    scheduler = Scheduler(config, blocks, order or FirstComeFirstServed(), (EOS,), assign)
    runner = FakeRunner(num_blocks, block_size, lay, next_token, step_seconds, clock, ffn)
    engine = Engine(runner, scheduler, ByteDecoder(), VOCAB, chooser, el)
    return Harness(engine, runner, scheduler, blocks, chooser, el, ffn, probe, sampler)
