"""Prompt scoring: the log-probability of each prompt token given the tokens before it.

Owns turning a prefill chunk's logits rows into `PromptLogprob`s (vLLM's `prompt_logprobs`, and
what `echo` with `logprobs` shows for the prompt): the row at position p scores the prompt token
at p + 1. Values are raw logits normalised over the text vocabulary (as the sampler's logprobs of
generated tokens: before penalties, bias or temperature), with the normaliser in float64 so that
a long prompt's summed log-likelihood does not drift with float32 rounding. Rows are scored a
few at a time so the float64 copy stays small whatever the vocabulary (262,144 for Gemma 3n).

Deliberately does not know: which rows a step computed (the runner picks them), the model, or
how the API shows the values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.vocabulary.step import PromptLogprob

ROWS_AT_ONCE = 32  # float64 rows scored together: 32 x 262,144 x 8 bytes = 64 MiB at most


def score_prompt(
    logits: torch.Tensor,
    positions: Sequence[int],
    targets: Sequence[int],
    top_k: int,
    vocab: int,
) -> list[PromptLogprob]:
    """`logits` [m, >= vocab]: row i predicts `targets[i]`, the prompt token at `positions[i]`.
    Placeholder ids (>= vocab, image/audio) are outside the distribution, as when sampling."""
    out: list[PromptLogprob] = []
    k = min(top_k, vocab)
    for lo in range(0, len(targets), ROWS_AT_ONCE):
        hi = min(lo + ROWS_AT_ONCE, len(targets))
        x = logits[lo:hi, :vocab].double()
        lse = torch.logsumexp(x, dim=-1)
        target = torch.tensor(targets[lo:hi], dtype=torch.long, device=x.device)
        chosen = x.gather(1, target[:, None])[:, 0]
        # vLLM's rank: how many ids score at least as high as the token (1 for the argmax).
        rank = (x >= chosen[:, None]).sum(dim=-1)
        values = [(chosen - lse), rank.double()]
        if k:
            top_vals, top_ids = torch.topk(x, k, dim=-1)  # highest first
            values += [top_ids.double().T, (top_vals - lse[:, None]).T]
        # One device->host copy per group of rows.
        host = torch.cat([v.reshape(-1, hi - lo) for v in values]).T.tolist()
        for i, row in enumerate(host):
            top = tuple(zip((int(t) for t in row[2 : 2 + k]), row[2 + k :], strict=True))
            out.append(PromptLogprob(positions[lo + i], targets[lo + i], row[0], int(row[1]), top))
    return out
