"""Turning a request's text into prompt ids: off the event loop, in a bounded pool, fairly.

Owns the tokenizing pool and its bounds. Tokenizing (and chat templating) costs time linear in
the text, up to a second for a megabyte, so it never runs on the event loop, where it would stall
every tenant's streams: it runs in a few threads shared by all tenants (the tokenizer releases
the GIL while it works). Each tenant holds at most half of the threads (at least one) at a time;
its further requests wait for its own turn, not in the shared queue, so one tenant's long
prompts queue behind each other rather than in front of everyone else. The threads run at a
lower CPU priority (nice +10, where the OS allows it): work not yet admitted yields to the engine
generating for requests that were. Before any of it, `char_cap` gives the length past which a
prompt is refused without being tokenized.

Deliberately does not know: HTTP, rate limits (limits.py bounds how many requests a tenant may
have waiting here), or what the ids are used for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the tokenizer brings transformers; this module only calls it
    from server.checkpoint.tokenizer import TextTokenizer

T = TypeVar("T")
NICE = 10  # of 19: the tokenizing threads still run whenever the engine leaves a core free


class PromptPool:
    def __init__(self, tokenizer: TextTokenizer, threads: int, max_prompt_chars: int):
        self.tokenizer = tokenizer
        self.max_prompt_chars = max_prompt_chars
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix="concentric-tokenize", initializer=_lower_priority
        )
        self.per_tenant = max(1, threads // 2)
        self._turns: dict[str, asyncio.Semaphore] = {}  # per tenant (tenants are configured)

    def char_cap(self, max_prompt_tokens: int) -> int:
        """Prompt text longer than this (in characters, all of a request's prompts together)
        is refused before tokenizing: the server's `max_prompt_chars`, and for a tokenizer
        that makes it knowable, the most characters `max_prompt_tokens` tokens can hold."""
        per_token = self.tokenizer.max_token_chars
        if per_token is None:
            return self.max_prompt_chars
        return min(self.max_prompt_chars, max_prompt_tokens * per_token)

    async def encode(self, tenant: str, texts: Sequence[str]) -> list[list[int]]:
        """Raw prompts (completions), each with the tokenizer's BOS."""
        tok = self.tokenizer
        return await self._run(tenant, lambda: [tok.encode(t) for t in texts])

    async def encode_chat(
        self,
        tenant: str,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        render: Callable[..., str] | None = None,
    ) -> list[int]:
        """Chat messages; with `render`, through that template instead of the checkpoint's
        (TextTokenizer.encode_chat)."""
        tok = self.tokenizer
        return await self._run(
            tenant, lambda: tok.encode_chat(messages, add_generation_prompt, tools, render)
        )

    async def run(self, tenant: str, work: Callable[[], T]) -> T:
        """Other work a request needs before admission that must stay off the event loop (a
        structured-output grammar's compilation), under the same per-tenant share."""
        return await self._run(tenant, work)

    async def encode_bare(self, tenant: str, text: str) -> list[int]:
        """Text without the BOS (/tokenize with add_special_tokens false)."""
        hf = self.tokenizer.hf
        return await self._run(
            tenant, lambda: list(hf(text, add_special_tokens=False)["input_ids"])
        )

    async def decode(self, tenant: str, ids: Sequence[int]) -> str:
        """Ids to text, special tokens kept (/detokenize): linear in the ids, so off the loop
        too."""
        return await self._run(
            tenant, lambda: self.tokenizer.decode(ids, skip_special_tokens=False)
        )

    async def _run(self, tenant: str, work: Callable[[], T]) -> T:
        turn = self._turns.get(tenant)
        if turn is None:
            turn = self._turns[tenant] = asyncio.Semaphore(self.per_tenant)
        await turn.acquire()
        loop = asyncio.get_running_loop()
        try:
            job = self._executor.submit(work)
        except BaseException:
            turn.release()
            raise

        def done(_: object) -> None:
            # The tenant's turn ends when the thread is done, even if its request was cancelled
            # meanwhile: a thread still working counts against the tenant's share.
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
                loop.call_soon_threadsafe(turn.release)

        job.add_done_callback(done)
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    """Nice this thread (Linux schedules threads by their own nice value)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
