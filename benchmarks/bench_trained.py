"""The trained dev model against the random `mini` one: does it speak, and do its subnets nest?

One run, three proofs (issue 16), every number computed here from the committed checkpoint:

(a) fixed prompts, answered greedily through the serving engine by the full and E2B subnets of
    both models; the share of generated words found in WordNet's lemma list (a word counts if it,
    or its base form by WordNet's own detachment rules and exception lists, is a lemma), beside
    the same share for the held-out text itself (what real English scores: function words such
    as "the" and "of" are not WordNet lemmas);
(b) held-out perplexity of all 16 official subnets over every window of the held-out slice,
    beside effective parameters; their Spearman rank correlation; a unigram baseline (add-one
    smoothed training-split token frequencies, when `--work` holds the tokenized corpus);
(c) the greedy agreement rate alpha between E2B's and the full subnet's next token on held-out
    prefixes (teacher-forced: both see the same text), and the implied tokens per verification
    for 4 drafted tokens, (1 - alpha^5) / (1 - alpha); the same for the random model (on the same
    text, in its own tokenizer).

    python benchmarks/bench_trained.py [--work /work/train-work] [--wordnet DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from server.engine.offline import GenerationRequest
from server.runtime.elastic import ElasticRuntime
from server.tools import quality
from server.tools.dev_model import TRAINED_CHECKPOINT, dev_model_cache
from server.vocabulary.sampling_params import SamplingParams

PROMPTS = [  # (chat?, text)
    (True, 'What does "river" mean?'),
    (True, "Define happiness."),
    (True, 'Use the word "bright" in a sentence.'),
    (True, "What is a computer?"),
    (False, "In the beginning"),
    (False, "The function returns"),
    (False, "HAMLET.\nTo be, or not to be"),
    (False, "The king said"),
]
MAX_TOKENS = 40
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
# WordNet's morphy detachment rules (wndb(5WN) / morphy(7WN)), all parts of speech together.
_DETACH = [
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("es", "e"),
    ("es", ""),
    ("ed", "e"),
    ("ed", ""),
    ("ing", "e"),
    ("ing", ""),
    ("er", ""),
    ("est", ""),
    ("er", "e"),
    ("est", "e"),
]


def wordnet_vocabulary(wordnet: Path) -> tuple[set[str], dict[str, str]]:
    lemmas, exceptions = set(), {}
    for part in ("noun", "verb", "adj", "adv"):
        for line in (wordnet / f"index.{part}").read_text("latin-1").splitlines():
            if line and not line.startswith(" "):
                lemmas.add(line.split(" ", 1)[0].lower())
        for line in (wordnet / f"{part}.exc").read_text("latin-1").splitlines():
            f = line.split()
            if len(f) >= 2:
                exceptions.setdefault(f[0], f[1])
    return lemmas, exceptions


def in_wordnet(word: str, lemmas: set[str], exceptions: dict[str, str]) -> bool:
    w = word.lower().split("'")[0]
    if w in lemmas or exceptions.get(w) in lemmas:
        return True
    return any(w.endswith(suf) and w[: len(w) - len(suf)] + rep in lemmas for suf, rep in _DETACH)


def word_share(
    texts: list[str], lemmas: set[str], exceptions: dict[str, str]
) -> tuple[float, int, float, int]:
    """(share of words, words, share of distinct words, distinct words) that are WordNet lemmas:
    the distinct share is not inflated by a word repeated in a loop."""
    words = [w for t in texts for w in _WORD.findall(t)]
    distinct = sorted({w.lower() for w in words})

    def share(ws: list[str]) -> float:
        return sum(in_wordnet(w, lemmas, exceptions) for w in ws) / len(ws) if ws else 0.0

    return share(words), len(words), share(distinct), len(distinct)


SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # and seed = the prompt's index


def samples(rt: ElasticRuntime, subnet_names: list[str], sampled: bool) -> dict[str, list[str]]:
    """Each prompt's continuation by each subnet, greedy or seeded-sampled, through the engine."""
    from server.engine.assembly import assemble_engine, kv_bytes_for
    from server.engine.offline import generate

    out = {}
    for name in subnet_names:
        subnet = rt.subnets[name]
        reqs = []
        for i, (chat, text) in enumerate(PROMPTS):
            ids = (
                rt.tokenizer.encode_chat([{"role": "user", "content": text}])
                if chat
                else rt.tokenizer.encode(text)
            )
            params = (
                SamplingParams(max_tokens=MAX_TOKENS, seed=i, **SAMPLED)
                if sampled
                else SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
            )
            reqs.append(GenerationRequest(subnet, ids, params))
        tokens = sum(len(r.prompt_ids) + MAX_TOKENS + 16 for r in reqs)
        results = generate(assemble_engine(rt, kv_bytes_for(rt, tokens)), reqs)
        out[name] = [r.text for r in results]
    return out


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        # average ranks of ties
        vals = np.asarray(v)
        for val in np.unique(vals):
            idx = np.where(vals == val)[0]
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def windows_in(rt: ElasticRuntime, slice_path: Path) -> list[quality.Window]:
    return quality.heldout_windows(rt, slice_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(TRAINED_CHECKPOINT))
    ap.add_argument("--work", help="training work folder (for the unigram baseline's counts)")
    ap.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet's dict folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trained = ElasticRuntime.open(args.checkpoint, dtype="float32")
    rand = ElasticRuntime.open(dev_model_cache("mini"), dtype="float32")
    slice_path = Path(args.checkpoint) / quality.HELDOUT_FILE
    lemmas, exc = wordnet_vocabulary(Path(args.wordnet))
    print(f"threads {torch.get_num_threads()}; checkpoint {args.checkpoint}; random: mini")

    print(
        f"\n(a) {len(PROMPTS)} fixed prompts, {MAX_TOKENS} tokens, through the engine: greedy, "
        f"and sampled ({SAMPLED}, seed = prompt index)"
    )
    held_texts = [
        json.loads(line)["text"] for line in slice_path.read_text(encoding="utf-8").splitlines()
    ]
    for label, rt in (("trained", trained), ("random mini", rand)):
        for sampled in (False, True):
            gens = samples(rt, ["full", "e2b"], sampled)
            for name, texts in gens.items():
                share, n, dshare, dn = word_share(texts, lemmas, exc)
                print(
                    f"  {label:11s} {name:4s} {'sampled' if sampled else 'greedy':7s}: "
                    f"{share:6.1%} of {n:3d} words, {dshare:6.1%} of {dn:3d} distinct words "
                    "are WordNet lemmas"
                )
                if name == "full" or (label == "trained" and not sampled):
                    for (chat, prompt), text in zip(PROMPTS, texts, strict=True):
                        kind = "chat" if chat else "text"
                        print(f"      [{kind}] {prompt!r} -> {text!r}")
    ref, n_ref, dref, dn_ref = word_share(held_texts, lemmas, exc)
    print(
        f"  held-out text itself: {ref:6.1%} of {n_ref} words, {dref:6.1%} of {dn_ref} distinct "
        "words are WordNet lemmas"
    )

    print("\n(b) held-out perplexity of the 16 official subnets (trained model)")
    windows = windows_in(trained, slice_path)
    print(f"  {len(windows)} windows x {quality.WINDOW} = {len(windows) * quality.WINDOW} tokens")
    params, ppls = [], []
    for s in trained.subnets:
        if not s.official:
            continue
        m = quality.measure_subnet(trained, s, windows)
        params.append(s.effective_params)
        ppls.append(m.perplexity)
        print(
            f"  {s.name:14s} {s.effective_params / 1e6:7.3f} M effective  perplexity "
            f"{m.perplexity:8.3f}  top-1 {m.top1:.4f}"
        )
    print(
        f"  Spearman(effective params, perplexity) over {len(ppls)} subnets: "
        f"{spearman(params, ppls):+.3f}"
    )
    if args.work:
        from server.tools.trained_preset import unigram_counts

        counts = unigram_counts(Path(args.work), trained.store.text.vocab_size)
        print(
            "  unigram baseline (training-split frequencies, add-one): perplexity "
            f"{quality.unigram_perplexity(counts, windows):8.3f}"
        )

    print("\n(c) greedy agreement of E2B's next token with full's, same held-out prefixes")
    for label, rt in (("trained", trained), ("random mini", rand)):
        ws = windows if rt is trained else quality.heldout_windows(rt, slice_path)
        alpha, n = quality.agreement(rt, rt.subnets["e2b"], rt.subnets["full"], ws)
        print(
            f"  {label:12s}: alpha = {alpha:.4f} over {n} positions; tokens per verification "
            f"with 4 drafted, (1 - a^5) / (1 - a) = {quality.tokens_per_verification(alpha):.3f}"
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
