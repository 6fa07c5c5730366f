"""What the engine needs from a model runner, and nothing more.

Owns the `Runner` protocol: the runtime's `ModelRunner` (server/runtime/runner.py) meets it, and
so does the fake runner of the engine tests, which is why the engine imports no torch. The
records that cross it (`StepSequence` in, `StepResult` out) are plain data in
server/vocabulary/step.py.

Deliberately does not know: tensors, devices, or how a step is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.vocabulary.sampling_params import SamplingParams
from server.vocabulary.step import StepResult, StepSequence


class Runner(Protocol):
    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        keep_logits: bool = False,
    ) -> None:
        """Register a request's sampling parameters and prompt, once, before its first step."""

    def release(self, request_id: str) -> None:
        """Forget a finished request's state (idempotent)."""

    def execute(self, seqs: Sequence[StepSequence]) -> StepResult:
        """Run one step: compute every sequence's tokens and sample for those that `sample`.
        A request whose part fails is reported in `StepResult.errors`, the others carry on;
        raises `DeviceOutOfMemory` when the whole step ran out of memory."""
