"""KV block bookkeeping, without torch: booking per kept layer, sliding windows, prefix cache."""

from __future__ import annotations

from tests.unit.engine_fixtures import blocks, request, small_text, subnet

TEXT = small_text()  # 35 layers, KV owned by 0..19 (16 sliding, window 32; 4 full), 8-token blocks


def test_books_only_the_kv_layers_a_subnet_keeps():
    bm = blocks(TEXT, 1000)
    full = request(subnet(TEXT), list(range(20)))
    skips_early = request(subnet(TEXT, "skip", skip=(3, 7, 22)), list(range(20)))
    for r in (full, skips_early):
        bm.admit(r)
        assert bm.allocate(r, 20)
    assert bm.num_held(full.request_id) == 20 * 3  # 20 KV layers x ceil(20/8) blocks
    assert bm.num_held(skips_early.request_id) == 18 * 3  # layers 3 and 7 own nothing; 22 none
    assert bm.block_table(skips_early.request_id)[3] == []
    assert bm.num_free_blocks == 1000 - 60 - 54


def test_consumer_layers_never_book():
    bm = blocks(TEXT, 1000)
    r = request(subnet(TEXT, "e2b", skip=(20, 21, 22, 23, 24)), list(range(9)))
    bm.admit(r)
    assert bm.allocate(r, 9)
    assert len(bm.block_table(r.request_id)) == 20
    assert bm.num_held(r.request_id) == 20 * 2


def test_sliding_layers_release_blocks_outside_the_window():
    bm = blocks(TEXT, 2000, cache=False)
    r = request(subnet(TEXT), list(range(200)), max_tokens=1)
    bm.admit(r)
    assert bm.allocate(r, 200)
    r.num_computed_tokens = 200
    bm.commit(r)
    assert bm.allocate(r, 1)  # position 200 sees keys from 169: blocks 21.. (168..) kept
    table = bm.block_table(r.request_id)
    sliding = [i for i in range(20) if TEXT.is_sliding(i)]
    full = [i for i in range(20) if not TEXT.is_sliding(i)]
    for layer in sliding:
        held = [b for b in table[layer] if b >= 0]
        assert len(held) == 26 - 21  # blocks 21..25
        assert all(b < 0 for b in table[layer][:21])
    for layer in full:
        assert all(b >= 0 for b in table[layer]) and len(table[layer]) == 26
    assert bm.num_free_blocks == 2000 - (16 * 5 + 4 * 26)


def test_allocation_is_all_or_nothing():
    bm = blocks(TEXT, 50)
    r = request(subnet(TEXT), list(range(30)))
    bm.admit(r)
    assert not bm.allocate(r, 30)  # needs 20 x 4 = 80 blocks
    assert bm.num_free_blocks == 50 and bm.num_held(r.request_id) == 0
    assert bm.allocate(r, 16)  # 20 x 2 = 40
    assert bm.num_free_blocks == 10


def test_free_returns_every_block():
    bm = blocks(TEXT, 500)
    reqs = [request(subnet(TEXT), list(range(n))) for n in (5, 17, 40)]
    for r in reqs:
        bm.admit(r)
        assert bm.allocate(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
        bm.commit(r)
    for r in reqs:
        bm.free(r)
    assert bm.num_free_blocks == 500
    assert all(c == 0 for c in bm.ref_count)


def _run_prompt(bm, r):
    bm.admit(r)
    assert bm.allocate(r, r.num_tokens - r.num_computed_tokens)
    r.num_computed_tokens = r.num_tokens
    bm.commit(r)


def test_prefix_cache_reuses_full_blocks_within_a_kv_layout_only():
    bm = blocks(TEXT, 2000)
    prompt = list(range(100, 140))  # 40 tokens: 4 full blocks may be reused (never the last token)
    a = request(subnet(TEXT), prompt)
    _run_prompt(bm, a)
    bm.free(a)
    same_layout = subnet(TEXT, "late-skip", skip=(30, 31))  # consumers only: same KV layout
    assert same_layout.kv_key == subnet(TEXT).kv_key
    b = request(same_layout, prompt)
    assert bm.admit(b) == 32 and bm.prefix_hits == 32
    other_layout = subnet(TEXT, "narrow", width=128)
    c = request(other_layout, prompt)
    assert bm.admit(c) == 0
    # the reused blocks are the very blocks `a` wrote
    assert bm.block_table(b.request_id)[19][:4] == [
        bm.block_table(b.request_id)[19][i] for i in range(4)
    ]
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 2000


def test_prefix_cache_hit_is_token_exact_and_chained():
    bm = blocks(TEXT, 2000)
    a = request(subnet(TEXT), list(range(100, 140)))
    _run_prompt(bm, a)
    changed = list(range(100, 140))
    changed[20] = 7  # differs in block 2: blocks 0 and 1 still match
    b = request(subnet(TEXT), changed)
    assert bm.admit(b) == 16


def test_cached_blocks_are_evicted_when_space_is_needed():
    bm = blocks(TEXT, 100)
    a = request(subnet(TEXT), list(range(100, 124)))  # 3 blocks x 20 layers = 60
    _run_prompt(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 100  # cached blocks count as free
    big = request(subnet(TEXT), list(range(500, 540)))
    bm.admit(big)
    assert bm.allocate(big, 40)  # 100 blocks: evicts the cache
    bm.free(big)
    again = request(subnet(TEXT), list(range(100, 124)))
    assert bm.admit(again) == 0  # evicted


def _call(prompt: list[int]):
    from server.fleet.engine_call import EngineCall
    from server.vocabulary.sampling_params import SamplingParams

    return EngineCall("x", tuple(prompt), None, SamplingParams(max_tokens=1))


def test_cached_landmarks_are_what_a_router_computes_for_the_prompt():
    """A replica reports the landmarks of its prefix cache; the router hashes a prompt the
    same way (server/fleet/engine_call.py), so a prompt whose prefix is cached finds exactly
    the landmarks of the blocks `admit` would reuse, and only in the same KV class."""
    bm = blocks(TEXT, 2000)
    prompt = list(range(100, 141))  # 41 tokens: 5 full blocks of 8; all 5 may be reused
    _run_prompt(bm, request(subnet(TEXT), prompt))
    kv = subnet(TEXT).kv_key
    cached = set(bm.cached_landmarks(100))
    assert len(cached) == 3  # blocks 0, 1 and 3: prefixes of 1, 2 and 4 blocks
    assert _call(prompt).landmarks(kv, 8) == list(bm.cached_landmarks(100))
    longer = _call(prompt + list(range(500, 600)))  # 17 usable blocks: depths 1, 2, 4, 8, 16
    marks = longer.landmarks(kv, 8)
    assert len(marks) == 5 and set(marks[:3]) == cached and not set(marks[3:]) & cached
    assert bm.admit(request(subnet(TEXT), prompt + list(range(500, 600)))) == 40
    other = subnet(TEXT, "narrow", width=128).kv_key
    assert not set(_call(prompt).landmarks(other, 8)) & cached
    changed = list(prompt)
    changed[0] = 7  # the first block differs: no prefix in common
    assert not set(_call(changed).landmarks(kv, 8)) & cached


def test_landmarks_leave_with_their_blocks_and_recent_ones_are_reported_last():
    bm = blocks(TEXT, 100)
    a = request(subnet(TEXT), list(range(100, 124)))  # 3 blocks x 20 layers = 60 of 100
    _run_prompt(bm, a)
    bm.free(a)
    b = request(subnet(TEXT), list(range(300, 310)))  # 1 block
    _run_prompt(bm, b)
    bm.free(b)
    marks_a = _call(list(range(100, 124))).landmarks(subnet(TEXT).kv_key, 8)
    (mark_b,) = _call(list(range(300, 310))).landmarks(subnet(TEXT).kv_key, 8)
    assert bm.cached_landmarks(10) == (*marks_a, mark_b)
    again = request(subnet(TEXT), list(range(100, 124)))
    assert bm.admit(again) == 16  # reused: reported as the most recent
    assert bm.cached_landmarks(10) == (mark_b, *marks_a)
    assert bm.cached_landmarks(1) == (marks_a[-1],) and bm.cached_landmarks(0) == ()
    bm.free(again)
    big = request(subnet(TEXT), list(range(500, 540)))
    bm.admit(big)
    assert bm.allocate(big, 40)  # 100 blocks: evicts every cached entry
    assert bm.cached_landmarks(10) == ()
