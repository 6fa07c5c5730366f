"""Fakes for testing the engine without a model: a runner, resident FFN weights, a decoder, a clock.

`FakeRunner` meets `server.engine.runner_protocol.Runner` and behaves like a deterministic model
with a real paged KV cache: every step it writes each sequence's tokens into the blocks its block
table names, reads the context back from those blocks, and samples the next token as a pure
function of (subnet name, the context it read). So a request's tokens are the same alone, in any
batch, after a preemption (recompute) or a prefix-cache hit, exactly when the engine handed the
runner the right tokens, positions and blocks; and `next_token` is also the test's reference.

It checks what a real runner relies on and records every breach in `violations` (tests assert
there are none; `test_fake_runner.py` shows each check fires):
- calls: `add_request` once before a request's first step, no step for a released or unknown
  request, a request at most once per step, no call while another is running (threads);
- tokens: a sequence's `token_ids` are the request's tokens at [start, start + n) (prompt plus
  what this runner sampled for it), and `sample` is set exactly when they reach its last token;
- blocks: the table has a row per KV-owning layer; every KV layer the subnet keeps has blocks for
  every position its attention reads this step ([0, end) on full layers, the window on sliding
  ones), none for layers the subnet skips; ids lie in the pool, none twice in one table; the
  positions before `start` hold, in those blocks, this request's tokens written by a subnet of
  the same KV layout (so `start` is where its KV really ends, or a prefix it may reuse); no
  block written this step appears in another sequence's table of the step (blocks shared
  through the prefix cache are only read); a block overwritten between steps while another
  request still needs it shows when that request's positions are read back;
- recompute: `restarts` counts, per request, steps that began before the end of what it had
  computed (preemption): a test can tell which requests were recomputed;
- widths: with `ffn` given, every subnet in a step fits the resident FFN widths.

Injected faults: `fail(request_id, message, at_position)` reports an error for one request (the
runner isolates it, as the real one does); `out_of_memory(steps)` raises `DeviceOutOfMemory` on
the next steps, before anything is written; `step_seconds` (a number, or a function of the
step's sequences) is the duration reported and, with a `FakeClock`, the time that passes.

`FakeFfn` meets `server.engine.elasticity.ResidentFfn`: widths and bytes, and background
resizes that finish only when the test says so (`finish_resizes`, or `fail_resizes` for a build
that failed); it counts `release_cached` calls. `ByteDecoder` meets
`TokenDecoder`: ids below 256 are UTF-8 bytes, the others special tokens.

Plain Python: importing this module (and the engine) imports no torch (test_fake_runner.py).
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from server.engine.kv_blocks import KVLayout
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import DeviceOutOfMemory, SampleResult, StepResult, StepSequence
from server.vocabulary.subnets import Subnet

EOS = 300  # a special id: decodes to nothing
FIRST_TEXT, LAST_TEXT = 32, 126  # the default model writes printable ASCII only

NextToken = Callable[[str, Sequence[int]], int]


def hashed_token(subnet: str, context: Sequence[int]) -> int:
    """The default fake model: a printable ASCII byte chosen by a hash of the subnet's name and
    the whole context, so any wrong or missing context token, or the wrong subnet, shows."""
    key = f"{subnet}|{','.join(map(str, context))}".encode()
    return FIRST_TEXT + zlib.crc32(key) % (LAST_TEXT - FIRST_TEXT + 1)


def counting_token(subnet: str, context: Sequence[int]) -> int:
    """A model whose text a test can predict: the next printable byte after the last token."""
    last = context[-1]
    return last + 1 if FIRST_TEXT <= last < LAST_TEXT else FIRST_TEXT


def reference(
    next_token: NextToken,
    subnet: str,
    prompt: Sequence[int],
    params: SamplingParams,
    eos: Sequence[int] = (EOS,),
) -> list[int]:
    """The tokens a request must get: the fake model run alone, with the engine's token stop
    rules (stop_token_ids and eos once min_tokens are out, max_tokens). No stop strings."""
    context, out = list(prompt), []
    while True:
        token = next_token(subnet, context)
        context.append(token)
        out.append(token)
        n = len(out)
        if n >= params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in eos)
        ):
            return out
        if n >= params.max_tokens:
            return out


class FakeClock:
    """time.monotonic for tests that patch it: moves only when told (by a step, or a test)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class _Block:
    """One KV block on the fake device: which layer and KV layout wrote it, and its tokens."""

    layer: int
    kv_key: str
    tokens: list[int | None]


@dataclass
class _Live:
    params: SamplingParams
    tokens: list[int]  # prompt + tokens sampled for it: what the scheduler must send
    keep_logits: bool
    end: int = 0  # positions written by its last step (its KV length as this runner saw it)


@dataclass(frozen=True)
class StepRecord:
    """One sequence of one executed step, as the runner saw it."""

    request_id: str
    subnet: str
    start: int
    num_tokens: int
    sample: bool


class FakeRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        layout: KVLayout,
        next_token: NextToken = hashed_token,
        step_seconds: float | Callable[[Sequence[StepSequence]], float] = 0.01,
        clock: FakeClock | None = None,
        ffn: FakeFfn | None = None,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = layout
        self.next_token = next_token
        self.step_seconds = step_seconds
        self.clock = clock
        self.ffn = ffn
        self.live: dict[str, _Live] = {}
        self.released: set[str] = set()
        self.violations: list[str] = []
        self.steps: list[list[StepRecord]] = []  # every executed step (not the ones that raised)
        self.samples: dict[str, list[tuple[str, int]]] = {}  # request id -> (subnet, token)
        self.restarts: dict[str, int] = {}  # request id -> steps that began before its KV end
        self.failures: dict[str, tuple[str, int]] = {}  # request id -> (message, at position)
        self.oom_steps = 0
        self.oom_raised = 0
        self.before_execute: Callable[[Sequence[StepSequence]], None] | None = None
        self._blocks: dict[int, _Block] = {}  # the "device" KV cache
        self._busy = threading.Lock()

    # ---- fault injection --------------------------------------------------------------------

    def fail(self, request_id: str, message: str = "injected failure", at_position: int = 0):
        """Report `message` for the request in the first step that computes a position at or
        past `at_position` (0: its first step)."""
        self.failures[request_id] = (message, at_position)

    def out_of_memory(self, steps: int = 1) -> None:
        """The next `steps` calls to execute raise DeviceOutOfMemory, having changed nothing."""
        self.oom_steps = steps

    # ---- the Runner protocol ----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        keep_logits: bool = False,
    ) -> None:
        with self._entered("add_request"):
            if request_id in self.live:
                self._violation(f"{request_id}: add_request while it is live")
            self.live[request_id] = _Live(params, list(prompt_ids), keep_logits)
            self.released.discard(request_id)

    def release(self, request_id: str) -> None:
        with self._entered("release"):
            if self.live.pop(request_id, None) is not None:
                self.released.add(request_id)

    def execute(self, seqs: Sequence[StepSequence]) -> StepResult:
        with self._entered("execute"):
            if self.before_execute is not None:
                self.before_execute(seqs)
            broken = self._check_step(seqs)
            if self.oom_steps > 0:
                self.oom_steps -= 1
                self.oom_raised += 1
                raise DeviceOutOfMemory("injected: the step ran out of device memory")
            result = StepResult()
            for s in seqs:
                live = self.live.get(s.request_id)
                if live is None or s.request_id in broken:
                    # a real runner would fail on it: recorded as a violation by _check_step
                    result.errors[s.request_id] = "the fake runner found a contract violation"
                    continue
                failure = self.failures.get(s.request_id)
                if failure is not None and s.start + s.num_tokens > failure[1]:
                    result.errors[s.request_id] = failure[0]
                    continue
                if s.start < live.end:
                    self.restarts[s.request_id] = self.restarts.get(s.request_id, 0) + 1
                self._write(s)
                live.end = s.start + s.num_tokens
                if s.sample:
                    result.samples[s.request_id] = self._sample(s, live)
                    if live.keep_logits:
                        result.logits[s.request_id] = ("logits", s.request_id, live.end)
            self.steps.append(
                [
                    StepRecord(s.request_id, s.subnet.name, s.start, s.num_tokens, s.sample)
                    for s in seqs
                ]
            )
            widths = {s.subnet.widths for s in seqs}
            result.ffn_mode = "grouped" if len(widths) > 1 else None
            seconds = self.step_seconds
            result.seconds = seconds(seqs) if callable(seconds) else seconds
            if self.clock is not None:
                self.clock.advance(result.seconds)
            return result

    # ---- what a step computes ---------------------------------------------------------------

    def _write(self, s: StepSequence) -> None:
        bs, end, key = self.block_size, s.start + s.num_tokens, s.subnet.kv_key
        for layer in s.subnet.kv_layers:
            row = s.block_table[layer]
            for i in range(s.start // bs, -(-end // bs)):
                lo, hi = max(s.start, i * bs), min(end, (i + 1) * bs)
                block = self._blocks.get(row[i])
                if block is None or lo == i * bs or (block.layer, block.kv_key) != (layer, key):
                    # a block (re)starts at its first position; a mismatch mid-block leaves the
                    # earlier positions empty, which the next read reports
                    block = self._blocks[row[i]] = _Block(layer, key, [None] * bs)
                block.tokens[lo - i * bs : hi - i * bs] = s.token_ids[lo - s.start : hi - s.start]

    def _read(self, s: StepSequence, layer: int, lo: int, hi: int) -> list[int | None]:
        """Positions [lo, hi) of a layer as its blocks hold them (None: not there, or written
        by another layer or KV layout)."""
        bs, row, out = self.block_size, s.block_table[layer], []
        for i in range(lo // bs, -(-hi // bs)):
            a, b = max(lo, i * bs), min(hi, (i + 1) * bs)
            block = self._blocks.get(row[i]) if i < len(row) and row[i] >= 0 else None
            if block is None or (block.layer, block.kv_key) != (layer, s.subnet.kv_key):
                out += [None] * (b - a)
            else:
                out += block.tokens[a - i * bs : b - i * bs]
        return out

    def _sample(self, s: StepSequence, live: _Live) -> SampleResult:
        # The context is what the KV cache holds (read back from a full-attention layer), not
        # what the engine says the request's tokens are: a wrong block shows in the token.
        full = [layer for layer in s.subnet.kv_layers if layer not in self.layout.sliding_layers]
        end = s.start + s.num_tokens
        context = [-1 if t is None else t for t in self._read(s, full[0], 0, end)]
        token = self.next_token(s.subnet.name, context)
        live.tokens.append(token)
        self.samples.setdefault(s.request_id, []).append((s.subnet.name, token))
        k = live.params.logprobs
        if k is None:
            return SampleResult(token, None, ())
        top = tuple((token + j, -0.5 * (j + 1)) for j in range(k))
        return SampleResult(token, -0.25, top)

    # ---- the checks -------------------------------------------------------------------------

    def _check_step(self, seqs: Sequence[StepSequence]) -> set[str]:
        """Record every breach; returns the ids of sequences this runner cannot compute."""
        before = len(self.violations)
        broken: set[str] = set()
        if not seqs:
            self._violation("execute with no sequences")
        seen: set[str] = set()
        written: dict[int, str] = {}  # block -> the request writing it this step
        for s in seqs:
            rid = s.request_id
            if rid in seen:
                self._violation(f"{rid}: twice in one step")
            seen.add(rid)
            live = self.live.get(rid)
            if live is None:
                why = "after release" if rid in self.released else "before add_request"
                self._violation(f"{rid}: executed {why}")
                continue
            mark = len(self.violations)
            if self.ffn is not None and not self.ffn.serves(s.subnet):
                self._violation(f"{rid}: subnet {s.subnet.name} does not fit the resident widths")
            self._check_tokens(s, live)
            for block in self._check_blocks(s):
                written[block] = rid
            if len(self.violations) > mark:
                broken.add(rid)
        for s in seqs:  # a block written by one sequence must not be in another's table
            for row in s.block_table:
                for block in row:
                    if block >= 0 and written.get(block, s.request_id) != s.request_id:
                        self._violation(
                            f"{written[block]} writes block {block}, which {s.request_id} holds"
                        )
                        broken.add(s.request_id)
        if len(self.violations) > before and not broken:
            broken.update(s.request_id for s in seqs)
        return broken

    def _check_tokens(self, s: StepSequence, live: _Live) -> None:
        end = s.start + s.num_tokens
        if s.num_tokens < 1 or s.start < 0:
            self._violation(f"{s.request_id}: empty or negative span [{s.start}, {end})")
        elif list(s.token_ids) != live.tokens[s.start : end]:
            self._violation(
                f"{s.request_id}: tokens at [{s.start}, {end}) are {list(s.token_ids)}, "
                f"not its {live.tokens[s.start : end]}"
            )
        if s.sample != (end == len(live.tokens)):
            self._violation(
                f"{s.request_id}: sample={s.sample} for [{s.start}, {end}) of "
                f"{len(live.tokens)} tokens"
            )

    def _check_blocks(self, s: StepSequence) -> list[int]:
        """Check the block table; returns the blocks this sequence writes."""
        rid, bs, lay = s.request_id, self.block_size, self.layout
        end = s.start + s.num_tokens
        if len(s.block_table) != lay.num_kv_layers:
            self._violation(f"{rid}: {len(s.block_table)} table rows for {lay.num_kv_layers}")
            return []
        ids = [b for row in s.block_table for b in row if b >= 0]
        if len(ids) != len(set(ids)):
            self._violation(f"{rid}: a block serves two positions or layers of its table")
        writes = []
        for layer in range(lay.num_kv_layers):
            row = s.block_table[layer]
            if layer not in s.subnet.kv_layers:
                if any(b >= 0 for b in row):
                    self._violation(f"{rid}: blocks on layer {layer}, which its subnet skips")
                continue
            if any(not -1 <= b < self.num_blocks for b in row):
                self._violation(f"{rid}: layer {layer} names a block outside the pool: {row}")
                continue
            sliding = layer in lay.sliding_layers
            first = max(0, s.start - lay.sliding_window + 1) if sliding else 0
            for i in range(first // bs, -(-end // bs)):
                if i >= len(row) or row[i] < 0:
                    self._violation(f"{rid}: layer {layer} has no block for positions of {i}")
                    return writes
            held = self._read(s, layer, first, s.start)
            want = self.live[rid].tokens[first : s.start]
            if held != want:
                self._violation(
                    f"{rid}: layer {layer} holds {held} at [{first}, {s.start}), not its tokens "
                    f"{want} in KV layout {s.subnet.kv_key}"
                )
            writes += [row[i] for i in range(s.start // bs, -(-end // bs))]
        return writes

    # ---- helpers ----------------------------------------------------------------------------

    def _violation(self, message: str) -> None:
        self.violations.append(message)

    @contextlib.contextmanager
    def _entered(self, what: str) -> Iterator[None]:
        """Every runner call: record one that starts while another is running (two threads)."""
        held = self._busy.acquire(blocking=False)
        if not held:
            self._violation(f"{what} while another runner call was in progress")
        try:
            yield
        finally:
            if held:
                self._busy.release()


# ---- resident FFN widths ------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeReport:
    uploaded_bytes: int
    released_bytes: int


@dataclass
class FakeResize:
    widths: tuple[int, ...]
    old: tuple[int, ...]
    background: bool
    finished: bool = False
    abandoned: bool = False
    error: BaseException | None = None

    def done(self) -> bool:
        return self.finished


@dataclass
class FakeFfn:
    """Resident FFN widths, one byte per row per layer unless told otherwise. A background
    resize finishes only when `finish_resizes` is called; a foreground one at once."""

    full_widths: tuple[int, ...]
    bytes_per_row: int = 1
    resident_widths: tuple[int, ...] = ()
    resizes: list[FakeResize] = field(default_factory=list)
    history: list[tuple[int, ...]] = field(default_factory=list)  # committed widths, in order
    violations: list[str] = field(default_factory=list)
    releases: int = 0  # release_cached calls

    def __post_init__(self) -> None:
        self.full_widths = tuple(self.full_widths)
        self.resident_widths = tuple(self.resident_widths or self.full_widths)

    @property
    def resident_bytes(self) -> int:
        return self.bytes_for(self.resident_widths)

    def bytes_for(self, widths: Sequence[int]) -> int:
        return sum(widths) * self.bytes_per_row

    def transient_bytes(self, widths: Sequence[int]) -> int:
        """A changed layer's new rows are built whole beside the old ones."""
        changed = [w for w, r in zip(widths, self.resident_widths, strict=True) if w != r]
        return sum(changed) * self.bytes_per_row

    def release_cached(self) -> None:
        self.releases += 1

    def serves(self, subnet: Subnet) -> bool:
        return all(
            w <= self.resident_widths[layer]
            for layer, w in zip(subnet.layers, subnet.widths, strict=True)
        )

    def prepare_ffn(self, widths: Sequence[int], background: bool = True) -> FakeResize:
        resize = FakeResize(tuple(widths), self.resident_widths, background, not background)
        self.resizes.append(resize)
        return resize

    def finish_resizes(self) -> None:
        for r in self.resizes:
            r.finished = True

    def fail_resizes(self, error: BaseException) -> None:
        """Every unfinished resize ends with its build having raised `error`."""
        for r in self.resizes:
            if not r.finished:
                r.finished, r.error = True, error

    def abandon_ffn(self, pending: FakeResize) -> None:
        pending.abandoned = True

    def commit_ffn(self, pending: FakeResize) -> FakeReport:
        if not pending.done():
            self.violations.append(f"commit of an unfinished resize to {pending.widths}")
        if pending.abandoned:
            self.violations.append(f"commit of an abandoned resize to {pending.widths}")
        if pending.error is not None:
            self.violations.append(f"commit of a failed resize to {pending.widths}")
        if pending.old != self.resident_widths:
            raise RuntimeError("the resident widths changed while a resize was being prepared")
        before = self.resident_bytes
        self.resident_widths = pending.widths
        self.history.append(pending.widths)
        after = self.resident_bytes
        return FakeReport(max(0, after - before), max(0, before - after))


# ---- text ---------------------------------------------------------------------------------------


class ByteDecoder:
    """Ids 0..255 are UTF-8 bytes; every other id is a special token (text "<id>" unless
    skipped). Invalid or incomplete UTF-8 decodes to U+FFFD, as a byte-fallback tokenizer's."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(f"<{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
