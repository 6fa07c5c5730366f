"""The model runner: one engine step as tensors, a forward pass, and one sampled token per sequence.

Owns the K/V tensors, the per-request sampling state (registered once; sampling runs batched on
the logits' device, and a seeded request draws the same tokens whatever else is batched with it),
the choice between the two ways of running mixed FFN widths, prompt scoring (a request with
prompt_logprobs gets logits at every row of its prefill chunks, scored by prompt_scoring.py;
every other sequence in the step keeps its one sampling row), and isolating failures: if a step
fails, its sequences are retried one by one so that only the culprit gets an error; but an
allocation failure, whichever allocator raised it (device.py recognises each kind), is nobody's
fault: it leaves as `DeviceOutOfMemory` for the engine to shrink and retry, after the failed
step's frames are gone and its cached blocks released.

FFN mode by measurement: with several widths in a step, "grouped" runs one GEMM per width on its
rows (saves FLOPs: wins when compute-bound, e.g. prefill chunks) and "masked" one GEMM at the
widest width with narrower rows masked (one weight read and fewer kernel launches: wins when
bandwidth- or overhead-bound, e.g. decode). Which wins depends on the machine and the step, so
the runner times both per kind of step and keeps the faster, re-checking now and then.

Deliberately does not know: queues, budgets, block bookkeeping, detokenization, or HTTP.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Sequence

import torch

from server.runtime.batch import plan_step
from server.runtime.batch_invariant import BatchInvariantOps
from server.runtime.decode_graph import DecodeGraphs
from server.runtime.device import allocation_failure, on_device, release_cached, synchronize
from server.runtime.gemma3n import Gemma3nModel
from server.runtime.grammar import Grammars
from server.runtime.kv_cache import KVCache
from server.runtime.prompt_scoring import score_prompt
from server.runtime.sampler import Sampler, SamplerState, SamplingError
from server.vocabulary.compute import FFN_MODE_CHOICES, FFN_MODES, check_choice
from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import DeviceOutOfMemory, SampleResult, StepResult, StepSequence


class FfnModeChooser:
    """Keeps recent step times per (kind of step, mode) and picks the faster mode."""

    def __init__(self, warmup: int = 3, recheck_every: int = 50, window: int = 9):
        self.warmup = warmup
        self.recheck_every = recheck_every
        self.times: dict[tuple, dict[str, deque]] = defaultdict(
            lambda: {m: deque(maxlen=window) for m in FFN_MODES}
        )
        self.decisions: dict[tuple, int] = defaultdict(int)

    def choose(self, key: tuple) -> str:
        times = self.times[key]
        for mode in FFN_MODES:  # measure each mode a few times first
            if len(times[mode]) < self.warmup:
                return mode
        self.decisions[key] += 1
        best = min(FFN_MODES, key=lambda m: statistics.median(times[m]))
        if self.decisions[key] % self.recheck_every == 0:  # the other may have become faster
            return next(m for m in FFN_MODES if m != best)
        return best

    def record(self, key: tuple, mode: str, seconds: float) -> None:
        self.times[key][mode].append(seconds)

    def summary(self) -> dict[tuple, dict[str, float]]:
        return {
            k: {m: statistics.median(t) for m, t in v.items() if t} for k, v in self.times.items()
        }


class ModelRunner:
    def __init__(
        self,
        model: Gemma3nModel,
        num_blocks: int,
        block_size: int,
        eos_token_ids: Sequence[int],
        ffn_mode: str = "auto",
        compile_backend: str | None = None,
        batch_invariant: bool = False,
        grammars: Grammars | None = None,
        paged_attention: bool = False,
    ):
        """`compile_backend`: compile decode steps (decode_graph.py) with this torch.compile
        backend ("inductor"; "aot_eager" captures the same graphs without generating code);
        None: every step runs the eager forward; with a backend, the sampler's passes over
        whole rows are compiled too (row_passes.py, inductor). `batch_invariant`: every row's
        logits are what it gets alone (batch_invariant.py): mixed widths run grouped, each query
        attends alone, products run row by row; exclusive with compiled steps, which pad rows
        and widths.
        `grammars`: compiles structured-output constraints (grammar.py); None refuses them.
        `paged_attention`: compiled decode steps read K/V where the cache holds them rather than
        gathering a copy (decode_graph.py); needs a backend."""
        check_choice("ffn_mode", ffn_mode, FFN_MODE_CHOICES)
        if batch_invariant and compile_backend is not None:
            raise ValueError("batch-invariant steps cannot be compiled (static steps pad rows)")
        if paged_attention and compile_backend is None:
            raise ValueError("paged attention is a compiled decode step's: it needs a backend")
        self.model = model
        self.device = model.w.device
        text = model.text
        self.text = text
        self.block_size = block_size
        self.kv = KVCache(text, num_blocks, block_size, model.w.dtype, model.w.device)
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(
            text.vocab_size_per_layer_input,
            self.eos_token_ids,
            device=model.w.device,
            grammars=grammars,
            compiled=compile_backend is not None,
        )
        self.states: dict[str, SamplerState] = {}
        self.keep_logits: set[str] = set()  # requests whose logits rows are returned
        # Requests that score their prompt (prompt_logprobs): their prompt ids and top k.
        self.scored: dict[str, tuple[list[int], int]] = {}
        self.batch_invariant = batch_invariant
        # Masked mode reduces every row over the widest width in the step: not invariant.
        self.ffn_mode = "grouped" if batch_invariant else ffn_mode
        self.chooser = FfnModeChooser()
        self.graphs = None
        if compile_backend is not None:
            self.graphs = DecodeGraphs(
                model, self.kv, block_size, compile_backend, paged=paged_attention
            )

    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        keep_logits: bool = False,
    ) -> None:
        """Register a request's sampling parameters and prompt once, before its first step."""
        self.states[request_id] = self.sampler.add_request(params, prompt_ids)
        if keep_logits:
            self.keep_logits.add(request_id)
        if params.prompt_logprobs is not None:
            self.scored[request_id] = (list(prompt_ids), params.prompt_logprobs)

    def release(self, request_id: str) -> None:
        """Forget a finished request's sampling state."""
        state = self.states.pop(request_id, None)
        if state is not None:
            self.sampler.release(state)
        self.keep_logits.discard(request_id)
        self.scored.pop(request_id, None)

    def execute(self, seqs: Sequence[StepSequence]) -> StepResult:
        t0 = time.perf_counter()
        failure = kind = None
        try:
            with on_device(self.device):  # steps run in worker threads: name the device
                result = self._run(seqs)
        except Exception as e:
            kind = allocation_failure(e)
            failure = f"{type(e).__name__}: {e}"
        # Out of the `except`: the failed step's frames (and the activations they hold) are gone.
        if kind is not None:
            # Not a request's fault: the engine shrinks the resident widths and retries. What
            # the failed step left in the allocator's cache goes back to the device first.
            release_cached(self.device)
            raise DeviceOutOfMemory(failure, kind)
        if failure is not None:  # isolate, then report per request
            if len(seqs) == 1:
                result = StepResult(errors={seqs[0].request_id: failure})
            else:
                result = StepResult()
                for s in seqs:  # rewriting the same K/V slots with the same values is harmless
                    one = self.execute([s])
                    result.samples.update(one.samples)
                    result.errors.update(one.errors)
                    result.logits.update(one.logits)
                    result.prompt_logprobs.update(one.prompt_logprobs)
        result.seconds = time.perf_counter() - t0
        return result

    def _run(self, seqs: Sequence[StepSequence]) -> StepResult:
        scoring = self._scoring(seqs)
        if self.graphs is not None and not scoring and self.graphs.applies(seqs):
            logits, planned = self.graphs.run(seqs)
            return self._sample(seqs, planned, logits, StepResult(ffn_mode="compiled"))
        key = self._step_kind(seqs)
        mode = self.ffn_mode
        if mode == "auto":
            mode = self.chooser.choose(key) if key is not None else "grouped"
        t0 = time.perf_counter()
        planned = plan_step(
            self.text,
            seqs,
            self.block_size,
            self.kv.scratch_block,
            mode,
            per_query_attention=self.batch_invariant,
            every_row_of=scoring,
        )
        ops = BatchInvariantOps() if self.batch_invariant else contextlib.nullcontext()
        with torch.inference_mode(), ops:
            logits = self.model.forward(self.model.batch(planned), self.kv)
        if key is not None and self.ffn_mode == "auto":
            synchronize(self.device)
            self.chooser.record(key, mode, time.perf_counter() - t0)
        result = StepResult(ffn_mode=mode if key else None)
        if scoring:
            with torch.inference_mode():
                logits = self._score(seqs, planned.order, scoring, logits, result)
        return self._sample(seqs, planned, logits, result)

    def _scoring(self, seqs: Sequence[StepSequence]) -> frozenset[int]:
        """Sequences whose rows this step include prompt positions to score: their every row
        gets logits (only theirs; other requests' steps stay as they are)."""
        return frozenset(
            i
            for i, s in enumerate(seqs)
            if s.request_id in self.scored and s.start < len(self.scored[s.request_id][0]) - 1
        )

    def _score(self, seqs, order, scoring, logits: torch.Tensor, result: StepResult):
        """Score the prompt positions of the `scoring` sequences' rows; returns the logits rows
        of the sampling sequences alone, in batch order (what `_sample` expects)."""
        sample_rows: list[int] = []
        row = 0
        for i in order:
            s = seqs[i]
            if i not in scoring:
                if s.sample:
                    sample_rows.append(row)
                    row += 1
                continue
            prompt, k = self.scored[s.request_id]
            # The row at position p scores prompt token p + 1; a recomputed output token's row
            # (after a preemption) and the sampling row score nothing.
            n = min(len(s.token_ids), len(prompt) - 1 - s.start)
            positions = [s.start + j + 1 for j in range(n)]
            scored = score_prompt(
                logits[row : row + n],
                positions,
                [prompt[p] for p in positions],
                k,
                self.sampler.text_vocab_size,
            )
            result.prompt_logprobs[s.request_id] = scored
            if s.sample:
                sample_rows.append(row + len(s.token_ids) - 1)
            row += len(s.token_ids)
        index = torch.tensor(sample_rows, dtype=torch.long, device=logits.device)
        return logits.index_select(0, index)

    def _sample(self, seqs, planned, logits: torch.Tensor, result: StepResult) -> StepResult:
        # Logit rows follow the batch order (sequences grouped by subnet).
        sampled = [seqs[i] for i in planned.order if seqs[i].sample]
        states = [self.states[s.request_id] for s in sampled]
        for row, s in enumerate(sampled):
            if s.request_id in self.keep_logits:
                result.logits[s.request_id] = logits[row].detach().clone()
        # Sampling runs where the logits are; only the chosen ids and requested logprobs come
        # back, and each state records its token (on the device) as part of sampling.
        try:
            samples: list[SampleResult | None] = list(self.sampler.sample(logits, states))
        except SamplingError as e:  # only the failed rows lose; the others' draws stand
            samples = e.results or [None] * len(sampled)
            for row, message in e.failures.items():
                result.errors[sampled[row].request_id] = f"sampling failed: {message}"
        for s, sample in zip(sampled, samples, strict=True):
            if sample is not None:
                result.samples[s.request_id] = sample
        return result

    @staticmethod
    def _step_kind(seqs: Sequence[StepSequence]) -> tuple | None:
        """A key for steps that cost alike; None when all sequences share one subnet's widths
        (then the two modes are the same computation)."""
        if len({s.subnet.widths for s in seqs}) < 2 and len({s.subnet.layers for s in seqs}) < 2:
            return None
        tokens = sum(len(s.token_ids) for s in seqs)
        prefill = any(len(s.token_ids) > 1 for s in seqs)
        return ("prefill" if prefill else "decode", 1 << max(0, tokens - 1).bit_length())
