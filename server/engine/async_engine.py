"""The engine for asyncio callers: a background step loop and one output stream per request.

Owns concurrency. Steps run in a thread of the engine's own (one worker), so the event loop stays
free to accept requests and stream while the model computes, and a step never waits for a
worker behind other blocking work of the process (the loop's default pool is shared, and small
where a host such as a Ray Serve replica sizes it by its CPU share). Adds and aborts from the
event loop are never applied while a step is running: they are queued and applied by the step
thread between steps, so the engine core stays single-threaded. An abort is applied at the next
step boundary (immediately when idle) and frees the request's KV blocks then.

An idle engine still steps every `idle_tick_s` when it has elasticity: a step with no work is
elasticity's tick alone, so the resident widths follow the headroom (give memory back, finish a
shrink that waited for the last requests, swap a prepared growth in) without traffic.

The loop survives failures: a failing request gets an error (the runner isolates it), and an
unexpected error in a whole step fails the requests of that step, not the server. `dead` is set
only if the loop itself stops unexpectedly (what /health reports).

Deliberately does not know: HTTP, tenants, or tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from policies.snapshots import TierView
from server.engine.engine import Engine
from server.engine.outputs import RequestOutput
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.subnets import Subnet

log = logging.getLogger("concentric.engine")


class RequestStream:
    """The outputs of one request, as an async iterator; ends after the finished output."""

    def __init__(self, request_id: str, engine: AsyncEngine):
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self._head: RequestOutput | None = None  # read by first(), not yet iterated

    def put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def close(self) -> None:
        """The consumer is gone: abort the request unless it already finished."""
        if not self.finished:
            self._engine.abort(self.request_id)

    async def first(self) -> RequestOutput:
        """The first output, without consuming it (iteration still starts with it). It tells
        which subnet the request was admitted with."""
        if self._head is None:
            self._head = await self._queue.get()
        return self._head

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                if self._head is not None:
                    out, self._head = self._head, None
                else:
                    out = await self._queue.get()
                yield out
                if out.finished:
                    self.finished = True
                    return
        finally:
            if not self.finished:  # the consumer went away (client disconnect): free the KV
                self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, idle_tick_s: float = 0.5, blocked_retry_s: float = 0.02):
        self.engine = engine
        self.blocked_retry_s = blocked_retry_s  # pause between steps that could run nothing
        # How often an idle engine ticks elasticity (None: it sleeps until a request comes).
        self.idle_tick_s = idle_tick_s if engine.elasticity is not None else None
        self._streams: dict[str, RequestStream] = {}
        self._ops: deque[Callable[[], None]] = deque()  # applied by the step thread
        self._lock = threading.Lock()  # held while the engine core is in use
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stepper: ThreadPoolExecutor | None = None  # the step thread (start() makes it)
        self._stopping = False
        self.dead: str | None = None  # why the loop stopped, if it did
        self.on_step: list[Callable[[Engine], None]] = []  # observers (metrics)
        self.on_finished: list[Callable[[RequestOutput], None]] = []

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._stepper = ThreadPoolExecutor(1, thread_name_prefix="concentric-step")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="concentric-engine")

    async def stop(self) -> None:
        self._stopping = True
        if self._wake:
            self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._stepper is not None:
            self._stepper.shutdown(wait=False)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        subnet: Subnet | None,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        tags: dict[str, str] | None = None,
        tier: TierView | None = None,
    ) -> RequestStream:
        """Queue a request and return its output stream. Raises ValueError at once if the
        request can never run (bad parameters, too long for the context or the KV pool)."""
        if self.dead:
            raise RuntimeError(f"the engine loop has stopped: {self.dead}")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Checked here, so the caller hears of a bad request before any response starts; queued
        # into the engine by the step thread, so the event loop never waits for a step.
        req = self.engine.make_request(request_id, prompt_ids, subnet, params, priority, tags, tier)
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._ops.append(lambda: self.engine.add(req))
        self._kick()
        return stream

    def check_request(
        self, prompt_ids: Sequence[int], subnet: Subnet | None, params: SamplingParams
    ) -> None:
        """Raise ValueError if such a request could never run, as add_request would; queues
        nothing. Lets a caller refuse a request before it charges anything for it."""
        self.engine.make_request("check", prompt_ids, subnet, params)

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent). Its KV is freed at the next step boundary."""
        if request_id in self._streams:
            self._ops.append(lambda: self._apply_abort(request_id))
            self._kick()

    def _apply_abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver_soon([out])

    # ---- the loop ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        self._loop_ref = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if not self.engine.has_work and not self._ops:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.idle_tick_s)
                        continue
                    except TimeoutError:
                        pass  # idle: the step below is only elasticity's tick
                assert self._stepper is not None
                outputs = await self._loop_ref.run_in_executor(self._stepper, self._step)
                self._deliver(outputs)
                await asyncio.sleep(0)  # let handlers run between steps
                if self.engine.has_work and self.engine.last_step.num_seqs == 0:
                    # Nothing could run (requests waiting for a resident subnet, or deferred by
                    # the policy): retry admission after a pause, or at once on news (an add,
                    # an abort), instead of spinning on empty steps.
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.blocked_retry_s)
        except Exception as e:  # a bug in the loop itself: report it, fail everyone
            log.exception("engine loop died")
            self.dead = f"{type(e).__name__}: {e}"
            for stream in list(self._streams.values()):
                stream.put(self._error_output(stream.request_id, self.dead))
            self._streams.clear()

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            while self._ops:
                self._ops.popleft()()
            try:
                outputs = self.engine.step()
            except Exception as e:  # one step failed: fail its requests, go on
                log.exception("engine step failed")
                outputs = self.engine.fail_running(f"{type(e).__name__}: {e}")
            for observer in self.on_step:
                observer(self.engine)
        return outputs

    def _deliver_soon(self, outputs: list[RequestOutput]) -> None:
        # Called on the step thread: hand the outputs to the event loop.
        self._loop_ref.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
                for observer in self.on_finished:
                    observer(out)

    @staticmethod
    def _error_output(request_id: str, message: str) -> RequestOutput:
        return RequestOutput(
            request_id=request_id, subnet="", finished=True, finish_reason="error", error=message
        )
