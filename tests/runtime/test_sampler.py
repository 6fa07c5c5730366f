"""The sampler on synthetic logits: each processing step, its order, errors and seed determinism.

No model: rows are made-up logits over a small text vocabulary plus a few placeholder ids.
Statistical checks use fixed seeds, so they are deterministic, not flaky.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from server.runtime.sampler import Sampler, SamplerState, SamplingError
from server.vocabulary.sampling_params import SamplingParams, SamplingParamsError
from server.vocabulary.step import SampleResult

V = 32  # text vocabulary
PLACEHOLDERS = 8  # ids V .. V+7: vision/audio, never sampled
EOS = 1
SAMPLER = Sampler(V)


def state(prompt: Sequence[int] = (), eos: Sequence[int] = (EOS,), **params) -> SamplerState:
    return SamplerState(SamplingParams(**params), prompt, V, eos)


def row(probs: Sequence[float], fill: float = -30.0) -> torch.Tensor:
    """Logits whose softmax over the first len(probs) ids is `probs`; others near zero mass."""
    out = torch.full((V + PLACEHOLDERS,), fill)
    out[: len(probs)] = torch.tensor(probs).log()
    return out


def rand_row(seed: int) -> torch.Tensor:
    return torch.randn(V + PLACEHOLDERS, generator=torch.Generator().manual_seed(seed)) * 3


def draw_counts(logits_row: torch.Tensor, n: int, **params) -> Counter[int]:
    """One step for n requests with seeds 0..n-1 on the same logits: n independent draws."""
    states = [state(seed=i, **params) for i in range(n)]
    results = SAMPLER.sample(logits_row.expand(n, -1).contiguous(), states)
    return Counter(r.token_id for r in results)


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


def test_placeholder_ids_are_never_sampled() -> None:
    logits = rand_row(0)
    logits[V:] = 1e4  # far above every text logit
    assert SAMPLER.sample(logits[None], [state(temperature=0)])[0].token_id < V
    counts = draw_counts(logits, 2000, temperature=5.0)
    assert max(counts) < V
    r = SAMPLER.sample(logits[None], [state(temperature=0, logprobs=3)])[0]
    assert all(t < V for t, _ in r.top_logprobs)
    assert r.logprob == pytest.approx(torch.log_softmax(logits[:V], 0)[r.token_id].item())


def test_bfloat16_logits_and_extra_width_accepted() -> None:
    logits = rand_row(3)[None].to(torch.bfloat16)
    r = SAMPLER.sample(logits, [state(temperature=0)])[0]
    assert r.token_id == int(logits[0, :V].float().argmax())


# ---- temperature, top-k, top-p, min-p ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_expected_frequencies(temperature: float) -> None:
    probs = [0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02]
    logits = row(probs)
    n = 4000
    counts = draw_counts(logits, n, temperature=temperature)
    expected = torch.softmax(logits[:V] / temperature, 0)
    # Pearson chi-square over the 7 named ids plus "all others" (df = 7): the 0.001 critical
    # value is 24.3. Seeds are fixed, so this either always passes or always fails.
    bins = [*range(len(probs)), None]
    chi2 = 0.0
    for b in bins:
        e = n * (expected[len(probs) :].sum().item() if b is None else expected[b].item())
        o = sum(c for t, c in counts.items() if t >= len(probs)) if b is None else counts[b]
        if e > 0:
            chi2 += (o - e) ** 2 / max(e, 1.0)
    assert chi2 < 24.3, (chi2, counts)
    # And the distribution the sampler reports is exactly softmax(logits / T).
    p = SAMPLER.probabilities(logits[None], [state(temperature=temperature)])[0]
    torch.testing.assert_close(p, expected)


def test_top_k_1_equals_greedy() -> None:
    logits = torch.stack([rand_row(i) for i in range(64)])
    greedy = SAMPLER.sample(logits, [state(temperature=0) for _ in range(64)])
    top1 = SAMPLER.sample(logits, [state(top_k=1, temperature=1.5, seed=i) for i in range(64)])
    assert [r.token_id for r in top1] == [r.token_id for r in greedy]


def test_top_k_keeps_exactly_k_ties_to_lower_ids() -> None:
    flat = torch.zeros(1, V + PLACEHOLDERS)
    p = SAMPLER.probabilities(flat, [state(top_k=3)])[0]
    assert p.nonzero().flatten().tolist() == [0, 1, 2]
    assert set(draw_counts(flat[0], 1000, top_k=3)) == {0, 1, 2}
    counts = draw_counts(row([0.4, 0.3, 0.2, 0.1]), 2000, top_k=2)
    assert set(counts) == {0, 1}
    assert counts[0] / counts[1] == pytest.approx(4 / 3, rel=0.15)


PROBS = [0.4, 0.3, 0.15, 0.1, 0.02, 0.01, 0.01, 0.01]


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.05, [0]), (0.5, [0, 1]), (0.75, [0, 1, 2]), (0.9, [0, 1, 2, 3])]
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, kept: list[int]) -> None:
    logits = row(PROBS, fill=float("-inf"))
    p = SAMPLER.probabilities(logits[None], [state(top_p=top_p)])[0]
    assert p.nonzero().flatten().tolist() == kept
    mass = sum(PROBS[i] for i in kept)
    torch.testing.assert_close(p[kept], torch.tensor([PROBS[i] / mass for i in kept]))
    counts = draw_counts(logits, 2000, top_p=top_p)
    assert sorted(counts) == kept  # the excluded ids are never drawn; every kept one is


def test_top_p_applies_after_temperature_and_top_k() -> None:
    logits = row(PROBS, fill=float("-inf"))
    # At T = 0.5 the top token alone holds 0.4^2 / sum(p^2) = 0.56 of the mass.
    p = SAMPLER.probabilities(logits[None], [state(temperature=0.5, top_p=0.55)])[0]
    assert p.nonzero().flatten().tolist() == [0]
    # After top_k=2 renormalises, id 0 holds 0.4/0.7 = 0.571 >= 0.56: only id 0 is left.
    p = SAMPLER.probabilities(logits[None], [state(top_k=2, top_p=0.56)])[0]
    assert p.nonzero().flatten().tolist() == [0]


@pytest.mark.parametrize(
    ("min_p", "temperature", "kept"),
    [(0.3, 1.0, [0, 1, 2]), (0.5, 1.0, [0, 1]), (1.0, 1.0, [0]), (0.3, 0.5, [0, 1])],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(
    min_p: float, temperature: float, kept: list[int]
) -> None:
    logits = row(PROBS, fill=float("-inf"))
    params = {"min_p": min_p, "temperature": temperature}
    p = SAMPLER.probabilities(logits[None], [state(**params)])[0]
    assert p.nonzero().flatten().tolist() == kept
    tempered = torch.tensor(PROBS) ** (1 / temperature)
    assert all(tempered[i] >= min_p * tempered[0] for i in kept)
    assert sorted(draw_counts(logits, 2000, **params)) == kept


def test_filters_always_keep_the_top_token() -> None:
    logits = torch.stack([rand_row(i) for i in range(50)])
    states = [state(top_p=1e-6, top_k=5, min_p=1.0, temperature=3.0, seed=i) for i in range(50)]
    results = SAMPLER.sample(logits, states)
    assert [r.token_id for r in results] == logits[:, :V].argmax(1).tolist()


def test_tiny_temperature_is_finite_and_picks_the_top() -> None:
    logits = torch.stack([rand_row(i) for i in range(20)])
    results = SAMPLER.sample(logits, [state(temperature=1e-8, seed=i) for i in range(20)])
    assert [r.token_id for r in results] == logits[:, :V].argmax(1).tolist()


# ---- logit_bias, penalties, min_tokens ---------------------------------------------------------


def test_logit_bias_forces_and_forbids() -> None:
    logits = torch.stack([rand_row(i) for i in range(200)])
    forced = SAMPLER.sample(logits, [state(logit_bias={9: 100.0}, seed=i) for i in range(200)])
    assert {r.token_id for r in forced} == {9}
    top = int(logits[0, :V].argmax())
    second = int(logits[0, :V].topk(2).indices[1])
    greedy = SAMPLER.sample(logits[:1], [state(temperature=0, logit_bias={top: -100.0})])
    assert greedy[0].token_id == second
    counts = draw_counts(logits[0], 2000, temperature=2.0, logit_bias={top: -100.0})
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
        s.record(t)
    assert s.num_generated == 4
    got = SAMPLER.processed_logits(raw[None], [s])[0]
    want = raw[:V].clone()
    want[0] -= 0.5  # bias only
    want[6] += 1.5  # bias only
    want[3] = 3.0 / 2  # in the prompt only: repetition, but no frequency/presence
    want[4] = -2.0 * 2 - (0.5 * 1 + 0.25)  # negative: multiplied; then output count 1
    want[5] = 2.0 / 2 - (0.5 * 3 + 0.25)  # output only: repetition, then count 3
    torch.testing.assert_close(got, want)


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
    for t in (2, 2):
        a.record(t)
        b.record(t)
        c.record(t)
    got = SAMPLER.processed_logits(raw, [a, b, c])
    assert got[0].nonzero().flatten().tolist() == [2] and got[0, 2].item() == -1.0
    assert not got[1].any()
    assert got[2].nonzero().flatten().tolist() == [2] and got[2, 2].item() == 2.0


def test_recording_a_placeholder_counts_only_towards_min_tokens() -> None:
    s = state(min_tokens=2, repetition_penalty=2.0, presence_penalty=1.0)
    s.record(V + 3)
    s.record(4)
    assert s.num_generated == 2
    got = SAMPLER.processed_logits(torch.ones(1, V + PLACEHOLDERS), [s])[0]
    assert got.tolist() == [1.0] * 4 + [0.5 - 1.0] + [1.0] * (V - 5)


def test_tiny_repetition_penalty_stays_finite() -> None:
    raw = torch.full((1, V), 1.0)
    s = state(prompt=[4], repetition_penalty=1e-45, seed=0)
    assert torch.isfinite(SAMPLER.processed_logits(raw, [s])).all()
    assert SAMPLER.sample(raw, [s])[0].token_id == 4


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
        s.record(tokens[-1])
    assert tokens == [5, 5, 5, EOS]
    sampled = state(min_tokens=1, stop_token_ids=(7,), seed=1)
    raw2 = torch.full((1, V), -5.0)
    raw2[0, EOS] = raw2[0, 7] = 20.0
    assert SAMPLER.sample(raw2, [sampled])[0].token_id not in (EOS, 7)


# ---- logprobs ----------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits() -> None:
    raw = rand_row(11)[None]
    want = torch.log_softmax(raw[0, :V], 0)
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
        assert r.logprob == pytest.approx(want[r.token_id].item(), abs=1e-6)
        assert [t for t, _ in r.top_logprobs] == want.topk(5).indices.tolist()
        lps = [lp for _, lp in r.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        torch.testing.assert_close(torch.tensor(lps), want.topk(5).values)


def test_logprobs_zero_gives_only_the_chosen_token() -> None:
    raw = rand_row(2)[None]
    r = SAMPLER.sample(raw, [state(logprobs=0, temperature=0)])[0]
    assert r.top_logprobs == ()
    assert r.logprob == pytest.approx(torch.log_softmax(raw[0, :V], 0).max().item())


# ---- errors ------------------------------------------------------------------------------------


def test_impossible_rows_fail_alone() -> None:
    logits = torch.stack([rand_row(i) for i in range(5)])
    logits[1, 3] = float("nan")
    logits[3, :V] = float("-inf")
    everything = state(min_tokens=1, stop_token_ids=tuple(range(V)))
    states = [state(seed=0), state(seed=1), everything, state(seed=3), state(temperature=0)]
    with pytest.raises(SamplingError) as info:
        SAMPLER.sample(logits, states)
    err = info.value
    assert err.row_index == 1 and "NaN" in err.message
    assert sorted(err.failures) == [1, 2, 3]
    assert "min_tokens forbids every token" in err.failures[2]
    assert "no finite value" in err.failures[3]
    assert [r is None for r in err.results] == [False, True, True, True, False]
    assert err.results[4] == SampleResult(int(logits[4, :V].argmax()), None, ())
    # Once min_tokens is reached, the same request samples normally.
    everything.record(5)
    assert SAMPLER.sample(logits[:1], [everything])[0].token_id in (range(V))


def test_positive_infinity_in_the_logits_is_a_row_failure() -> None:
    logits = rand_row(0)[None].repeat(2, 1)
    logits[0, 4] = float("inf")
    with pytest.raises(SamplingError) as info:
        SAMPLER.sample(logits, [state(), state(temperature=0)])
    assert info.value.failures == {0: "the model's logits contain NaN or +inf"}


def test_caller_errors() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        SAMPLER.sample(torch.zeros(2, V), [state()])
    with pytest.raises(ValueError, match="fewer than the text vocabulary"):
        SAMPLER.sample(torch.zeros(1, V - 1), [state()])
    with pytest.raises(ValueError, match="another vocabulary"):
        SAMPLER.sample(torch.zeros(1, 2 * V), [SamplerState(SamplingParams(), [], 2 * V, [])])
    with pytest.raises(SamplingParamsError) as info:
        state(top_p=0.0)
    assert info.value.param == "top_p"


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


def model_logits(history: Sequence[int]) -> torch.Tensor:
    """A stand-in model: the next logits depend only on the sequence so far."""
    g = torch.Generator().manual_seed(hash(tuple(history[-4:])) % 2**31 + len(history))
    return torch.randn(V + PLACEHOLDERS, generator=g) * 2


def run(params: Sequence[SamplingParams], steps: int = 50) -> list[list[int]]:
    """Decode `steps` tokens for every row in one batch; each row is its own request.

    A row's prompt depends on its params (not its position), so the same request gets the same
    logits wherever it sits.
    """
    prompts = [[2, 5 + (p.seed or 0) % 20, 20] for p in params]
    states = [SamplerState(p, pr, V, [EOS]) for p, pr in zip(params, prompts, strict=True)]
    out: list[list[int]] = [[] for _ in params]
    for _ in range(steps):
        logits = torch.stack([model_logits(pr + o) for pr, o in zip(prompts, out, strict=True)])
        for s, o, r in zip(states, out, SAMPLER.sample(logits, states), strict=True):
            s.record(r.token_id)
            o.append(r.token_id)
    return out


def test_seeded_request_is_independent_of_batch_and_row_position() -> None:
    def run_at(position: int, neighbours: Sequence[SamplingParams]) -> list[int]:
        params = list(neighbours)
        params.insert(position, TARGET)
        return run(params)[position]

    alone = run_at(0, [])
    assert len(alone) == 50 and len(set(alone)) > 5
    assert run_at(0, NEIGHBOURS) == alone
    assert run_at(4, NEIGHBOURS) == alone
    assert run_at(8, NEIGHBOURS[::-1]) == alone
    assert run_at(2, NEIGHBOURS[:3]) == alone


def test_different_seeds_differ_and_unseeded_requests_differ() -> None:
    seeds = [dataclasses.replace(TARGET, seed=s) for s in (1, 2, 3, 2**64 - 1, -(2**63))]
    rows = run(seeds)
    assert len({tuple(r) for r in rows}) == len(rows)
    unseeded = [dataclasses.replace(TARGET, seed=None)] * 4
    first, second = run(unseeded), run(unseeded)
    assert len({tuple(r) for r in first + second}) == 8


def test_same_seed_same_params_same_tokens_in_one_batch() -> None:
    rows = run([TARGET] * 3)
    assert rows[0] == rows[1] == rows[2]


def test_greedy_rows_consume_no_randomness() -> None:
    # A greedy request never draws, so its seed is irrelevant (both rows get the same prompt).
    rows = run([SamplingParams(temperature=0, seed=5), SamplingParams(temperature=0, seed=25)])
    assert rows[0] == rows[1]
