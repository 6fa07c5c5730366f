"""The engine the ingress's API layer talks to, when the engines are Ray Serve replicas.

Owns the part of `AsyncEngine`'s interface the API uses (`add_request` returning a stream of
`RequestOutput`s with `first()`, iteration and `close()`; `check_request`; `abort`;
`num_in_flight`; `dead`; the `on_finished` observers), over a streaming call to the engine
deployment (`EngineReplica.generate`), so the routes, submission and responses do not change.

Fault handling: a call that fails before its first output (the replica died, was draining, or
refused it; or, once a replica took it, it went silent: no output and no heartbeat for
`silence_s`, which is how a replica killed outright sometimes shows) is retried on another
replica, up to `retries` times. No byte of the response has been sent then (the API waits for
the first output before it answers), so a retry is invisible to the client. Until a replica
takes a call it waits at the router with no deadline of ours: the router serves every waiting
call (replica_router.py; calls "lost" there after a replica was killed were its bug, not Ray's),
and the client's own timeout bounds the wait. A failure after the first output ends the stream
with an error output (a stream gets an error event; a non-streamed response a 500), as a failed
step does in one process.

A stream closed by its consumer (client disconnect, drain) cancels the call (the replica aborts
the request and frees its KV) and reports an `abort` output to the observers at once, so the
service gives the tenant's limits back without waiting for the replica.

Deliberately does not know: HTTP, tenants' limits, or how replicas are chosen (the router).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from policies.snapshots import TierView
from server.engine.outputs import RequestOutput
from server.fleet.engine_call import HEARTBEAT, HEARTBEAT_S, EngineCall
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet

log = logging.getLogger("concentric.fleet")

# check(prompt_ids, subnet, params): raise ValueError if such a request could never run.
Check = Callable[[Sequence[int], Subnet | None, SamplingParams], None]


class RemoteStream:
    def __init__(self, call: EngineCall, engine: RemoteEngine):
        self.request_id = call.request_id
        self.call = call
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self._head: RequestOutput | None = None
        self._outputs = 0  # outputs received
        self._tokens = 0
        self._subnet = ""
        self.attempts = 0
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        engine = self._engine
        while True:
            self.attempts += 1
            try:
                _fresh_call_id()
                gen = engine.handle.generate.remote(self.call)
                pending: asyncio.Future | None = None
                taken = False  # a replica took the call (until then it waits at the router)
                try:
                    while True:
                        if pending is None:
                            pending = asyncio.ensure_future(gen.__anext__())
                        # Before a replica takes it, a call may wait at the router as long as it
                        # must (routing it again, cancelling it, was seen to leave it stuck).
                        wait = engine.silence_s if taken else None
                        done, _ = await asyncio.wait({pending}, timeout=wait)
                        if not done:
                            raise TimeoutError(
                                f"no word from the engine replica for {engine.silence_s:g} s"
                            )
                        try:
                            out = pending.result()
                        except StopAsyncIteration:
                            break
                        pending = None
                        taken = True
                        if out is HEARTBEAT:
                            continue
                        self._got(out)
                        if out.finished:
                            return
                finally:
                    if pending is not None and not pending.done():
                        pending.cancel()
                    with contextlib.suppress(Exception):
                        gen.cancel()
                raise RuntimeError("the engine replica ended the stream without a final output")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._outputs == 0 and self.attempts <= engine.retries:
                    engine.retried += 1
                    log.warning(
                        "request %s: engine replica failed before its first output (%s: %s); "
                        "retrying on another replica",
                        self.request_id,
                        type(e).__name__,
                        e,
                    )
                    await asyncio.sleep(engine.retry_pause_s)
                    continue
                engine.failed += 1
                self._got(
                    RequestOutput(
                        request_id=self.request_id,
                        subnet=self._subnet,
                        finished=True,
                        finish_reason="error",
                        error=f"the engine replica failed: {type(e).__name__}: {e}",
                        num_output_tokens=self._tokens,
                        tags=dict(self.call.tags),
                    )
                )
                return

    def _got(self, out: RequestOutput) -> None:
        if self.finished:
            return
        self._outputs += 1
        self._tokens = out.num_output_tokens or self._tokens + len(out.token_ids)
        self._subnet = out.subnet or self._subnet
        self._queue.put_nowait(out)
        if out.finished:
            self.finished = True
            self._engine._finished(out)

    def close(self) -> None:
        """The consumer is gone: cancel the call (the replica aborts the request)."""
        if self.finished:
            return
        self._task.cancel()
        self._got(
            RequestOutput(
                request_id=self.request_id,
                subnet=self._subnet,
                finished=True,
                finish_reason="abort",
                num_output_tokens=self._tokens,
                tags=dict(self.call.tags),
            )
        )

    async def first(self) -> RequestOutput:
        if self._head is None:
            self._head = await self._queue.get()
        return self._head

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while True:
                if self._head is not None:
                    out, self._head = self._head, None
                else:
                    out = await self._queue.get()
                yield out
                if out.finished:
                    done = True
                    return
        finally:
            if not done:
                self.close()


def _fresh_call_id() -> None:
    """Give the next handle call its own Serve request id. Serve reuses the HTTP request's id
    for every handle call made while serving it, and its router matches a chosen replica to
    the pending call by that id: two calls of one request (n > 1 choices, a retry after a
    replica died) would share one and could be left unrouted. This runs in the stream's own
    task (its own context copy), so the HTTP request's id is untouched."""
    try:
        from ray.serve.context import _set_request_context

        _set_request_context(_internal_request_id=uuid.uuid4().hex)
    except Exception:  # outside Serve (tests with a fake handle), or the private API moved
        pass


class RemoteEngine:
    def __init__(
        self,
        handle,
        check: Check,
        retries: int = 2,
        retry_pause_s: float = 0.2,
        silence_s: float = 30 * HEARTBEAT_S,
    ):
        self.handle = handle.options(stream=True)
        self.check = check
        # A call silent this long (no output, no heartbeat) is given up as a lost replica. Not
        # shorter than a few heartbeats: a busy replica's event loop may be late.
        self.silence_s = max(silence_s, 2 * HEARTBEAT_S)
        self.retries = retries
        self.retry_pause_s = retry_pause_s
        self._streams: dict[str, RemoteStream] = {}
        self.dead: str | None = None
        self.on_step: list[Callable] = []  # nothing steps here: each replica observes its own
        self.on_finished: list[Callable[[RequestOutput], None]] = []
        self.retried = 0  # calls retried on another replica (metrics)
        self.failed = 0  # calls that ended with an error after retries

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for stream in list(self._streams.values()):
            stream.close()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def add_request(
        self,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        tags: dict[str, str] | None = None,
        tier: TierView | None = None,
    ) -> RemoteStream:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check(prompt_ids, subnet, params)
        call = EngineCall(
            request_id,
            tuple(prompt_ids),
            subnet.name if subnet is not None else None,
            params,
            priority,
            dict(tags or {}),
            tier,
        )
        stream = RemoteStream(call, self)
        self._streams[request_id] = stream
        return stream

    def check_request(
        self, prompt_ids: Sequence[int], subnet: Subnet | None, params: SamplingParams
    ) -> None:
        self.check(prompt_ids, subnet, params)

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.close()

    def _finished(self, out: RequestOutput) -> None:
        self._streams.pop(out.request_id, None)
        for observer in self.on_finished:
            observer(out)
