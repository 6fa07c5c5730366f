"""The sampler on synthetic logits: each processing step, its order, errors, exactness and seeds.

No model: rows are made-up logits over a small text vocabulary plus a few placeholder ids (and a
few larger vocabularies where the block race needs several levels). The reference distribution
(`oracle`) is written independently of the sampler: float64, one row at a time, a sorted Python
list. Statistical checks use fixed seeds, so they are deterministic, not flaky: each either always
passes or always fails.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from scipy.stats import chi2

from server.runtime.row_passes import _Compiled
from server.runtime.sampler import Sampler, SamplerState, SamplingError
from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError
from server.vocabulary.step import SampleResult
from tests.runtime.conftest import DispatchedOps

V = 32  # text vocabulary
PLACEHOLDERS = 8  # ids V .. V+7: vision/audio, never sampled
EOS = 1
SAMPLER = Sampler(V, eos_ids=[EOS])
# The same sampler with two nucleus candidates: top_p rows that the candidates do not settle go
# through the rejection path, which the default 128 candidates would never need on 32 ids.
REJECTING = Sampler(V, eos_ids=[EOS], nucleus_candidates=2)
# Chi-square tests accept at p > 0.001: with fixed seeds a correct sampler passes always, and
# `test_the_frequency_test_has_power` shows a 10% error in temperature is rejected.
ALPHA = 1e-3


@pytest.fixture(autouse=True)
def _compiled_calls_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiled pass runs dynamo's code directly once compiled for a kind of input
    # (row_passes._Compiled); here every such call is first checked against dynamo's guards, and
    # one that would have failed them fails the test.
    monkeypatch.setattr(_Compiled, "check_guards", True)


def state(prompt: Sequence[int] = (), eos: Sequence[int] | None = None, sampler=SAMPLER, **p):
    return sampler.add_request(SamplingParams(**p), prompt, eos)


def row(probs: Sequence[float], fill: float = -30.0, width: int = V + PLACEHOLDERS) -> torch.Tensor:
    """Logits whose softmax over the first len(probs) ids is `probs`; others near zero mass."""
    out = torch.full((width,), fill)
    out[: len(probs)] = torch.tensor(probs).log()
    return out


def rand_row(seed: int, scale: float = 3.0, width: int = V + PLACEHOLDERS) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed)) * scale


# ---- the reference distribution ----------------------------------------------------------------


def oracle(
    raw: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    outputs: Sequence[int] = (),
    eos: Sequence[int] = (EOS,),
    vocab: int = V,
) -> torch.Tensor:
    """The distribution a row must be drawn from, float64 [vocab], by the documented rules."""
    x = [float(v) for v in raw[:vocab].double()]
    outs = [t for t in outputs if 0 <= t < vocab]
    if len(outputs) < params.min_tokens:
        for t in {e for e in eos if 0 <= e < vocab} | set(params.stop_token_ids):
            x[t] = -math.inf
    for t, b in params.logit_bias:
        x[t] += b
    if params.repetition_penalty != 1:
        for t in {t for t in prompt if 0 <= t < vocab} | set(outs):
            x[t] = (
                x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
            )
    for t, c in Counter(outs).items():
        x[t] -= params.frequency_penalty * c + params.presence_penalty
    probs = torch.zeros(vocab, dtype=torch.float64)
    order = sorted(range(vocab), key=lambda i: (-x[i], i))
    if params.greedy:
        probs[order[0]] = 1.0
        return probs
    z = {i: (x[i] - x[order[0]]) / params.temperature for i in order}
    kept = order[: params.top_k] if 0 < params.top_k < vocab else order
    w = {i: math.exp(z[i]) for i in kept}
    if params.top_p < 1:
        total, before, nucleus = sum(w.values()), 0.0, []
        for i in kept:
            if before < params.top_p * total:
                nucleus.append(i)
            before += w[i]
        kept = nucleus
    if params.min_p > 0:
        kept = [i for i in kept if z[i] >= math.log(params.min_p)]
    mass = sum(w[i] for i in kept)
    for i in kept:
        probs[i] = w[i] / mass
    return probs


def chi_square_pvalue(counts: Counter[int], probs: torch.Tensor) -> float:
    """Pearson's test of draw counts against probs; ids expected fewer than 5 times are pooled
    (the usual validity rule). Draws of a zero-probability id fail outright."""
    n = sum(counts.values())
    outside = [t for t in counts if probs[t] == 0]
    assert not outside, f"drew ids the distribution excludes: {outside}"
    expected = probs * n
    bins = [[i] for i in range(len(probs)) if expected[i] >= 5]
    rest = [i for i in range(len(probs)) if 0 < expected[i] < 5]
    if rest:
        bins.append(rest)
    if len(bins) > 1 and sum(expected[i] for i in bins[-1]) < 5:
        bins[-2] += bins.pop()
    if len(bins) < 2:
        return 1.0
    stat = 0.0
    for b in bins:
        e = float(sum(expected[i] for i in b))
        o = sum(counts[i] for i in b)
        stat += (o - e) ** 2 / e
    return float(chi2.sf(stat, len(bins) - 1))


def draws(
    logits_row: torch.Tensor,
    params: SamplingParams,
    seeds: int = 50,
    steps: int = 80,
    sampler: Sampler = SAMPLER,
) -> Counter[int]:
    """seeds x steps draws: requests with seeds 0..seeds-1, each sampled `steps` times (its key
    moves with every token), all on the same logits. Only for parameters without penalties,
    whose distribution does not change as tokens are generated."""
    states = [sampler.add_request(_with(params, seed=s)) for s in range(seeds)]
    batch = logits_row.expand(seeds, -1).contiguous()
    counts: Counter[int] = Counter()
    for _ in range(steps):
        counts.update(r.token_id for r in sampler.sample(batch, states))
    return counts


def _with(params: SamplingParams, **changes) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


# ---- greedy, placeholders ----------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.stack([rand_row(i) for i in range(6)])
    logits[5, :V] = 0.0
    logits[5, 7] = logits[5, 3] = 2.0
    results = SAMPLER.sample(logits, [state(temperature=0) for _ in range(6)])
    expected = logits[:, :V].argmax(dim=1).tolist()
    assert [r.token_id for r in results] == expected
    assert results[5].token_id == 3
    assert all(r.logprob is None and r.top_logprobs == () for r in results)


def test_greedy_ties_across_blocks_go_to_the_lowest_id() -> None:
    # 4096 ids = 64 blocks of 64: the maximum sits in blocks 5 and 40; the first block wins,
    # and inside it the first position.
    big = Sampler(4096)
    logits = torch.zeros(2, 4096)
    logits[:, 40 * 64 + 3] = logits[:, 5 * 64 + 60] = logits[:, 5 * 64 + 61] = 7.0
    logits[1, 0] = 7.0
    got = big.sample(logits, [big.add_request(SamplingParams(temperature=0)) for _ in range(2)])
    assert [r.token_id for r in got] == [5 * 64 + 60, 0]


def test_placeholder_ids_are_never_sampled() -> None:
    logits = rand_row(0)
    logits[V:] = 1e4  # far above every text logit
    assert SAMPLER.sample(logits[None], [state(temperature=0)])[0].token_id < V
    counts = draws(logits, SamplingParams(temperature=5.0), seeds=40, steps=50)
    assert max(counts) < V
    r = SAMPLER.sample(logits[None], [state(temperature=0, logprobs=3)])[0]
    assert all(t < V for t, _ in r.top_logprobs)
    assert r.logprob == pytest.approx(torch.log_softmax(logits[:V].double(), 0)[r.token_id].item())


def test_bfloat16_logits_and_extra_width_accepted() -> None:
    logits = rand_row(3)[None].to(torch.bfloat16)
    r = SAMPLER.sample(logits, [state(temperature=0)])[0]
    assert r.token_id == int(logits[0, :V].float().argmax())
    r = SAMPLER.sample(logits, [state(top_k=4, top_p=0.9, seed=1, logprobs=2)])[0]
    assert r.token_id in logits[0, :V].float().topk(4).indices.tolist()
    # Every path takes bf16 (the accelerator's logits) and draws what float32 logits would.
    params = [
        SamplingParams(seed=2),
        SamplingParams(top_p=0.6, seed=3),
        SamplingParams(min_p=0.3, seed=4, logprobs=3),
        SamplingParams(top_p=0.6, seed=5, repetition_penalty=1.2),
    ]
    for sampler in (SAMPLER, REJECTING):
        half = sampler.sample(logits.expand(4, -1), [sampler.add_request(p) for p in params])
        full = logits.float().expand(4, -1)
        assert half == sampler.sample(full, [sampler.add_request(p) for p in params])


# ---- exactness: sampled frequencies against the reference distribution --------------------------

BASE = rand_row(7, scale=1.5)  # spread: most of the 32 ids have visible mass
EXACTNESS = {
    "temperature 0.5": (SAMPLER, SamplingParams(temperature=0.5)),
    "temperature 1": (SAMPLER, SamplingParams()),
    "temperature 2": (SAMPLER, SamplingParams(temperature=2.0)),
    "top_k": (SAMPLER, SamplingParams(top_k=5)),
    "top_k + top_p": (SAMPLER, SamplingParams(top_k=8, top_p=0.8)),
    "top_p (candidates)": (SAMPLER, SamplingParams(top_p=0.7)),
    "top_p (rejection)": (REJECTING, SamplingParams(top_p=0.7)),
    "min_p": (SAMPLER, SamplingParams(min_p=0.1)),
    "top_k + min_p": (SAMPLER, SamplingParams(top_k=10, min_p=0.2, temperature=0.7)),
    "top_p + min_p (candidates)": (SAMPLER, SamplingParams(top_p=0.9, min_p=0.05)),
    "top_p + min_p (rejection)": (REJECTING, SamplingParams(top_p=0.9, min_p=0.15)),
    "all filters": (SAMPLER, SamplingParams(top_k=12, top_p=0.9, min_p=0.05, temperature=0.8)),
}


@pytest.mark.parametrize("name", list(EXACTNESS))
def test_sampled_frequencies_match_the_filtered_distribution(name: str) -> None:
    sampler, params = EXACTNESS[name]
    probs = oracle(BASE, params)
    counts = draws(BASE, params, sampler=sampler)
    assert chi_square_pvalue(counts, probs) > ALPHA, (name, counts)
    # Every id the distribution keeps with 20 expected draws or more is drawn (a correct sampler
    # misses one with probability e^-20 per id).
    assert {i for i in range(V) if probs[i] * 4000 >= 20} <= set(counts)


def test_the_frequency_test_has_power() -> None:
    # The same draws, judged against a 10% wrong temperature, are rejected: the test above can
    # fail. (4000 draws over ~20 ids resolve differences of a few percent.)
    counts = draws(BASE, SamplingParams(temperature=1.0))
    assert chi_square_pvalue(counts, oracle(BASE, SamplingParams(temperature=1.1))) < ALPHA


def test_frequencies_with_penalties_bias_and_min_tokens() -> None:
    params = SamplingParams(
        temperature=1.2,
        top_k=20,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.3,
        logit_bias={3: 1.5, 9: -2.0},
        min_tokens=5,
        stop_token_ids=(4,),
    )
    prompt, history = [2, 5, 5, 11], [6, 6, 11, 20]
    probs = oracle(BASE, params, prompt, history)
    states = [SAMPLER.add_request(_with(params, seed=s), prompt) for s in range(4000)]
    for t in history:
        SAMPLER.record(states, [t] * len(states))
    results = SAMPLER.sample(BASE.expand(4000, -1).contiguous(), states)
    counts = Counter(r.token_id for r in results)
    assert probs[EOS] == probs[4] == 0  # min_tokens (5) not reached after 4 tokens
    assert chi_square_pvalue(counts, probs) > ALPHA, counts


# Several levels of the block race: 16384 ids = 256 blocks of 64 = 4 groups of 64 blocks. Twelve
# ids spread over blocks and groups carry the mass; the rest sit 60 below (e^-60: never drawn).
BIG_V = 16384
BIG_IDS = [5, 70, 4095, 4096, 4160, 8191, 9000, 12000, 12001, 12063, 16000, 16383]
BIG_PROBS = [0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.01]


@pytest.mark.parametrize(
    ("params", "candidates"),
    [
        (SamplingParams(temperature=1.0), 128),
        (SamplingParams(temperature=0.8, min_p=0.2), 128),
        (SamplingParams(top_p=0.8), 4),  # the nucleus (8 ids) is past 4 candidates: rejection
        (SamplingParams(top_k=6, top_p=0.9), 128),
    ],
)
def test_block_race_over_a_large_vocabulary(params: SamplingParams, candidates: int) -> None:
    sampler = Sampler(BIG_V, nucleus_candidates=candidates)
    logits = torch.full((BIG_V,), -60.0)
    logits[BIG_IDS] = torch.tensor(BIG_PROBS).log()
    probs = oracle(logits, params, eos=(), vocab=BIG_V)
    counts = draws(logits, params, seeds=40, steps=50, sampler=sampler)
    assert set(counts) <= {BIG_IDS[i] for i in range(len(BIG_IDS)) if probs[BIG_IDS[i]] > 0}
    assert chi_square_pvalue(counts, probs) > ALPHA, counts


# The envelope with one exact block (block 0: only id 5's 0.2 of the mass): every other block's
# bound is 64x its one token's weight, so a proposal is accepted with probability ~1/51. With 64
# proposals about 72% of draws are accepted proposals and the rest are drawn again on the exact
# path; with one proposal nearly all are drawn again. Both mixtures must be the exact distribution.
# top_p rows: the total is known only within bounds that far apart, so most proposals are
# ambiguous and are decided after the read-back; with 2 nucleus candidates, a pending proposal
# past them has its mass-before counted there too.
@pytest.mark.parametrize("proposals", [64, 1])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, min_p=0.2),
        SamplingParams(top_p=0.8),
        SamplingParams(top_p=0.7, temperature=1.3, min_p=0.3),
    ],
)
def test_envelope_rejection_and_redraw_are_exact(params: SamplingParams, proposals: int) -> None:
    sampler = Sampler(BIG_V, envelope_blocks=1, envelope_proposals=proposals, nucleus_candidates=2)
    logits = torch.full((BIG_V,), -60.0)
    logits[BIG_IDS] = torch.tensor(BIG_PROBS).log()
    probs = oracle(logits, params, eos=(), vocab=BIG_V)
    counts = draws(logits, params, seeds=40, steps=50, sampler=sampler)
    assert chi_square_pvalue(counts, probs) > ALPHA, counts


def test_a_loose_envelope_costs_one_more_read_only_when_a_row_is_drawn_again() -> None:
    logits = torch.full((BIG_V,), -60.0)
    logits[BIG_IDS] = torch.tensor(BIG_PROBS).log()
    batch = logits.expand(8, -1).contiguous()
    reads = []
    for proposals in (4096, 1):  # accepts within 4096 proposals (fails w.p. ~1e-35); rarely in 1
        sampler = Sampler(BIG_V, envelope_blocks=1, envelope_proposals=proposals)
        states = [sampler.add_request(SamplingParams(seed=s)) for s in range(8)]
        tolist, calls = torch.Tensor.tolist, 0

        def counted(self, tolist=tolist):
            nonlocal calls
            calls += 1
            return tolist(self)

        torch.Tensor.tolist = counted  # type: ignore[method-assign]
        try:
            sampler.sample(batch, states)
        finally:
            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        reads.append(calls)
    assert reads == [1, 2]


# ---- temperature, top-k, top-p, min-p: which ids survive ----------------------------------------


def test_top_k_1_equals_greedy() -> None:
    logits = torch.stack([rand_row(i) for i in range(64)])
    greedy = SAMPLER.sample(logits, [state(temperature=0) for _ in range(64)])
    top1 = SAMPLER.sample(logits, [state(top_k=1, temperature=1.5, seed=i) for i in range(64)])
    assert [r.token_id for r in top1] == [r.token_id for r in greedy]


def test_top_k_keeps_exactly_k_ties_to_lower_ids() -> None:
    flat = torch.zeros(V + PLACEHOLDERS)
    assert set(draws(flat, SamplingParams(top_k=3), seeds=20, steps=20)) == {0, 1, 2}
    # 16 tied ids spread over 4 blocks of a larger vocabulary: the lowest 5 are the top 5.
    big = Sampler(4096)
    logits = torch.full((4096,), -5.0)
    tied = [3, 64, 65, 700, 701, 702, 2000, 2001, 2002, 2003, 4000, 4001, 4002, 4003, 4004, 4095]
    logits[tied] = 1.0
    assert set(draws(logits, SamplingParams(top_k=5), 20, 20, big)) == set(tied[:5])
    counts = draws(row([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_k=2))
    assert set(counts) == {0, 1}
    assert chi_square_pvalue(counts, oracle(row([0.4, 0.3, 0.2, 0.1]), SamplingParams(top_k=2)))


PROBS = [0.4, 0.3, 0.15, 0.1, 0.02, 0.01, 0.01, 0.01]


@pytest.mark.parametrize("sampler", [SAMPLER, REJECTING], ids=["candidates", "rejection"])
@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.05, [0]), (0.5, [0, 1]), (0.75, [0, 1, 2]), (0.9, [0, 1, 2, 3])]
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept, sampler) -> None:
    logits = row(PROBS, fill=float("-inf"))
    counts = draws(logits, SamplingParams(top_p=top_p), sampler=sampler)
    assert sorted(counts) == kept  # the excluded ids are never drawn; every kept one is
    mass = sum(PROBS[i] for i in kept)
    probs = torch.zeros(V, dtype=torch.float64)
    probs[kept] = torch.tensor([PROBS[i] / mass for i in kept], dtype=torch.float64)
    assert chi_square_pvalue(counts, probs) > ALPHA


def test_top_p_applies_after_temperature_and_top_k() -> None:
    logits = row(PROBS, fill=float("-inf"))
    # At T = 0.5 the top token alone holds 0.4^2 / sum(p^2) = 0.56 of the mass.
    assert set(draws(logits, SamplingParams(temperature=0.5, top_p=0.55), 20, 20)) == {0}
    assert set(draws(logits, SamplingParams(temperature=0.5, top_p=0.55), 20, 20, REJECTING)) == {0}
    # After top_k=2 renormalises, id 0 holds 0.4/0.7 = 0.571 >= 0.56: only id 0 is left.
    assert set(draws(logits, SamplingParams(top_k=2, top_p=0.56), 20, 20)) == {0}


@pytest.mark.parametrize(
    ("min_p", "temperature", "kept"),
    [(0.3, 1.0, [0, 1, 2]), (0.5, 1.0, [0, 1]), (1.0, 1.0, [0]), (0.3, 0.5, [0, 1])],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, temperature, kept) -> None:
    logits = row(PROBS, fill=float("-inf"))
    params = SamplingParams(min_p=min_p, temperature=temperature)
    tempered = torch.tensor(PROBS) ** (1 / temperature)
    assert all(tempered[i] >= min_p * tempered[0] for i in kept)
    assert sorted(draws(logits, params)) == kept
    assert sorted(draws(logits, _with(params, top_k=6))) == kept
    assert sorted(draws(logits, _with(params, top_p=0.99), sampler=REJECTING)) == kept


def test_filters_always_keep_the_top_token() -> None:
    logits = torch.stack([rand_row(i) for i in range(50)])
    for sampler in (SAMPLER, REJECTING):
        states = [
            state(sampler=sampler, top_p=1e-6, min_p=1.0, temperature=3.0, seed=i)
            for i in range(50)
        ]
        states += [
            state(top_p=1e-6, top_k=5, min_p=1.0, temperature=3.0, seed=i) for i in range(50)
        ]
        results = sampler.sample(logits.repeat(2, 1), states)
        assert [r.token_id for r in results] == logits[:, :V].argmax(1).tolist() * 2


def test_tiny_temperature_is_finite_and_picks_the_top() -> None:
    logits = torch.stack([rand_row(i) for i in range(20)])
    for extra in ({}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}):
        states = [state(temperature=1e-8, seed=i, **extra) for i in range(20)]
        results = SAMPLER.sample(logits, states)
        assert [r.token_id for r in results] == logits[:, :V].argmax(1).tolist(), extra


# ---- logit_bias, penalties, min_tokens ---------------------------------------------------------


def test_logit_bias_forces_and_forbids() -> None:
    logits = torch.stack([rand_row(i) for i in range(200)])
    forced = SAMPLER.sample(logits, [state(logit_bias={9: 100.0}, seed=i) for i in range(200)])
    assert {r.token_id for r in forced} == {9}
    top = int(logits[0, :V].argmax())
    second = int(logits[0, :V].topk(2).indices[1])
    greedy = SAMPLER.sample(logits[:1], [state(temperature=0, logit_bias={top: -100.0})])
    assert greedy[0].token_id == second
    counts = draws(logits[0], SamplingParams(temperature=2.0, logit_bias={top: -100.0}))
    assert top not in counts


def test_penalties_change_the_right_logits_by_the_right_amounts() -> None:
    raw = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 2.0, 1.0] + [0.25] * (V - 7) + [9.0] * 8)
    s = state(
        prompt=[3, 3, 4, V + 2],  # a placeholder id in the prompt is ignored
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logit_bias={6: 1.5, 0: -0.5},
    )
    for t in [4, 5, 5, 5]:
        SAMPLER.record([s], [t])
    assert s.num_generated == 4
    got = SAMPLER.processed_logits(raw[None], [s])[0]
    want = raw[:V].clone()
    want[0] -= 0.5  # bias only
    want[6] += 1.5  # bias only
    want[3] = 3.0 / 2  # in the prompt only: repetition, but no frequency/presence
    want[4] = -2.0 * 2 - (0.5 * 1 + 0.25)  # negative: multiplied; then output count 1
    want[5] = 2.0 / 2 - (0.5 * 3 + 0.25)  # output only: repetition, then count 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bias_comes_before_repetition_penalty() -> None:
    raw = torch.zeros(2, V)
    s = state(prompt=[2], repetition_penalty=4.0, logit_bias={2: 2.0, 3: -2.0}, eos=())
    s2 = state(prompt=[3], repetition_penalty=4.0, logit_bias={2: 2.0, 3: -2.0}, eos=())
    got = SAMPLER.processed_logits(raw, [s, s2])
    assert got[0, 2].item() == 0.5 and got[0, 3].item() == -2.0
    assert got[1, 2].item() == 2.0 and got[1, 3].item() == -8.0


def test_penalties_are_per_row() -> None:
    raw = torch.zeros(3, V)
    a = state(prompt=[1], repetition_penalty=0.5, presence_penalty=1.0)
    b = state(prompt=[1])
    c = state(frequency_penalty=-1.0)
    for _ in range(2):
        SAMPLER.record([a, b, c], [2, 2, 2])
    got = SAMPLER.processed_logits(raw, [a, b, c])
    assert got[0].nonzero().flatten().tolist() == [2] and got[0, 2].item() == -1.0
    assert not got[1].any()
    assert got[2].nonzero().flatten().tolist() == [2] and got[2, 2].item() == 2.0


def test_recording_a_placeholder_counts_only_towards_min_tokens() -> None:
    s = state(min_tokens=2, repetition_penalty=2.0, presence_penalty=1.0)
    SAMPLER.record([s], [V + 3])
    SAMPLER.record([s], [4])
    assert s.num_generated == 2
    got = SAMPLER.processed_logits(torch.ones(1, V + PLACEHOLDERS), [s])[0]
    assert got.tolist() == [1.0] * 4 + [0.5 - 1.0] + [1.0] * (V - 5)


def test_sampled_tokens_are_counted_on_the_device() -> None:
    # Penalties see the tokens `sample` drew, without the caller recording anything.
    logits = torch.zeros(1, V)
    logits[0, 9] = 5.0
    s = state(temperature=0, frequency_penalty=2.0)
    tokens = [SAMPLER.sample(logits, [s])[0].token_id for _ in range(4)]
    # 9 leads by 5; each use costs it 2: drawn at counts 0, 1, 2 (5 - 4 = 1 > 0), then 5 - 6 < 0.
    assert tokens == [9, 9, 9, 0]


def test_tiny_repetition_penalty_stays_finite() -> None:
    raw = torch.full((1, V), 1.0)
    s = state(prompt=[4], repetition_penalty=1e-45, seed=0)
    assert torch.isfinite(SAMPLER.processed_logits(raw, [s])).all()
    assert SAMPLER.sample(raw, [s])[0].token_id == 4


@pytest.mark.parametrize("penalty", [1e-300, 1e-45, 1e300])
def test_extreme_repetition_penalties_never_make_nan(penalty: float) -> None:
    # Beyond float32's range the penalty rounds to 0 or inf: a blocked eos (-inf) times 0, or a
    # zero logit times inf, would be NaN, which the row would report as the model's fault.
    raw = torch.zeros(1, V)
    raw[0, 5] = -2.0
    s = state(prompt=[EOS, 4, 5], min_tokens=3, repetition_penalty=penalty, seed=0)
    processed = SAMPLER.processed_logits(raw, [s])[0]
    assert not processed.isnan().any() and processed[EOS] == float("-inf")
    assert SAMPLER.sample(raw, [s])[0].token_id != EOS


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_blocks_eos_and_stop_ids_until_reached(ignore_eos: bool) -> None:
    raw = torch.zeros(1, V + PLACEHOLDERS)
    raw[0, EOS], raw[0, 7], raw[0, 5] = 10.0, 9.0, 8.0
    s = state(temperature=0, min_tokens=3, stop_token_ids=(7,), ignore_eos=ignore_eos)
    tokens = []
    for _ in range(4):
        processed = SAMPLER.processed_logits(raw, [s])[0]
        blocked = math.isinf(processed[EOS]) and math.isinf(processed[7])
        assert blocked == (s.num_generated < 3)
        tokens.append(SAMPLER.sample(raw, [s])[0].token_id)
    assert tokens == [5, 5, 5, EOS]
    sampled = state(min_tokens=1, stop_token_ids=(7,), seed=1)
    raw2 = torch.full((1, V), -5.0)
    raw2[0, EOS] = raw2[0, 7] = 20.0
    assert SAMPLER.sample(raw2, [sampled])[0].token_id not in (EOS, 7)


def test_released_slots_are_reused_and_the_table_grows() -> None:
    sampler = Sampler(V)
    many = [sampler.add_request(SamplingParams(logit_bias={i: 100.0})) for i in range(V)]
    assert sampler.table.slots >= V
    got = sampler.sample(torch.zeros(V, V), many)
    assert [r.token_id for r in got] == list(range(V))
    slots = sampler.table.slots
    for s in many:
        sampler.release(s)
    again = [sampler.add_request(SamplingParams(logit_bias={3: 100.0})) for _ in range(V)]
    assert sampler.table.slots == slots  # freed slots were reused
    assert {r.token_id for r in sampler.sample(torch.zeros(V, V), again)} == {3}
    long = sampler.add_request(
        SamplingParams(repetition_penalty=2.0, max_tokens=500), list(range(V))
    )
    assert sampler.table.width >= V + 500
    with pytest.raises(ValueError, match="released"):
        sampler.sample(torch.zeros(1, V), [many[0]])
    assert sampler.sample(torch.ones(1, V), [long])[0].token_id in range(V)


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits() -> None:
    raw = rand_row(11)[None]
    want = torch.log_softmax(raw[0, :V].double(), 0)
    plain = state(logprobs=5, seed=3)
    shaped = state(
        logprobs=5,
        seed=3,
        temperature=0.3,
        top_k=4,
        repetition_penalty=3.0,
        presence_penalty=2.0,
        logit_bias={0: 50.0},
        prompt=list(range(V)),
    )
    results = SAMPLER.sample(raw.repeat(2, 1), [plain, shaped])
    assert results[0].top_logprobs == results[1].top_logprobs
    assert results[1].token_id == 0  # the bias did shape the draw, not the logprobs
    for r in results:
        # float32 logits, float64 normaliser: agreement to a few float32 ulps of |logprob| <= 20.
        assert r.logprob == pytest.approx(want[r.token_id].item(), abs=1e-5)
        assert [t for t, _ in r.top_logprobs] == want.topk(5).indices.tolist()
        lps = [lp for _, lp in r.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        torch.testing.assert_close(
            torch.tensor(lps, dtype=torch.float64), want.topk(5).values, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("top_k", [3, 5, 40])
def test_top_logprobs_of_top_k_rows(top_k: int) -> None:
    # A top_k row's sampling candidates are the raw top tokens, reused for its top logprobs
    # when it asks for no more than top_k of them (3: it asks for more, and they are selected
    # again); next to a greedy row, which is not a top_k row, and a 4096-id vocabulary.
    sampler = Sampler(4096)
    raw = torch.randn(2, 4096, generator=torch.Generator().manual_seed(7)) * 3
    states = [
        sampler.add_request(SamplingParams(logprobs=5, top_k=top_k, temperature=0.7, seed=1)),
        sampler.add_request(SamplingParams(logprobs=2, temperature=0)),
    ]
    for row, r in enumerate(sampler.sample(raw, states)):
        want = torch.log_softmax(raw[row].double(), 0)
        n = len(r.top_logprobs)
        assert n == (5, 2)[row]
        assert [t for t, _ in r.top_logprobs] == want.topk(n).indices.tolist()
        torch.testing.assert_close(  # float32 logits, float64 normaliser: see above
            torch.tensor([lp for _, lp in r.top_logprobs], dtype=torch.float64),
            want.topk(n).values,
            rtol=0,
            atol=1e-5,
        )


def test_a_compiled_sampler_keeps_the_logprobs_bound() -> None:
    # Sampler(compiled=True) (a server with `compile: true`) forms the normaliser in one compiled
    # loop (row_passes.py): the same float32 block sums and float64 total as the eager passes,
    # so the same bound against float64 holds; for a batch where every row wants logprobs and
    # one where some do not (their rows are selected first), logits wider than the vocabulary.
    vocab = 4096
    raw = torch.randn(5, vocab + 64, generator=torch.Generator().manual_seed(5)) * 3
    want = torch.log_softmax(raw[:, :vocab].double(), 1)
    for asking in ([0, 1, 2, 3, 4], [1, 3]):
        sampler = Sampler(vocab, compiled=True)
        states = [
            sampler.add_request(SamplingParams(logprobs=3 if r in asking else None, temperature=0))
            for r in range(5)
        ]
        for r, result in enumerate(sampler.sample(raw, states)):
            if r not in asking:
                assert result.logprob is None
                continue
            assert result.logprob == pytest.approx(want[r].max().item(), abs=1e-5)
            torch.testing.assert_close(  # float32 logits, float64 normaliser: see above
                torch.tensor([lp for _, lp in result.top_logprobs], dtype=torch.float64),
                want[r].topk(3).values,
                rtol=0,
                atol=1e-5,
            )


def test_the_compiled_row_passes_are_one_graph_and_a_rows_own() -> None:
    # One graph per pass serves every number of rows (the rows are unbacked), and a row's
    # results are the same bits whatever rows come with it: neither draws nor logprobs move
    # with the batch. Order keys are integer arithmetic: exactly the eager ones.
    from torch._dynamo.utils import counters

    from server.runtime.row_passes import (
        LOG2E,
        compiled_exp2_block_sums,
        compiled_order_keys,
        order_keys,
    )

    g = torch.Generator().manual_seed(6)
    wide = torch.randn(8, 4096 + 64, generator=g) * 3
    wide[0, :8] = torch.tensor([0.0, -0.0, 1.0, 1.0, -1.0, float("-inf"), 2.0**-149, -(2.0**-149)])
    x = wide[:, :4096]
    shift = x.amax(dim=1) * -LOG2E
    ids = torch.randint(0, 1 << 20, (8, 4096), generator=g)
    sums = compiled_exp2_block_sums(x, shift, 64)
    keys = compiled_order_keys(x, torch.arange(4096), 4095)
    candidate_keys = compiled_order_keys(x, ids, (1 << 20) - 1)
    assert torch.equal(keys, order_keys(x, torch.arange(4096), 4095))
    assert torch.equal(candidate_keys, order_keys(x, ids, (1 << 20) - 1))
    graphs = counters["stats"]["unique_graphs"]
    for lo, hi in [(1, 4), (0, 8), (2, 3), (5, 7), (7, 8)]:
        part = slice(lo, hi)
        assert torch.equal(compiled_exp2_block_sums(x[part], shift[part], 64), sums[part])
        assert torch.equal(compiled_order_keys(x[part], torch.arange(4096), 4095), keys[part])
        got = compiled_order_keys(x[part], ids[part], (1 << 20) - 1)
        assert torch.equal(got, candidate_keys[part])
    assert counters["stats"]["unique_graphs"] == graphs
    exact = torch.exp(x.double() + shift.double()[:, None] / LOG2E).view(8, 64, 64).sum(dim=2)
    # Exponents |x log2 e - m log2 e| <= ~45 rounded to float32 (<= 45 x 2^-24 x ln 2, ~1.9e-6
    # relative in the exponential), the exponential's own error (polynomial_exp2, below: < 1.4e-6)
    # and 64-term float32 sums (<= 63 x 2^-24, ~3.8e-6): < 7.1e-6 < 1e-5. (-inf weighs exactly 0.)
    torch.testing.assert_close(sums.double(), exact, rtol=1e-5, atol=0)


def test_the_polynomial_exp2_keeps_its_error_bound_and_flushes_below_its_range() -> None:
    # The compiled normaliser's exponential (row_passes.polynomial_exp2), eager and compiled the
    # way the normaliser compiles it (multiply-adds contracted), on a dense grid of exponents
    # whose results are normal floats, and near the ends and middle of the polynomial's range
    # [-1/2, 1/2]. Bound: the fit's 1.0e-7 relative, plus Horner's rounding, at most 2 x 10
    # roundings of 2^-24 (the terms' magnitudes sum to at most 2^(1/2) / 2^(-1/2) = 2 times the
    # value); the product by 2^n is exact for a normal result: < 1.4e-6 < 2^-19, contracted or
    # not, on any CPU. (A degree-4 polynomial's fit alone is 2.7e-6 off.) Below 2^-126.5: 0.
    from server.runtime.row_passes import _CONTRACTED, polynomial_exp2

    fused = torch.compile(polynomial_exp2, options=_CONTRACTED)
    grid = torch.cat(
        [
            torch.linspace(-125.0, 0.0, 400_001),
            torch.linspace(-0.5, -0.4999, 1000),
            torch.linspace(-1e-4, 1e-4, 1001),
            torch.linspace(0.4999, 0.5, 1000),
        ]
    )
    exact = torch.exp2(grid.double())
    for exp2 in (polynomial_exp2, fused):
        got = exp2(grid).double()
        assert ((got - exact).abs() / exact).max().item() <= 2.0**-19
        assert exp2(torch.zeros(8)).eq(1.0).all()  # the max of a row weighs exactly 1
        edge = exp2(torch.tensor([-127.0, -130.0, -1e30, float("-inf"), float("nan")]))
        assert edge[:4].eq(0.0).all() and edge[4].isnan()


def test_the_compiled_top_k_draw_is_one_graph_and_a_rows_own() -> None:
    # A compiled sampler draws top_k rows through one graph (compiled_per_row): the same tokens
    # as the eager draw, one graph for every number of rows and of candidates (the candidates'
    # count is the batch's largest top_k), and a row's token the same whatever rows come with it.
    from torch._dynamo.utils import counters

    from server.runtime.row_passes import compiled_per_row
    from server.runtime.sampler import _row_params, _top_k_draw

    draw = compiled_per_row("top_k_draw", _top_k_draw)
    sampler = Sampler(4096)
    params = [
        SamplingParams(top_k=64, top_p=0.95),
        SamplingParams(top_k=5, temperature=1.7),
        SamplingParams(top_k=40, top_p=0.5, temperature=0.3),
        SamplingParams(top_k=64, min_p=0.2),
        SamplingParams(top_k=2),
        SamplingParams(top_k=30, top_p=0.9, min_p=0.01, temperature=2.5),
        SamplingParams(top_k=64, top_p=0.99),
        SamplingParams(top_k=3, temperature=0.05),
    ]
    p = _row_params([sampler.add_request(q) for q in params], 4096)
    g = torch.Generator().manual_seed(12)
    graphs = None
    for k in (64, 40, 9):
        vals = torch.sort(torch.randn(8, k, generator=g) * 3, dim=1, descending=True).values
        ids = torch.randperm(4096, generator=g)[: 8 * k].view(8, k)
        for step in range(3):
            lo = torch.randint(0, 2**32, (8,), generator=g)
            hi = torch.randint(0, 2**32, (8,), generator=g)
            tokens = draw(vals, ids, p, lo, hi)
            assert torch.equal(tokens, _top_k_draw(vals, ids, p, lo, hi)), (k, step)
            for lo_row, hi_row in [(0, 1), (3, 8), (2, 5), (7, 8)]:
                part = slice(lo_row, hi_row)
                alone = draw(vals[part], ids[part], p[part], lo[part], hi[part])
                assert torch.equal(alone, tokens[part]), (k, step, part)
        if graphs is None:  # the first count compiles; the others reuse its graph
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_compiled_envelope_draws_are_one_graph_each_and_a_rows_own() -> None:
    # Rows without top_k (temperature, min_p, top_p alone) are drawn under the envelope; a
    # compiled sampler runs each envelope draw as one graph (compiled_per_row, its sizes the
    # sampler's constants): the same tokens and decisions as the eager draw, one graph for any
    # rows of the batch, and a row's results the same whatever rows come with it. The compiled
    # draw always makes min_p's test, which a row without min_p passes: the same tokens.
    from torch._dynamo.utils import counters

    from server.runtime.row_passes import compiled_per_row
    from server.runtime.sampler import _envelope_draw, _nucleus_envelope_draw, _row_params

    vocab, bs = 4096, 64
    sampler = Sampler(vocab)
    params = [
        SamplingParams(temperature=0.8),
        SamplingParams(min_p=0.1),
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.5, temperature=1.5, min_p=0.02),
        SamplingParams(temperature=2.5),
        SamplingParams(top_p=0.99, temperature=0.3),
    ]
    p = _row_params([sampler.add_request(q) for q in params], vocab)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, vocab + 64, generator=g)[:, :vocab] * 2  # sliced, as the model's logits
    x[:, :32] += 20 - 2 * torch.arange(32).log1p()  # an LM-like head (see bench_sampler.py)
    bm = x.reshape(6, vocab // bs, bs).amax(dim=2)
    envelope = compiled_per_row("envelope_draw", _envelope_draw, dynamic_columns=False)
    nucleus = compiled_per_row("nucleus_envelope_draw", _nucleus_envelope_draw, False)
    graphs = None
    for step in range(3):
        lo = torch.randint(0, 2**32, (6,), generator=g)
        hi = torch.randint(0, 2**32, (6,), generator=g)
        sizes = (16, 8, bs)  # exact blocks, proposals, block size
        every = torch.arange(6)
        want = _envelope_draw(x, bm, None, p, lo, hi, *sizes, True)
        assert all(map(torch.equal, envelope(x, bm, every, p, lo, hi, *sizes, True), want))
        assert torch.equal(
            _envelope_draw(x, bm, None, p, lo, hi, *sizes, False)[0][[0, 2]], want[0][[0, 2]]
        )  # rows without min_p: the same tokens
        want_nucleus = _nucleus_envelope_draw(x, bm, None, p, lo, hi, *sizes, 64)
        got = nucleus(x, bm, every, p, lo, hi, *sizes, 64)
        assert all(map(torch.equal, got, want_nucleus)), step
        for part in ([1], [3, 4], [0, 2, 5], [5]):
            rows = torch.tensor(part)
            alone = envelope(x, bm, rows, p, lo, hi, *sizes, True)
            assert all(torch.equal(a, w[rows]) for a, w in zip(alone, want, strict=True))
            alone = nucleus(x, bm, rows, p, lo, hi, *sizes, 64)
            assert all(torch.equal(a, w[rows]) for a, w in zip(alone, want_nucleus, strict=True))
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_compiled_sums_ahead_of_a_pivot_are_one_graph_and_a_rows_own() -> None:
    # A top_p rejection round's one pass (_ahead_sums: block sums of the weights of the tokens
    # ahead of the row's pivot), compiled: one graph for any rows, a row's sums the same bits
    # whatever rows come with it, and the exact sums to float32's rounding of 64-term sums.
    from torch._dynamo.utils import counters

    from server.runtime.row_passes import compiled_per_row
    from server.runtime.sampler import _ahead_sums

    g = torch.Generator().manual_seed(15)
    x = (torch.randn(6, 4096 + 64, generator=g) * 2).round()[:, :4096]  # ties between ids
    w = torch.rand(5, 4096, generator=g)
    pivot = torch.randint(0, 4096, (6, 1), generator=g)
    x_pivot = x.gather(1, pivot)
    rows, live = torch.tensor([5, 0, 2, 3]), torch.tensor([1, 4, 0, 3])
    ahead_sums = compiled_per_row("ahead_sums", _ahead_sums, dynamic_columns=False)
    sums = ahead_sums(x, rows, w, live, x_pivot[rows], pivot[rows], 64)
    graphs = counters["stats"]["unique_graphs"]
    for part in ([0], [1, 3], [3, 2, 0]):
        i = torch.tensor(part)
        got = ahead_sums(x, rows[i], w, live[i], x_pivot[rows[i]], pivot[rows[i]], 64)
        assert torch.equal(got, sums[i])
    assert counters["stats"]["unique_graphs"] == graphs
    ids = torch.arange(4096)
    xs, ws = x[rows].double(), w[live].double()
    keep = (xs > x_pivot[rows]) | ((xs == x_pivot[rows]) & (ids < pivot[rows]))
    exact = (ws * keep).view(4, 64, 64).sum(dim=2)
    # Non-negative terms: a 64-term float32 sum is within 63 x 2^-24 (< 4e-6) of the exact one,
    # relative, whatever order the kernel adds them in.
    torch.testing.assert_close(sums.double(), exact, rtol=4e-6, atol=0)
    eager = _ahead_sums(x, rows, w, live, x_pivot[rows], pivot[rows], 64)
    torch.testing.assert_close(eager.double(), exact, rtol=4e-6, atol=0)
    # The eager sampler's form, into reused buffers: the same passes, the same bits.
    buffered = Sampler(4096)._ahead_sums_eager
    assert torch.equal(buffered(x, rows, w, live, x_pivot[rows], pivot[rows], False), eager)
    assert torch.equal(  # every row of x and of w, in order: no copies
        buffered(x[:5], None, w, None, x_pivot[:5], pivot[:5], True),
        _ahead_sums(x[:5], None, w, None, x_pivot[:5], pivot[:5], 64),
    )


def test_a_compiled_pass_runs_dynamos_code_directly_once_compiled_for_a_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After the first call for a kind of input, a compiled pass (row_passes._Compiled) runs the
    # code dynamo made without dynamo, whatever the number of rows (unbacked); a new kind (here
    # float64 values) goes through dynamo again. Every direct call here is also checked against
    # dynamo's guards (the autouse fixture above).
    from server.runtime.row_passes import compiled_order_keys

    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 4096, generator=g)
    ids = torch.arange(4096)
    first = compiled_order_keys(x, ids, 4095)  # compiled for this kind, or already

    def refused(self, kind, args):
        raise AssertionError("went through dynamo")

    monkeypatch.setattr(_Compiled, "_first", refused)
    for rows in (2, 5, 6):
        assert torch.equal(compiled_order_keys(x[:rows], ids, 4095), first[:rows])
    with pytest.raises(AssertionError, match="through dynamo"):
        compiled_order_keys(x[:3].double(), ids, 4095)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=64, top_p=0.95),
        SamplingParams(top_p=0.9),
        SamplingParams(temperature=1.5),
        SamplingParams(min_p=0.05, temperature=1.2),
        SamplingParams(temperature=0, logprobs=4),
        SamplingParams(
            top_k=40,
            repetition_penalty=1.3,
            frequency_penalty=0.8,
            presence_penalty=0.5,
            logit_bias={7: 4.0, 9: -100.0},
            min_tokens=2,
        ),
        # Greedy with output-count penalties: the first step has nothing to adjust (the
        # compiled greedy pass, which records its tokens for the penalties), later ones do.
        SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
    ],
    ids=[
        "top_k+top_p",
        "top_p",
        "temperature",
        "min_p",
        "greedy+logprobs",
        "penalties",
        "greedy+penalties",
    ],
)
def test_a_compiled_sampler_draws_what_the_eager_one_draws(params: SamplingParams) -> None:
    # The compiled passes change no decision: order keys are the same integers, the penalties'
    # formula is the same float32 arithmetic, and the normaliser only scales reported logprobs.
    # Seeded rows, 4096 ids, a few steps (penalties count the tokens drawn), prompts.
    vocab, rows = 4096, 6
    raw = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(8)) * 4
    results, processed = [], []
    for compiled in (False, True):
        sampler = Sampler(vocab, compiled=compiled)
        states = [sampler.add_request(_with(params, seed=i), [3 * i, 9, 7]) for i in range(rows)]
        results.append([sampler.sample(raw, states) for _ in range(5)])
        processed.append(sampler.processed_logits(raw, states))
    eager, fused = results
    assert torch.equal(processed[0], processed[1])
    assert [[r.token_id for r in step] for step in eager] == [
        [r.token_id for r in step] for step in fused
    ]
    for e, f in zip(eager[0], fused[0], strict=True):
        assert [t for t, _ in e.top_logprobs] == [t for t, _ in f.top_logprobs]
        if e.logprob is not None:  # float32 sums in another order: see the bound above
            assert f.logprob == pytest.approx(e.logprob, abs=1e-5)


def _calls_of(sampler: Sampler, name: str) -> list[torch.Size]:
    """Watch the sampler's one-pass pick `name`: the list returned gets the shape of the logits
    of each call."""
    pick, seen = getattr(sampler, name), []
    setattr(sampler, name, lambda x, *rest: seen.append(x.shape) or pick(x, *rest))
    return seen


def test_a_compiled_greedy_step_is_one_pass_picking_what_the_eager_one_picks() -> None:
    # Every row greedy, none adjusted, none asking for logprobs: the compiled sampler takes the
    # step in one compiled pass (`_greedy_pick`), and picks and fails exactly as the general
    # path: ties inside a block and across blocks to the lowest id, placeholders never, and a
    # row with NaN, +inf or no finite logit fails alone. In float32 and in bfloat16.
    vocab = 4096
    raw = torch.randn(7, vocab + 8, generator=torch.Generator().manual_seed(3)) * 4
    raw[1, :vocab] = 0.0
    raw[1, [900, 71, 70]] = 5.0
    raw[2, [40 * 64 + 3, 5 * 64 + 61, 5 * 64 + 60]] = 50.0
    raw[3, 11] = float("nan")
    raw[4, 5] = float("inf")
    raw[5, :vocab] = float("-inf")
    raw[6, vocab:] = 1e4
    for dtype in (torch.float32, torch.bfloat16):
        outcomes, passes = [], []
        for compiled in (False, True):
            sampler = Sampler(vocab, compiled=compiled)
            if compiled:
                passes = _calls_of(sampler, "_greedy_pick")
            states = [sampler.add_request(SamplingParams(temperature=0)) for _ in range(7)]
            with pytest.raises(SamplingError) as info:
                sampler.sample(raw.to(dtype), states)
            e = info.value
            outcomes.append((e.failures, e.results, [s.num_generated for s in states]))
        assert outcomes[0] == outcomes[1], dtype
        assert passes == [(7, vocab)], dtype
        failures, results, _ = outcomes[1]
        assert sorted(failures) == [3, 4, 5]
        assert [results[i].token_id for i in (1, 2)] == [70, 5 * 64 + 60]
        assert results[6].token_id < vocab


def test_a_compiled_top_k_step_is_one_pass_drawing_what_the_eager_one_draws() -> None:
    # Every row greedy or top_k, none adjusted, none asking for logprobs (the common sampled
    # step): the compiled sampler takes it in one compiled pass (`_top_k_pick`), and draws and
    # fails exactly as the eager general path, step after step (the seeds' streams advance):
    # top_k with top_p, min_p and temperatures, k from 1 to 300, a greedy row whose maximum is
    # -0.0 at one id and +0.0 at a later one (equal: the lower id), placeholders never, NaN and
    # no finite logit failing alone. In float32 and in bfloat16. One graph for every k and
    # batch: after the first steps another k and batch size compile nothing more.
    from torch._dynamo.utils import counters

    vocab = 4096
    raw = torch.randn(9, vocab + 8, generator=torch.Generator().manual_seed(4)) * 4
    raw[1, :vocab] = -1.0
    raw[1, [700, 12]] = torch.tensor([0.0, -0.0])
    raw[6, 11] = float("nan")
    raw[7, :vocab] = float("-inf")
    raw[8, vocab:] = 1e4
    params = [
        SamplingParams(top_k=64, top_p=0.95, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(top_k=5, temperature=0.7, seed=2),
        SamplingParams(top_k=1, seed=3),
        SamplingParams(top_k=300, top_p=0.5, temperature=1.5, seed=4),
        SamplingParams(top_k=64, min_p=0.1, seed=5),
        SamplingParams(top_k=64, seed=6),
        SamplingParams(top_k=8, seed=7),
        SamplingParams(top_k=64, seed=8),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        outcomes, passes = [], []
        for compiled in (False, True):
            sampler = Sampler(vocab, compiled=compiled)
            if compiled:
                passes = _calls_of(sampler, "_top_k_pick")
            states = [sampler.add_request(p) for p in params]
            steps = []
            for _ in range(3):
                with pytest.raises(SamplingError) as info:
                    sampler.sample(raw.to(dtype), states)
                e = info.value
                steps.append((e.failures, e.results, [s.num_generated for s in states]))
            outcomes.append(steps)
        assert outcomes[0] == outcomes[1], dtype
        assert passes == [(9, vocab)] * 3, dtype
        failures, results, _ = outcomes[1][0]
        assert sorted(failures) == [6, 7]
        assert results[1].token_id == 12
        assert results[3].token_id == raw[3, :vocab].to(dtype).argmax().item()  # top_k 1
        assert all(r is None or r.token_id < vocab for r in results)
    graphs = counters["stats"]["unique_graphs"]
    sampler = Sampler(vocab, compiled=True)
    states = [sampler.add_request(SamplingParams(top_k=k, seed=k)) for k in (40, 3)]
    assert all(r.token_id < vocab for r in sampler.sample(raw[2:4], states))
    # A client may send a new top_k every request: neither graphs nor memory grow with them
    # (each size is a view of one buffer per argument).
    for k in range(2, 300, 3):
        sampler.sample(raw[2:3], [sampler.add_request(SamplingParams(top_k=k, seed=k))])
    assert counters["stats"]["unique_graphs"] == graphs
    assert len({t.untyped_storage().data_ptr() for t in sampler._lengths.values()}) <= 2
    # Another vocabulary in the same process (1000 ids: blocks of 8) compiles its own graph, as
    # its sizes are static: the block size is worked out from the vocabulary inside the pass.
    drawn = []
    for compiled in (False, True):
        sampler = Sampler(1000, compiled=compiled)
        states = [sampler.add_request(p) for p in params[:6]]
        drawn.append([r.token_id for r in sampler.sample(raw[:6, :1008], states)])
    assert drawn[0] == drawn[1]


def test_a_compiled_sampled_step_dispatches_few_ops_around_its_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The ops a compiled top_k step dispatches (on an accelerator: kernel launches), counted:
    # the parameters' one upload (the host tensor, its detach, the copy), the slice to the text
    # vocabulary, the pass's library calls (the two top-k selections, the cumulative sum of
    # top_p), the read-back's two. Bound 12: those 9 and a little room. The eager sampler
    # dispatches over a hundred for the same step (the first count below; a compiled one
    # without this pass, about eighty). The counting mode
    # adds a dispatch key dynamo's guards would see (the pass was compiled outside it), so the
    # guards are not checked here; the test above checks them.
    monkeypatch.setattr(_Compiled, "check_guards", False)
    rows = [SamplingParams(top_k=64, top_p=0.95, seed=1), SamplingParams(temperature=0)] * 2
    counts = []
    for compiled in (False, True):
        sampler = Sampler(4096, compiled=compiled)
        states = [sampler.add_request(p) for p in rows]
        logits = torch.randn(4, 4096 + 8, generator=torch.Generator().manual_seed(1))
        sampler.sample(logits, states)  # compiles
        with DispatchedOps() as mode:
            sampler.sample(logits, states)
        counts.append(sum(mode.ops.values()))
    assert counts[1] <= 12 < 50 <= counts[0], counts


def test_logprobs_zero_gives_only_the_chosen_token() -> None:
    raw = rand_row(2)[None]
    r = SAMPLER.sample(raw, [state(logprobs=0, temperature=0)])[0]
    assert r.top_logprobs == ()
    assert r.logprob == pytest.approx(torch.log_softmax(raw[0, :V].double(), 0).max().item())


def test_logprob_ties_list_the_lower_id_first() -> None:
    raw = torch.zeros(1, V)
    raw[0, [20, 4, 11]] = 2.0
    r = SAMPLER.sample(raw, [state(logprobs=4, temperature=0)])[0]
    assert [t for t, _ in r.top_logprobs] == [4, 11, 20, 0]


# ---- errors ------------------------------------------------------------------------------------


def test_impossible_rows_fail_alone() -> None:
    logits = torch.stack([rand_row(i) for i in range(6)])
    logits[1, 3] = float("nan")
    logits[3, :V] = float("-inf")
    # min_tokens with eos ids covering the vocabulary: validation cannot see eos ids, so this
    # is the runtime's to isolate.
    everything = state(min_tokens=1, eos=range(V))
    states = [
        state(seed=0, logprobs=2),
        state(seed=1, top_p=0.5),
        everything,
        state(seed=3, top_k=3, repetition_penalty=1.5),
        state(temperature=0),
        state(seed=5, top_p=0.8, sampler=SAMPLER),
    ]
    with pytest.raises(SamplingError) as info:
        SAMPLER.sample(logits, states)
    err = info.value
    assert err.row_index == 1 and "NaN" in err.message
    assert sorted(err.failures) == [1, 2, 3]
    assert "min_tokens forbids every token" in err.failures[2]
    assert "no finite value" in err.failures[3]
    assert [r is None for r in err.results] == [False, True, True, True, False, False]
    assert err.results[4] == SampleResult(int(logits[4, :V].argmax()), None, ())
    assert [s.num_generated for s in states] == [1, 0, 0, 0, 1, 1]
    # Once min_tokens is reached, the same request samples normally.
    SAMPLER.record([everything], [5])
    assert SAMPLER.sample(logits[:1], [everything])[0].token_id in range(V)


def test_positive_infinity_in_the_logits_is_a_row_failure() -> None:
    logits = rand_row(0)[None].repeat(2, 1)
    logits[0, 4] = float("inf")
    with pytest.raises(SamplingError) as info:
        SAMPLER.sample(logits, [state(), state(temperature=0)])
    assert info.value.failures == {0: "the model's logits contain NaN or +inf"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_at_adjusted_ids_are_row_failures(bad: float) -> None:
    # Adjusting hides what the model wrote at an id (a blocked eos becomes -inf, +inf is
    # clamped to the largest float): the failure must still be seen, on that row only.
    logits = rand_row(0)[None].repeat(4, 1)
    logits[0, EOS] = bad  # blocked by min_tokens
    logits[1, 7] = bad  # biased
    logits[2, 3] = bad  # in the prompt, under a repetition penalty
    states = [
        state(min_tokens=2, seed=0),
        state(logit_bias={7: -1.0}, seed=1),
        state([3], repetition_penalty=1.3, seed=2),
        state(min_tokens=2, logit_bias={7: 1.0}, seed=3),
    ]
    with pytest.raises(SamplingError) as info:
        SAMPLER.sample(logits, states)
    assert sorted(info.value.failures) == [0, 1, 2]
    assert info.value.results[3] is not None


def test_adjusting_in_place_leaves_the_callers_logits_as_they_were() -> None:
    # Penalties, bias and min_tokens are applied to the float32 logits in place and undone
    # before `sample` returns, also when a row fails and `sample` raises.
    logits = torch.stack([rand_row(i) for i in range(3)])
    states = [
        state([3, 4, 5], repetition_penalty=1.5, presence_penalty=0.7, seed=0, logprobs=2),
        state(min_tokens=3, logit_bias={9: 5.0, 10: -5.0}, seed=1, temperature=0.7),
        state([6], frequency_penalty=1.0, logit_bias={2: 3.0}, temperature=0),
    ]
    for _ in range(3):
        before = logits.clone()
        SAMPLER.sample(logits, states)
        assert torch.equal(logits, before)
    logits[2, 11] = float("nan")
    before = logits.clone()
    with pytest.raises(SamplingError):
        SAMPLER.sample(logits, states)
    assert ((logits == before) | (logits.isnan() & before.isnan())).all()


def test_caller_errors() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        SAMPLER.sample(torch.zeros(2, V), [state()])
    with pytest.raises(ValueError, match="fewer than the text vocabulary"):
        SAMPLER.sample(torch.zeros(1, V - 1), [state()])
    with pytest.raises(SamplingParamsError) as info:
        state(top_p=0.0)
    assert info.value.param == "top_p"
    assert SAMPLER.sample(torch.zeros(0, V), []) == []


# ---- seeds -------------------------------------------------------------------------------------

TARGET = SamplingParams(
    max_tokens=50, temperature=0.9, top_p=0.95, top_k=20, presence_penalty=0.4, seed=1234
)
NEIGHBOURS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, seed=7),
    SamplingParams(top_k=3),
    SamplingParams(min_p=0.2, logprobs=4),
    SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, seed=1234),
    SamplingParams(temperature=0.7, top_p=0.5, logit_bias={3: 5.0}),
    SamplingParams(min_tokens=10, stop_token_ids=(2,), seed=99),
    SamplingParams(temperature=2.0),
]


def model_logits(history: Sequence[int], width: int) -> torch.Tensor:
    """A stand-in model: the next logits depend only on the sequence so far."""
    g = torch.Generator().manual_seed(hash(tuple(history[-4:])) % 2**31 + len(history))
    return torch.randn(width, generator=g) * 2


def run(
    params: Sequence[SamplingParams], steps: int = 50, sampler: Sampler = SAMPLER
) -> list[list[int]]:
    """Decode `steps` tokens for every row in one batch; each row is its own request.

    A row's prompt depends on its params (not its position), so the same request gets the same
    logits wherever it sits.
    """
    width = sampler.text_vocab_size + PLACEHOLDERS
    prompts = [[2, 5 + (p.seed or 0) % 20, 20] for p in params]
    states = [sampler.add_request(p, pr) for p, pr in zip(params, prompts, strict=True)]
    out: list[list[int]] = [[] for _ in params]
    for _ in range(steps):
        logits = torch.stack(
            [model_logits(pr + o, width) for pr, o in zip(prompts, out, strict=True)]
        )
        for o, r in zip(out, sampler.sample(logits, states), strict=True):
            o.append(r.token_id)
    for s in states:
        sampler.release(s)
    return out


def run_at(position: int, neighbours: Sequence[SamplingParams], target=TARGET, **kw) -> list[int]:
    params = list(neighbours)
    params.insert(position, target)
    return run(params, **kw)[position]


def test_seeded_request_is_independent_of_batch_and_row_position() -> None:
    alone = run_at(0, [])
    assert len(alone) == 50 and len(set(alone)) > 5
    assert run_at(0, NEIGHBOURS) == alone
    assert run_at(4, NEIGHBOURS) == alone
    assert run_at(8, NEIGHBOURS[::-1]) == alone
    assert run_at(2, NEIGHBOURS[:3]) == alone


# 4096 ids (64 blocks): greedy, top-k and whole-vocabulary rows go through block maxima, block
# sums and the block race; the nucleus candidates (4) leave top_p rows to the rejection path.
WIDE = Sampler(4096, eos_ids=[EOS], nucleus_candidates=4)
WIDE_TARGETS = [
    TARGET,
    SamplingParams(max_tokens=50, temperature=1.1, seed=5),
    SamplingParams(max_tokens=50, top_p=0.6, seed=6, frequency_penalty=0.5),
    SamplingParams(max_tokens=50, min_p=0.05, temperature=0.9, seed=8, logprobs=3),
]


@pytest.mark.parametrize("target", WIDE_TARGETS, ids=["top_k", "full", "nucleus", "min_p"])
def test_seeded_invariance_on_a_wide_vocabulary(target: SamplingParams) -> None:
    alone = run_at(0, [], target, steps=30, sampler=WIDE)
    assert len(set(alone)) > 5
    assert run_at(5, NEIGHBOURS, target, steps=30, sampler=WIDE) == alone
    assert run_at(1, NEIGHBOURS[::-1][:4], target, steps=30, sampler=WIDE) == alone


def test_seeded_tokens_do_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_at(3, NEIGHBOURS, WIDE_TARGETS[1], steps=20, sampler=WIDE)
        torch.set_num_threads(2)
        two = run_at(6, NEIGHBOURS, WIDE_TARGETS[1], steps=20, sampler=WIDE)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_different_seeds_differ_and_unseeded_requests_differ() -> None:
    seeds = [_with(TARGET, seed=s) for s in (1, 2, 3, 2**64 - 1, -(2**63))]
    rows = run(seeds)
    assert len({tuple(r) for r in rows}) == len(rows)
    unseeded = [_with(TARGET, seed=None)] * 4
    first, second = run(unseeded), run(unseeded)
    assert len({tuple(r) for r in first + second}) == 8


def test_same_seed_same_params_same_tokens_in_one_batch() -> None:
    rows = run([TARGET] * 3)
    assert rows[0] == rows[1] == rows[2]


def test_greedy_rows_consume_no_randomness() -> None:
    # A greedy request never draws, so its seed is irrelevant (both rows get the same prompt).
    rows = run([SamplingParams(temperature=0, seed=5), SamplingParams(temperature=0, seed=25)])
    assert rows[0] == rows[1]


def test_top_logprobs_of_some_top_k_rows() -> None:
    # The top_k rows' candidates serve the rows among them that ask for logprobs (here not the
    # first): each row gets its own row's top logprobs.
    sampler = Sampler(4096)
    raw = torch.randn(3, 4096, generator=torch.Generator().manual_seed(9)) * 3
    asks = [None, 5, 2]
    states = [sampler.add_request(SamplingParams(logprobs=n, top_k=8, seed=1)) for n in asks]
    for row, r in enumerate(sampler.sample(raw, states)):
        want = torch.log_softmax(raw[row].double(), 0)
        assert len(r.top_logprobs) == (asks[row] or 0)
        if asks[row]:
            assert [t for t, _ in r.top_logprobs] == want.topk(asks[row]).indices.tolist()
            got = torch.tensor([lp for _, lp in r.top_logprobs], dtype=torch.float64)
            # float32 logits, float64 normaliser: see above
            torch.testing.assert_close(got, want.topk(asks[row]).values, rtol=0, atol=1e-5)


# ---- one batched pass ------------------------------------------------------------------------


MIX = [
    SamplingParams(temperature=0),
    SamplingParams(top_k=64, top_p=0.95, seed=1),
    SamplingParams(temperature=0.8, seed=2),
    SamplingParams(min_p=0.05, seed=3),
    SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, logit_bias={7: 2.0}, seed=4),
    SamplingParams(logprobs=5, seed=5, top_k=10),
]


def _step_ops(
    copies: int, mix: Sequence[SamplingParams], scale: float = 1.0
) -> tuple[Counter[str], int]:
    sampler = Sampler(4096)
    states = [sampler.add_request(p, [3, 4, 5]) for _ in range(copies) for p in mix]
    one = torch.randn(len(mix), 4096, generator=torch.Generator().manual_seed(0)) * scale
    logits = one.repeat(copies, 1)
    sampler.sample(logits, states)  # a first step, so penalty rows have history
    tolist = torch.Tensor.tolist
    calls = 0

    def counted(self):
        nonlocal calls
        calls += 1
        return tolist(self)

    torch.Tensor.tolist = counted  # type: ignore[method-assign]
    try:
        with DispatchedOps() as mode:
            sampler.sample(logits, states)
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    return mode.ops, calls


def test_a_step_is_one_batched_pass_with_one_read_back() -> None:
    # (Two copies at least: torch indexes a one-element index through extra views.)
    small, calls_small = _step_ops(2, MIX)
    large, calls_large = _step_ops(8, MIX)
    # The same kernels, as many times, for 12 rows as for 48: no per-row loop issues ops.
    assert small == large
    # One read back (the packed results), and no op that makes the host wait for a value.
    assert calls_small == calls_large == 1
    syncing = {"aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero"}
    assert not syncing & set(small)


def test_top_p_without_top_k_settled_by_the_envelope_adds_no_read() -> None:
    # 4096 ids are 64 blocks, all in the envelope's exact part: the total is known exactly,
    # so every top_p proposal is surely in or surely out, decided before the one read-back.
    mix = [*MIX, SamplingParams(top_p=0.9, seed=9)]
    small, calls_small = _step_ops(2, mix, scale=8.0)
    large, calls_large = _step_ops(8, mix, scale=8.0)
    assert small == large
    assert calls_small == calls_large == 1
    assert not {"aten._local_scalar_dense", "aten.nonzero"} & set(small)


def test_sampler_state_is_a_plain_record() -> None:
    s = state(seed=-1)
    assert isinstance(s, SamplerState) and s.seed == 2**64 - 1 and s.num_generated == 0
