"""An engine replica's own answers, without Ray: a real `Service` on the tiny model inside an
`EngineReplica` (what Serve would construct), driven through `generate`.

Proves: a request that can never run on the replica (too large for its KV pool, which the
ingress cannot see) comes back as a refusal, which the API turns into the client's 400 in
OpenAI's envelope, not a 500; and the report the router reads carries the prefix cache's
landmarks, each subnet's KV class and the block size, as the router computes them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.fleet.engine_call import EngineCall
from server.vocabulary.sampling_params import SamplingParams

BLOCK_SIZE = 16


async def _replica(tiny_dir: Path, kv_blocks: int = 96):
    from server.api.service import Service
    from server.config import ServerConfig
    from server.fleet.engine_replica import EngineReplica
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV

    class Replica(EngineReplica):
        def __del__(self) -> None:  # the service is stopped by the test, not by Serve
            pass

    replica = object.__new__(Replica)  # its Ray-facing constructor posts to the board
    # Blocks of one layer's 16 positions (2 KiB on the tiny model). With 96, a 304-token request
    # (4 x 19 full-attention blocks, 16 x 11 sliding ones in its 128-token prefill chunks: 252)
    # fits the 512-token context but never the pool.
    config = ServerConfig(
        checkpoint=str(tiny_dir),
        kv_cache_bytes=kv_blocks * 2048,
        block_size=BLOCK_SIZE,
        max_model_len=512,
        max_num_seqs=2,
        custom_subnets=None,
        subnet_table=str(DEFAULT_TABLE_CSV),
        open=True,  # tenants are the ingress's: a replica serves whatever it is sent
        log_level="warning",
    )
    replica.config = config
    replica.replica_offer, replica.headroom_script, replica.served = {}, None, 0
    replica._rank = (float("inf"), 0)
    replica.tag, replica.pid = "test-replica", 0
    replica.service = Service(config, tiny_dir)
    await replica.service.start()
    while not replica.service.ready:
        assert not replica.service.load_error, replica.service.load_error
        await asyncio.sleep(0.05)
    return replica


async def _outputs(replica, call: EngineCall) -> list:
    return [o async for o in replica.generate(call) if o is not None]


def test_a_request_the_kv_pool_can_never_hold_is_refused_as_the_clients_error(tiny_dir: Path):
    from server.api.errors import APIError
    from server.api.submission import Submission

    async def main():
        replica = await _replica(tiny_dir)
        try:
            big = EngineCall("big", tuple(range(5, 305)), None, SamplingParams(max_tokens=4))
            (out,) = await _outputs(replica, big)
            assert out.finished and out.finish_reason == "error" and out.refused
            assert "KV blocks" in out.error, out.error
            small = EngineCall("small", tuple(range(5, 45)), None, SamplingParams(max_tokens=2))
            outs = await _outputs(replica, small)
            assert outs[-1].finish_reason == "length" and not outs[-1].refused
            return out
        finally:
            await replica.service.stop()

    refused = asyncio.run(main())
    sub = object.__new__(Submission)
    sub.cut_short, sub.prompt_param = False, "messages"
    err = sub.error_of(refused)
    assert isinstance(err, APIError) and err.status == 400 and err.param == "messages"
    failed = type(refused)(request_id="x", subnet="", finished=True, finish_reason="error")
    assert sub.error_of(failed).status == 500  # a failure stays the server's


def test_the_report_carries_the_prefix_cache_as_the_router_hashes_it(tiny_dir: Path):
    from policies.replica_routing import ReplicaReport, RouteAsk, cached_tokens

    async def main():
        replica = await _replica(tiny_dir, kv_blocks=400)
        try:
            prompt = tuple(range(5, 5 + 4 * BLOCK_SIZE + 1))  # 4 usable blocks
            before = replica.report()
            call = EngineCall("a", prompt, "full", SamplingParams(max_tokens=1))
            await _outputs(replica, call)
            return before, ReplicaReport.from_dict(replica.record_routing_stats())
        finally:
            await replica.service.stop()

    before, after = asyncio.run(main())
    assert after.block_size == BLOCK_SIZE
    # Prefixes of 1, 2 and 4 blocks (the start-up calibration left others before).
    assert len(after.cached - before.cached) == 3
    assert set(after.offered) <= set(after.kv_classes)
    probe = EngineCall("b", tuple(range(5, 5 + 4 * BLOCK_SIZE + 9)), None, SamplingParams())
    held = cached_tokens(RouteAsk(priority=0, pinned="full"), after, probe)
    assert held == 4 * BLOCK_SIZE
    # Another KV class does not hold it.
    other = next(n for n, k in after.kv_classes.items() if k != after.kv_classes["full"])
    assert cached_tokens(RouteAsk(priority=0, pinned=other), after, probe) == 0


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
