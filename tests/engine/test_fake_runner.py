"""The fakes themselves: every contract check of FakeRunner fires on a breach and stays quiet on a
correct step, the injected faults do what they say, and none of it (nor the engine) loads torch.

The other engine tests assert "no violations"; these tests are why that assertion can fail.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.vocabulary.step import DeviceOutOfMemory, StepSequence
from server.vocabulary.subnets import Subnet
from tests.engine.fake_runner import (
    ByteDecoder,
    FakeClock,
    FakeFfn,
    FakeRunner,
    counting_token,
    hashed_token,
    reference,
)
from tests.engine.harness import FULL, LITE, MID, SMALL, TEXT, greedy
from tests.unit.engine_fixtures import layout

REPO = Path(__file__).resolve().parents[2]
BS = 4
POOL = 10_000


def table(subnet: Subnet, num_tokens: int, base: int = 0) -> list[list[int]]:
    """Distinct blocks for every KV layer the subnet keeps, enough for num_tokens positions."""
    n = -(-num_tokens // BS)
    return [
        [base + layer * 100 + i for i in range(n)] if layer in subnet.kv_layers else []
        for layer in range(TEXT.first_kv_shared_layer)
    ]


def seq(rid, subnet, tokens, start, tab, sample=True) -> StepSequence:
    return StepSequence(rid, subnet, tokens, start, tab, sample)


def runner(**kw) -> FakeRunner:
    return FakeRunner(POOL, BS, layout(TEXT), **kw)


PROMPT = [40, 41, 42, 43, 44, 45]


def prefilled(r: FakeRunner, rid="a", subnet=FULL, base=0) -> list[list[int]]:
    """Register `rid` and run its whole prompt (one step); returns its block table."""
    r.add_request(rid, greedy(), PROMPT)
    tab = table(subnet, 16, base)
    r.execute([seq(rid, subnet, PROMPT, 0, tab)])
    return tab


def test_a_correct_prefill_and_decode_pass_every_check_and_follow_the_fake_model():
    """Quiet on a correct step: no violation, and the tokens are next_token's, step by step."""
    r = runner()
    tab = prefilled(r)
    first = r.samples["a"][0][1]
    assert first == hashed_token("full", PROMPT)
    out = r.execute([seq("a", FULL, [first], len(PROMPT), tab)])
    assert out.samples["a"].token_id == hashed_token("full", [*PROMPT, first])
    assert r.violations == []


BREACHES = {
    "execute before add_request": lambda r: r.execute([seq("x", FULL, [1], 0, table(FULL, 1))]),
    "execute after release": lambda r: (
        prefilled(r),
        r.release("a"),
        r.execute([seq("a", FULL, [5], 6, table(FULL, 7))]),
    ),
    "a request twice in a step": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT[:3], 0, table(FULL, 6), False)] * 2),
    ),
    "add_request twice": lambda r: (
        r.add_request("a", greedy(), [1]),
        r.add_request("a", greedy(), [1]),
    ),
    "wrong tokens": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, [9, 9, 9, 9, 9, 9], 0, table(FULL, 6))]),
    ),
    "sample flag before the last token": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT[:3], 0, table(FULL, 6), True)]),
    ),
    "no sample flag at the last token": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT, 0, table(FULL, 6), False)]),
    ),
    "a missing block": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT, 0, table(FULL, 4))]),
    ),
    "one block on two layers": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT, 0, [[7, 8]] * TEXT.first_kv_shared_layer)]),
    ),
    "a block outside the pool": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT, 0, table(FULL, 6, base=POOL))]),
    ),
    "blocks on a layer the subnet skips": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", SMALL, PROMPT, 0, table(FULL, 6))]),
    ),
    "a start past what the cache holds": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT[2:], 2, table(FULL, 6))]),
    ),
    "KV read under another layout": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.execute([seq("a", FULL, PROMPT[:4], 0, table(FULL, 6), False)]),
        r.execute([seq("a", MID, PROMPT[4:], 4, table(FULL, 6))]),
    ),
    "a block written while another holds it": lambda r: (
        r.add_request("a", greedy(), PROMPT),
        r.add_request("b", greedy(), PROMPT),
        r.execute(
            [seq("a", FULL, PROMPT, 0, table(FULL, 6)), seq("b", FULL, PROMPT, 0, table(FULL, 6))]
        ),
    ),
    "another request's tokens in my block": lambda r: (
        prefilled(r, "a", base=0),
        r.add_request("b", greedy(), [50, 51, 52, 53, 54, 55]),
        r.execute([seq("b", FULL, [50, 51, 52, 53, 54, 55], 0, table(FULL, 6))]),
        r.execute([seq("a", FULL, [r.samples["a"][0][1]], 6, table(FULL, 7))]),
    ),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_every_breach_of_the_runner_contract_is_recorded(breach):
    """Each check fires: the other tests' 'no violations' can fail."""
    r = runner()
    BREACHES[breach](r)
    assert r.violations, f"{breach} went unnoticed"


def test_a_subnet_wider_than_the_resident_widths_is_a_violation():
    """With weights given, a step on a subnet whose widths are not resident is reported."""
    ffn = FakeFfn(TEXT.intermediate_size)
    r = runner(ffn=ffn)
    prefilled(r, "a", LITE)
    assert r.violations == []
    ffn.resident_widths = LITE.widths  # lite fits, full no longer does
    r.add_request("b", greedy(), PROMPT)
    r.execute([seq("b", FULL, PROMPT, 0, table(FULL, 6, base=5000))])
    assert r.violations and "resident" in r.violations[0]


def test_calls_overlapping_from_two_threads_are_a_violation():
    """The engine must never call the runner from two threads at once (AsyncEngine's rule)."""
    r = runner()
    r.add_request("a", greedy(), PROMPT)
    inside, leave = threading.Event(), threading.Event()
    r.before_execute = lambda seqs: (inside.set(), leave.wait(5))
    t = threading.Thread(target=r.execute, args=([seq("a", FULL, PROMPT, 0, table(FULL, 6))],))
    t.start()
    assert inside.wait(5)
    r.release("b")
    leave.set()
    t.join(5)
    assert any("while another runner call" in v for v in r.violations)


def test_injected_failure_out_of_memory_and_step_time():
    """fail() errs one request only (from a position on); out_of_memory() raises before
    anything is written, so the same step then runs; step_seconds moves the clock."""
    clock = FakeClock(0.0)
    r = runner(step_seconds=0.25, clock=clock)
    r.add_request("a", greedy(), PROMPT)
    r.add_request("b", greedy(), [50, 51, 52])
    r.fail("b", "boom", at_position=2)
    r.out_of_memory(1)
    step = [
        seq("a", FULL, PROMPT, 0, table(FULL, 6)),
        seq("b", MID, [50, 51, 52], 0, table(MID, 3, 3000)),
    ]
    with pytest.raises(DeviceOutOfMemory):
        r.execute(step)
    assert clock() == 0.0 and r.steps == [] and r.samples == {}
    out = r.execute(step)
    assert out.errors == {"b": "boom"} and set(out.samples) == {"a"}
    assert out.seconds == 0.25 and clock() == 0.25 and out.ffn_mode == "grouped"
    assert r.violations == []


def test_the_fake_models_depend_on_the_subnet_and_every_context_token():
    """hashed_token changes with the subnet and with any context token (on these inputs), so a
    wrong subnet or context shows; counting_token is predictable text."""
    ctx = [40, 41, 42, 43]
    base = hashed_token("full", ctx)
    assert base != hashed_token("mid", ctx)
    assert base != hashed_token("full", [40, 41, 42, 44]) != hashed_token("full", [41, 41, 42, 43])
    assert all(32 <= hashed_token(name, ctx) <= 126 for name in ("full", "lite", "mid"))
    assert reference(counting_token, "full", [ord("a")], greedy(3)) == [ord(c) for c in "bcd"]
    stops = reference(counting_token, "full", [ord("a")], greedy(9, stop_token_ids=(ord("c"),)))
    assert stops == [ord("b"), ord("c")]


def test_byte_decoder_decodes_utf8_and_skips_special_tokens():
    d = ByteDecoder()
    euro = list("€".encode())
    assert d.decode([104, 105, 300, *euro]) == "hi€"
    assert d.decode([104, 300], skip_special_tokens=False) == "h<300>"
    assert d.decode(euro[:2]) == "\ufffd"


def test_fake_ffn_resizes_finish_when_told_and_commits_are_checked():
    """A background resize is done only after finish_resizes; committing it earlier, or an
    abandoned one, is recorded; a stale one raises as the real weights do."""
    ffn = FakeFfn((8, 8))
    half = ffn.prepare_ffn((4, 4))
    assert not half.done()
    ffn.finish_resizes()
    assert half.done()
    report = ffn.commit_ffn(half)
    assert (report.released_bytes, report.uploaded_bytes) == (8, 0)
    assert ffn.resident_widths == (4, 4) and ffn.violations == []
    early = ffn.prepare_ffn((8, 8))
    ffn.abandon_ffn(early)
    ffn.commit_ffn(early)
    assert len(ffn.violations) == 2
    with pytest.raises(RuntimeError, match="changed"):
        ffn.commit_ffn(ffn.prepare_ffn((2, 2), background=False)) and ffn.commit_ffn(early)


def test_the_fakes_and_the_engine_load_without_torch():
    """In a fresh interpreter: the fakes, the harness and every engine module these tests drive
    import no torch (nor numpy or transformers, which would pull it in)."""
    code = (
        "import sys\n"
        "import tests.engine.fake_runner, tests.engine.harness\n"
        "import server.engine.engine, server.engine.async_engine, server.engine.elasticity\n"
        "import server.engine.chooser, server.engine.offline, server.telemetry.headroom\n"
        "heavy = ('torch', 'numpy', 'transformers', 'safetensors')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
