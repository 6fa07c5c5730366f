"""Training the dev model that speaks: a small Gemma 3n MatFormer, on a CPU, resumably.

Owns the training run behind `concentric train-dev-model`: the plan (config as data:
`TrainPlan`), the corpus tokenizer (the dev tokenizer's fixed ids and chat template, merges
learned from the training split), tokenizing the corpus once, the batches (a pure function of
the seed and the step), the MatFormer loss (the full model plus one sampled subnet per step), the
optimiser and its schedule, checkpoints of the whole run state every few minutes (a killed run
resumes where its last checkpoint left it and reaches the same weights), and writing the result
as a dev checkpoint in the real multimodal layout, in bfloat16.

The model is transformers' `Gemma3nForCausalLM` with E4B's topology at small sizes. A subnet is
trained the way the runtime serves it: an FFN of width k uses gate/up rows and down columns
`[:k]` (so layers 0..9 take their sparsity statistics over the active width) and a skipped layer
is the identity on all four AltUp streams; layers 18 and 19 (the KV producers) are never skipped.

Deliberately does not know: how a checkpoint is served or measured (server/tools/quality.py), or
where the text comes from (server/tools/corpus.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from server.checkpoint.shard import PlannedTensor
from server.checkpoint.writer import new_checkpoint_folder, write_json, write_shards
from server.tools import corpus as corpus_mod
from server.tools.dev_model import MM_VOCAB, NUM_LAYERS, Preset, checkpoint_config_dict
from server.tools.dev_model import text_config_dict as preset_text_config
from server.tools.dev_tokenizer import DEV_TOKEN_IDS, text_pieces, write_dev_tokenizer

# The trained preset's shapes: E4B's topology, hidden 128, FFN 512 (E2B width 256), a 4,096-token
# vocabulary; about 11.5 M parameters, 23 MB in bfloat16.
TRAINED_PRESET = Preset(
    hidden=128,
    heads=4,
    kv_heads=1,
    head_dim=32,
    ffn=512,
    ple=16,
    laurel=16,
    text_vocab=4096,
    sliding_window=512,
    max_positions=8192,
    shards=1,
    seed=0,
)
KV_PRODUCERS = (18, 19)
_CONTROL = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class TrainPlan:
    """Everything that decides the trained weights (with the corpus and the torch build)."""

    seed: int = 16
    steps: int = 640
    batch: int = 8  # sequences per step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * this
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Share of the sequences' documents drawn from each source (by document, then packed).
    # WordNet is half chat (one-turn questions and answers), half dictionary entries.
    source_weights: dict[str, float] = field(
        default_factory=lambda: {
            "wordnet": 0.35,
            "web-bible": 0.15,
            "jargon": 0.08,
            "devil": 0.04,
            "python-docs": 0.18,
            "shakespeare": 0.20,
        }
    )
    official_share: float = 0.5  # else random nested widths and skips
    random_widths: tuple[int, ...] = (128, 192, 256, 320, 384, 448, 512)
    random_skip_p: float = 0.06
    checkpoint_every_s: float = 240.0
    # An earlier end: from step `cooldown_start` the learning rate falls linearly from the
    # cosine's value there to lr * min_lr_ratio over `cooldown_steps` steps, and the run ends.
    # Steps before it are those of the plan without a cooldown, so a run may be given one
    # while it runs (when the machine turns out slower than planned) and stay reproducible.
    cooldown_start: int | None = None
    cooldown_steps: int = 0

    @property
    def total_steps(self) -> int:
        if self.cooldown_start is None:
            return self.steps
        return min(self.steps, self.cooldown_start + self.cooldown_steps)


# ---- tokenizer and tokens ---------------------------------------------------------------------


def train_tokenizer(corpus_dir: Path, out: Path, vocab: int) -> Path:
    """The dev tokenizer's files with merges learned from the corpus's training split."""
    if (out / "tokenizer.json").is_file():
        return out
    counts: Counter[str] = Counter()
    for path in sorted((corpus_dir / "train").glob("*.jsonl")):
        for doc in corpus_mod.read_documents(path):
            for marker in _CONTROL:
                doc = doc.replace(marker, "")
            counts.update(text_pieces(doc))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_dev_tokenizer(tmp, vocab, counts)
    tmp.rename(out)
    return out


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def encode_documents(tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
    """Each document as `<bos> text` (+ `<eos>` after plain text; a chat ends at its turn end)."""
    out = []
    for doc, enc in zip(docs, tokenizer.encode_batch(list(docs)), strict=True):
        ids = enc.ids  # the post-processor has put <bos> first
        if not doc.endswith("<end_of_turn>\n"):
            ids = [*ids, DEV_TOKEN_IDS.eos]
        out.append(np.asarray(ids, dtype=np.uint16))
    return out


@dataclass
class TokenizedSource:
    tokens: np.ndarray  # all documents concatenated
    starts: np.ndarray  # document i is tokens[starts[i]:starts[i + 1]]

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]

    @property
    def count(self) -> int:
        return len(self.starts) - 1


def tokenize_split(corpus_dir: Path, tok_dir: Path, split: str, cache: Path) -> dict:
    """{source: TokenizedSource} for one split, cached as .npz files under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    out = {}
    for path in sorted((corpus_dir / split).glob("*.jsonl")):
        npz = cache / f"{split}-{path.stem}.npz"
        if not npz.is_file():
            tokenizer = tokenizer or load_tokenizer(tok_dir)
            docs = encode_documents(tokenizer, corpus_mod.read_documents(path))
            starts = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
            np.savez(npz.with_suffix(".tmp.npz"), tokens=np.concatenate(docs), starts=starts)
            npz.with_suffix(".tmp.npz").rename(npz)
        z = np.load(npz)
        out[path.stem] = TokenizedSource(z["tokens"], z["starts"])
    return out


# ---- batches and subnets (pure functions of seed and step) -------------------------------------


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, step, stream]))


def make_batch(plan: TrainPlan, sources: dict[str, TokenizedSource], step: int) -> np.ndarray:
    """[batch, seq_len + 1] token ids: documents drawn by source weight, packed end to end; a
    document longer than the room left starts at a random offset."""
    rng = step_rng(plan.seed, step, 0)
    names = [n for n in plan.source_weights if n in sources]
    p = np.array([plan.source_weights[n] for n in names], dtype=np.float64)
    p /= p.sum()
    need = plan.seq_len + 1
    rows = np.zeros((plan.batch, need), dtype=np.int64)
    for r in range(plan.batch):
        filled = 0
        while filled < need:
            src = sources[names[rng.choice(len(names), p=p)]]
            doc = src.doc(int(rng.integers(src.count)))
            room = need - filled
            if len(doc) > room:
                start = int(rng.integers(len(doc) - room + 1)) if filled == 0 else 0
                doc = doc[start : start + room]
            rows[r, filled : filled + len(doc)] = doc
            filled += len(doc)
    return rows


@dataclass(frozen=True)
class SubnetShape:
    """Per original layer: FFN width, or None where the layer is skipped."""

    name: str
    widths: tuple[int | None, ...]


def official_shapes(preset: Preset) -> list[SubnetShape]:
    """The official table's rows at this preset's widths (scaled as the serving table scales)."""
    from server.vocabulary.subnets import DEFAULT_TABLE_CSV, load_subnet_table
    from server.vocabulary.text_config import text_config_from_dict

    text = text_config_from_dict(preset_text_config(preset))
    table = load_subnet_table(text, DEFAULT_TABLE_CSV, None)
    return [
        SubnetShape(s.name, tuple(s.width_of(i) for i in range(NUM_LAYERS)))
        for s in table
        if s.official
    ]


def sample_subnet(
    plan: TrainPlan, official: Sequence[SubnetShape], step: int, full_width: int
) -> SubnetShape:
    """The step's second subnet: an official row other than "full", or random nested widths per
    layer with random skips (never 18 or 19)."""
    rng = step_rng(plan.seed, step, 1)
    rows = [s for s in official if s.name != "full"]
    if rng.random() < plan.official_share and rows:
        return rows[int(rng.integers(len(rows)))]
    widths: list[int | None] = []
    for layer in range(NUM_LAYERS):
        w = min(full_width, int(plan.random_widths[int(rng.integers(len(plan.random_widths)))]))
        skip = layer not in KV_PRODUCERS and rng.random() < plan.random_skip_p
        widths.append(None if skip else w)
    return SubnetShape("random", tuple(widths))


# ---- the model, with subnets ------------------------------------------------------------------


def build_model(preset: Preset, seed: int):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(seed)
    cfg = dict(preset_text_config(preset))
    cfg.pop("model_type")
    config = Gemma3nTextConfig(**cfg)
    config._attn_implementation = "sdpa"
    return Gemma3nForCausalLM(config)


def _sliced_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    k = self.concentric_width
    gate = F.linear(hidden_states, self.gate_proj.weight[:k])
    if self.activation_sparsity > 0.0:
        gate = self._gaussian_topk(gate)
    up = F.linear(hidden_states, self.up_proj.weight[:k])
    return F.linear(self.act_fn(gate) * up, self.down_proj.weight[:, :k])


def enable_subnets(model) -> Callable[[SubnetShape | None], None]:
    """Patch the model so a subnet can be chosen per forward; returns `use(shape)` (None: full)."""
    layers = model.model.layers
    for layer in layers:
        layer.mlp.concentric_width = layer.mlp.intermediate_size
        layer.mlp.forward = types.MethodType(_sliced_mlp_forward, layer.mlp)
        layer.concentric_skip = False
        inner = layer.forward

        def forward(hidden_states, *args, _inner=inner, _layer=layer, **kwargs):
            return (
                hidden_states if _layer.concentric_skip else _inner(hidden_states, *args, **kwargs)
            )

        layer.forward = forward

    def use(shape: SubnetShape | None) -> None:
        for i, layer in enumerate(layers):
            w = None if shape is None else shape.widths[i]
            layer.concentric_skip = shape is not None and w is None
            layer.mlp.concentric_width = layer.mlp.intermediate_size if w is None else w

    return use


def _loss(model, rows: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def lr_at(plan: TrainPlan, step: int) -> float:
    if plan.cooldown_start is not None and step >= plan.cooldown_start:
        start = _cosine_lr(plan, plan.cooldown_start)
        end = plan.lr * plan.min_lr_ratio
        done = (step - plan.cooldown_start + 1) / max(1, plan.cooldown_steps)
        return start + (end - start) * min(1.0, done)
    return _cosine_lr(plan, step)


def _cosine_lr(plan: TrainPlan, step: int) -> float:
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    t = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (
        plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    )


# ---- the run ----------------------------------------------------------------------------------


def _save_state(path: Path, model, opt, step: int, plan: TrainPlan) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "plan": asdict(plan)},
        tmp,
    )
    os.replace(tmp, path)


def _same_past(saved: dict, plan: TrainPlan, step: int) -> bool:
    """Whether `plan` took the same first `step` steps as the saved plan: equal but for a
    cooldown that starts at or after `step` (a saved plan may predate the cooldown fields)."""
    now = asdict(plan)
    cooldown = ("cooldown_start", "cooldown_steps")
    rest_equal = {k: v for k, v in saved.items() if k not in cooldown} == {
        k: v for k, v in now.items() if k not in cooldown
    }
    if saved.get("cooldown_start") is not None:
        return rest_equal and all(saved.get(k) == now[k] for k in cooldown)
    return rest_equal and (plan.cooldown_start is None or plan.cooldown_start >= step)


def train(
    work: Path,
    plan: TrainPlan,
    max_seconds: float | None = None,
    preset: Preset = TRAINED_PRESET,
    stop_at: int | None = None,
) -> Path:
    """Prepare what is missing under `work` and train until `plan.total_steps` (or `max_seconds`, or
    step `stop_at`), resuming from `work/run/state.pt`. Returns the state file.

    The weights after step n depend only on the plan, the preset, the corpus and the torch build
    (and its thread count), however often the run was stopped and resumed on the way."""
    work = Path(work)
    corpus_dir = work / "corpus"
    if not (corpus_dir / corpus_mod.MANIFEST).is_file():
        corpus_mod.prepare_corpus(corpus_dir, work)
    tok_dir = train_tokenizer(corpus_dir, work / "tokenizer", preset.text_vocab)
    sources = tokenize_split(corpus_dir, tok_dir, "train", work / "tokens")
    official = official_shapes(preset)

    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    state_path, log_path = run / "state.pt", run / "log.jsonl"
    model = build_model(preset, plan.seed)
    use = enable_subnets(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": plan.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=plan.lr,
        betas=(0.9, 0.95),
    )
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if not _same_past(state["plan"], plan, state["step"]):
            raise ValueError(f"{state_path} was written by a different plan; use another --work")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resuming at step {step}", file=sys.stderr)
    if log_path.is_file():  # drop log lines past the checkpoint (they will be redone)
        kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] < step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    model.train()
    t_start = time.monotonic()
    t_saved = t_start
    tokens_per_step = plan.batch * plan.seq_len
    with log_path.open("a") as log:
        while step < plan.total_steps:
            if max_seconds is not None and time.monotonic() - t_start > max_seconds:
                break
            if stop_at is not None and step >= stop_at:
                break
            t0 = time.monotonic()
            for group in opt.param_groups:
                group["lr"] = lr_at(plan, step)
            rows = torch.from_numpy(make_batch(plan, sources, step))
            shape = sample_subnet(plan, official, step, preset.ffn)
            opt.zero_grad(set_to_none=True)
            use(None)
            loss_full = _loss(model, rows)
            loss_full.backward()
            use(shape)
            loss_sub = _loss(model, rows)
            loss_sub.backward()
            use(None)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
            if not torch.isfinite(norm):
                raise FloatingPointError(f"step {step}: gradient norm {norm}")
            opt.step()
            step += 1
            rec = {
                "step": step - 1,
                "loss_full": round(loss_full.item(), 4),
                "loss_subnet": round(loss_sub.item(), 4),
                "subnet": shape.name,
                "lr": lr_at(plan, step - 1),
                "grad_norm": round(norm.item(), 3),
                "seconds": round(time.monotonic() - t0, 2),
                "tokens": step * tokens_per_step,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if time.monotonic() - t_saved > plan.checkpoint_every_s or step == plan.total_steps:
                _save_state(state_path, model, opt, step, plan)
                t_saved = time.monotonic()
                print(
                    f"step {step}/{plan.total_steps}: loss {rec['loss_full']:.3f} full, "
                    f"{rec['loss_subnet']:.3f} {shape.name}; saved",
                    file=sys.stderr,
                )
    _save_state(state_path, model, opt, step, plan)
    return state_path


# ---- writing the result -----------------------------------------------------------------------


def export_checkpoint(state_path: Path, tok_dir: Path, out: Path, name: str = "trained") -> Path:
    """The trained weights as a dev checkpoint in the real multimodal layout, bfloat16: the text
    decoder under `model.language_model.*`, the consumer layers' dead K/V (zeros, as Gemma 3n
    checkpoints carry them), the multimodal embedders (untrained, drawn from a fixed seed), the
    config files of `make-dev-model` and the corpus tokenizer."""
    p = TRAINED_PRESET
    state = torch.load(state_path, weights_only=False)["model"]
    bf16 = torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight" or not key.startswith("model."):
            continue
        if key.split(".")[-1] in ("embed_scale", "per_layer_projection_scale"):
            continue
        tensors["model.language_model." + key[len("model.") :]] = value
    kv_out = p.kv_heads * p.head_dim
    for layer in range(NUM_LAYERS - preset_text_config(p)["num_kv_shared_layers"], NUM_LAYERS):
        a = f"model.language_model.layers.{layer}.self_attn."
        tensors.setdefault(a + "k_proj.weight", torch.zeros(kv_out, p.hidden))
        tensors.setdefault(a + "v_proj.weight", torch.zeros(kv_out, p.hidden))
        tensors.setdefault(a + "k_norm.weight", torch.ones(p.head_dim))
    gen = torch.Generator().manual_seed(p.seed)
    for kind in ("vision", "audio"):
        e = f"model.embed_{kind}."
        std = 1 / math.sqrt(p.hidden)
        tensors[e + "embedding.weight"] = torch.randn(MM_VOCAB, p.hidden, generator=gen) * std
        tensors[e + "hard_embedding_norm.weight"] = torch.ones(p.hidden)
        tensors[e + "soft_embedding_norm.weight"] = torch.ones(p.hidden)
        tensors[e + "embedding_projection.weight"] = (
            torch.randn(p.hidden, p.hidden, generator=gen) * std
        )
    plan = [
        PlannedTensor(k, bf16, tuple(v.shape), lambda v=v: v.detach().to(bf16).contiguous())
        for k, v in sorted(tensors.items())
    ]
    with new_checkpoint_folder(out) as tmp:
        write_shards(tmp, [plan], f"trained dev model {name}", progress=False)
        write_json(tmp / "config.json", checkpoint_config_dict(name, p, "bfloat16"))
        ids = DEV_TOKEN_IDS
        write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": ids.bos,
                "eos_token_id": [ids.eos, ids.end_of_turn],
                "pad_token_id": 0,
            },
        )
        for f in sorted(tok_dir.iterdir()):
            shutil.copyfile(f, tmp / f.name)
    return out
