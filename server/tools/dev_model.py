"""Dev checkpoints: small random-weight Gemma 3n models in the exact real layout, made offline.

Owns the presets and the writer behind `concentric make-dev-model`. No model hub is reachable
from where this project is built and tested, so every test, demo and benchmark runs on these.

A dev checkpoint keeps E4B's topology and changes only sizes: 35 layers in the same 4-sliding /
1-full pattern, KV producers 18 and 19 and consumers 20..34, activation sparsity on layers 0..9,
4 AltUp streams, LAuReL, per-layer embeddings, and a full FFN width whose half is the E2B width
(as 8192 is half of 16384). The files are those of `google/gemma-3n-E4B-it`: a `Gemma3nConfig`
with `text_config`, tensors under `model.language_model.` in safetensors shards with an index,
the multimodal embedders `model.embed_vision.*` / `model.embed_audio.*` (the vision and audio
towers themselves are left out), a generation config and a tokenizer with Gemma's chat template.

Weights are random but scaled so that the model is not degenerate: activations keep unit-order
magnitudes through 35 layers, attention is neither uniform nor one-hot, logits spread by a few
units (greedy choices are not near-ties), and the FFN contributes enough that every subnet gives
visibly different text. Bytes are deterministic per preset (numpy's PCG64 stream, fixed order).

The same plan also writes the real E4B's sizes (`E4B`: 13.75 GB in bf16, the real checkpoint's
15.7 GB less its vision and audio towers) for measurements on an accelerator: there the values
come from a torch generator on the device (`TorchDraws`), in the checkpoint's dtype, in row
blocks, with the same scales; numpy on a CPU would take many minutes.

Deliberately does not know: how the model is run, or which subnets exist.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from server.checkpoint.shard import PlannedTensor
from server.checkpoint.writer import new_checkpoint_folder, write_json, write_shards
from server.tools.dev_tokenizer import DEV_TOKEN_IDS, write_dev_tokenizer

NUM_LAYERS = 35
NUM_KV_SHARED = 15
MM_VOCAB = 128  # ids per modality (vision, audio) after the text vocabulary, as in Gemma 3n
# Scales of the random weights (see `_tensor_plan`). They were chosen by measurement: with AltUp
# coefficients of std 0.2 the 35 stacked predict/correct steps amplify float32 rounding ~10^4x
# (float32 and float64 logits differed by 0.45), which turns greedy decoding into a coin toss
# between two correct implementations; at 0.05, with attention logits of std ~1 and post-norms of
# 0.5, they differ by ~4e-5 while each subnet still disagrees with the full model on most argmaxes.
ALTUP_COEF_STD = 0.05
ATTENTION_LOGIT_STD = 1.0
POST_NORM_SCALE = 0.5
ROUTER_SCALE = 0.7


@dataclass(frozen=True)
class Preset:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # full width; half of it is the nested "E2B" width
    ple: int  # per-layer-embedding width per layer
    laurel: int
    text_vocab: int
    sliding_window: int
    max_positions: int
    shards: int
    seed: int
    # The dev tokenizer's size when smaller than text_vocab (None: the same). At 262144 ids its
    # file is 58 MB and loads in tens of seconds; ids it lacks decode to nothing.
    tokenizer_vocab: int | None = None


PRESETS: dict[str, Preset] = {
    # Unit tests: ~10 MB, loads in milliseconds. A small window so short prompts cross it.
    "tiny": Preset(64, 4, 1, 16, 256, 16, 8, 512, 32, 2048, 2, 1),
    # The out-of-the-box demo: ~160 MB, tens of tokens per second on 2 CPU cores.
    "mini": Preset(256, 4, 1, 64, 1024, 32, 16, 4096, 512, 8192, 2, 2),
    # Benchmarks: ~640 MB, large enough that matrix work, not dispatch, dominates a CPU step.
    "bench": Preset(512, 8, 2, 64, 2048, 64, 32, 8192, 512, 8192, 4, 3),
    # `bench` with Gemma 3n's real text vocabulary (262144 ids, logits 262400 wide), so that the
    # LM head and the sampler weigh what they weigh on the real model: ~1.7 GB. Per-layer
    # embeddings are 16 wide rather than 64, or their table (262144 x 35 x width) alone would be
    # 2.3 GB; they are a row lookup per token, so the step costs nearly the same. The tokenizer
    # stays at bench's 8192 ids.
    "bench-262k": Preset(512, 8, 2, 64, 2048, 16, 32, 262144, 512, 8192, 4, 5, 8192),
}
# The real E4B's sizes (google/gemma-3n-E4B-it's text config). Not a `make-dev-model` preset: it is
# written only with `TorchDraws` on an accelerator (benchmarks/gpu_e4b.py).
E4B = Preset(2048, 8, 2, 256, 16384, 256, 64, 262144, 512, 32768, 4, 4)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def text_config_dict(p: Preset) -> dict:
    """The `text_config` of a preset, in transformers 5's field names."""
    return {
        "model_type": "gemma3n_text",
        "vocab_size": p.text_vocab + 2 * MM_VOCAB,
        "vocab_size_per_layer_input": p.text_vocab,
        "hidden_size": p.hidden,
        "hidden_size_per_layer_input": p.ple,
        "intermediate_size": [p.ffn] * NUM_LAYERS,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": p.sliding_window,
        "layer_types": [
            "full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(NUM_LAYERS)
        ],
        "final_logit_softcapping": 30.0,
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "altup_num_inputs": 4,
        "num_kv_shared_layers": NUM_KV_SHARED,
        "laurel_rank": p.laurel,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (NUM_LAYERS - 10),
        "pad_token_id": DEV_TOKEN_IDS.pad,
        "bos_token_id": DEV_TOKEN_IDS.bos,
        "eos_token_id": [DEV_TOKEN_IDS.eos, DEV_TOKEN_IDS.end_of_turn],
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def checkpoint_config_dict(name: str, p: Preset, dtype: str = "float32") -> dict:
    v = p.text_vocab
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text_config_dict(p),
        "vision_config": {
            "model_type": "gemma3n_vision",
            "hidden_size": p.hidden,
            "vocab_size": MM_VOCAB,
            "vocab_offset": v,
            "rms_norm_eps": 1e-6,
        },
        "audio_config": {
            "model_type": "gemma3n_audio",
            "hidden_size": p.hidden,
            "vocab_size": MM_VOCAB,
            "vocab_offset": v + MM_VOCAB,
            "rms_norm_eps": 1e-6,
        },
        "audio_soft_tokens_per_image": 188,
        "vision_soft_tokens_per_image": 256,
        "boi_token_id": DEV_TOKEN_IDS.start_of_image,
        "eoi_token_id": v,
        "image_token_id": v + 1,
        "boa_token_id": DEV_TOKEN_IDS.start_of_audio,
        "eoa_token_id": v + MM_VOCAB,
        "audio_token_id": v + MM_VOCAB + 1,
        "initializer_range": 0.02,
        "dtype": dtype,
        "tie_word_embeddings": True,
        "concentric_dev_preset": {"name": name, **asdict(p)},
    }


# ---- weights --------------------------------------------------------------------------------

Produce = Callable[[], torch.Tensor | Iterable[torch.Tensor]]


class Draws(Protocol):
    """Where a plan's values come from. Each method returns the tensor's `produce` callable; values
    are drawn only when the writer calls it, in plan order."""

    dtype: torch.dtype

    def normal(self, shape: tuple[int, ...], std: float) -> Produce: ...

    def around(self, shape: tuple[int, ...], center: float, spread: float) -> Produce: ...

    def embedding(
        self, shape: tuple[int, ...], std: float, first_copied: int, source_row: int
    ) -> Produce: ...


class NumpyDraws:
    """The presets' values: one PCG64 stream, float32, so the bytes depend only on the preset."""

    dtype = torch.float32

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def normal(self, shape: tuple[int, ...], std: float) -> Produce:
        return lambda: _f32(self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def around(self, shape: tuple[int, ...], center: float, spread: float) -> Produce:
        return lambda: _f32(
            np.float32(center)
            * (1.0 + np.float32(spread) * self.rng.uniform(-1.0, 1.0, shape).astype(np.float32))
        )

    def embedding(
        self, shape: tuple[int, ...], std: float, first_copied: int, source_row: int
    ) -> Produce:
        def make() -> torch.Tensor:
            e = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            e[first_copied:] = e[source_row]
            return _f32(e)

        return make


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class TorchDraws:
    """Values from a torch generator on `device`, converted to `dtype` there and handed to the
    writer in row blocks of about `block_bytes` (float32 while drawn), so neither the device nor
    the host ever holds more than a block of the 4.7 GB PLE table. Deterministic for one seed,
    device and block size; not the presets' bytes."""

    def __init__(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int,
        block_bytes: int = 256 * 1024**2,
    ):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPE_NAMES.values())}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.block_elems = max(1, block_bytes // 4)

    def _blocks(
        self, shape: tuple[int, ...], fill: Callable[[tuple[int, ...]], torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        per_row = math.prod(shape[1:])
        step = max(1, self.block_elems // max(1, per_row))
        for start in range(0, shape[0], step):
            yield start, fill((min(step, shape[0] - start), *shape[1:]))

    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)

    def _out(self, block: torch.Tensor) -> torch.Tensor:
        return block.to(self.dtype).cpu()

    def normal(self, shape: tuple[int, ...], std: float) -> Produce:
        def make() -> Iterator[torch.Tensor]:
            for _, block in self._blocks(shape, self._randn):
                yield self._out(block.mul_(std))

        return make

    def around(self, shape: tuple[int, ...], center: float, spread: float) -> Produce:
        def uniform(s: tuple[int, ...]) -> torch.Tensor:
            u = torch.rand(s, generator=self.gen, device=self.device, dtype=torch.float32)
            return u.mul_(2.0).sub_(1.0)  # U(-1, 1), as the presets draw

        def make() -> Iterator[torch.Tensor]:
            for _, block in self._blocks(shape, uniform):
                yield self._out(block.mul_(spread).add_(1.0).mul_(center))

        return make

    def embedding(
        self, shape: tuple[int, ...], std: float, first_copied: int, source_row: int
    ) -> Produce:
        def make() -> Iterator[torch.Tensor]:
            source: torch.Tensor | None = None
            for start, block in self._blocks(shape, self._randn):
                block.mul_(std)
                if source is None:
                    if source_row >= block.shape[0]:
                        raise ValueError("the copied row must lie in the first block")
                    source = block[source_row].clone()
                low = max(0, first_copied - start)
                if low < block.shape[0]:
                    block[low:] = source
                yield self._out(block)

        return make


def _tensor_plan(p: Preset, draws: Draws | np.random.Generator) -> list[PlannedTensor]:
    """Every tensor of the checkpoint, in file order, each with a deterministic generator.

    Values are drawn when the writer reaches a tensor, in plan order; with a numpy generator (the
    presets) from one PCG64 stream, so the bytes depend only on the preset.
    """
    if isinstance(draws, np.random.Generator):
        draws = NumpyDraws(draws)
    h, d, a = p.hidden, p.ple, 4
    q_out, kv_out = p.heads * p.head_dim, p.kv_heads * p.head_dim
    vocab = p.text_vocab + 2 * MM_VOCAB
    plan: list[PlannedTensor] = []

    def add(name: str, shape: tuple[int, ...], make: Callable[[tuple[int, ...]], Produce]):
        plan.append(PlannedTensor(name, draws.dtype, shape, make(shape)))

    def normal(std: float) -> Callable[[tuple[int, ...]], Produce]:
        return lambda shape: draws.normal(shape, std)

    def around(center: float, spread: float) -> Callable[[tuple[int, ...]], Produce]:
        # Norm weights and scales: positive, near `center`, never zero.
        return lambda shape: draws.around(shape, center, spread)

    def embedding(shape: tuple[int, ...]) -> Produce:
        # Logits are final-norm(h) . E[token]; |final-norm(h)| ~ sqrt(hidden), so std 4/sqrt(h)
        # spreads logits by ~4 (softcap 30). Rows past the text vocabulary copy the pad row, as
        # Google's converter does for the vision/audio ids.
        return draws.embedding(shape, 4.0 / math.sqrt(h), p.text_vocab, DEV_TOKEN_IDS.pad)

    t = "model.language_model."
    add(t + "embed_tokens.weight", (vocab, h), embedding)
    add(
        t + "embed_tokens_per_layer.weight",
        (p.text_vocab, NUM_LAYERS * d),
        normal(1 / math.sqrt(d)),
    )
    add(t + "per_layer_model_projection.weight", (NUM_LAYERS * d, h), normal(1 / math.sqrt(h)))
    add(t + "per_layer_projection_norm.weight", (d,), around(1.0, 0.2))
    for i in range(a - 1):
        add(f"{t}altup_projections.{i}.weight", (h, h), normal(1 / math.sqrt(h)))
    for i in range(a - 1):
        add(f"{t}altup_unembed_projections.{i}.weight", (h, h), normal(1 / math.sqrt(h)))
    add(t + "norm.weight", (h,), around(1.0, 0.2))

    # q.k is taken with scaling 1.0 over head_dim after RMS norms; norm weights of about
    # (s/sqrt(head_dim))^(1/2) give attention logits of std ~s: neither uniform nor one-hot.
    qk_norm = math.sqrt(ATTENTION_LOGIT_STD / math.sqrt(p.head_dim))
    for layer in range(NUM_LAYERS):
        L = f"{t}layers.{layer}."
        add(L + "self_attn.q_proj.weight", (q_out, h), normal(1 / math.sqrt(h)))
        # Consumer layers (20..34) keep their never-used k/v weights, as real checkpoints do.
        add(L + "self_attn.k_proj.weight", (kv_out, h), normal(1 / math.sqrt(h)))
        add(L + "self_attn.v_proj.weight", (kv_out, h), normal(1 / math.sqrt(h)))
        add(L + "self_attn.o_proj.weight", (h, q_out), normal(1 / math.sqrt(q_out)))
        add(L + "self_attn.q_norm.weight", (p.head_dim,), around(qk_norm, 0.1))
        add(L + "self_attn.k_norm.weight", (p.head_dim,), around(qk_norm, 0.1))
        add(L + "mlp.gate_proj.weight", (p.ffn, h), normal(1 / math.sqrt(h)))
        add(L + "mlp.up_proj.weight", (p.ffn, h), normal(1 / math.sqrt(h)))
        add(L + "mlp.down_proj.weight", (h, p.ffn), normal(1 / math.sqrt(p.ffn)))
        for norm in ("input_layernorm", "pre_feedforward_layernorm"):
            add(L + norm + ".weight", (h,), around(1.0, 0.2))
        for norm in (
            "post_attention_layernorm",
            "post_feedforward_layernorm",
            "post_per_layer_input_norm",
        ):
            add(L + norm + ".weight", (h,), around(POST_NORM_SCALE, 0.2))
        add(L + "altup.correct_output_scale", (h,), around(1.0, 0.3))
        add(L + "altup.correction_coefs.weight", (a, a), normal(ALTUP_COEF_STD))
        add(L + "altup.prediction_coefs.weight", (a * a, a), normal(ALTUP_COEF_STD))
        # The router sees router_norm(x) / hidden: weights of ~sqrt(hidden) put its tanh in
        # the responsive range rather than at 0.
        add(L + "altup.modality_router.weight", (a, h), normal(ROUTER_SCALE * math.sqrt(h)))
        add(L + "altup.router_norm.weight", (h,), around(1.0, 0.2))
        add(L + "laurel.linear_left.weight", (p.laurel, h), normal(1 / math.sqrt(h)))
        add(L + "laurel.linear_right.weight", (h, p.laurel), normal(1 / math.sqrt(p.laurel)))
        add(L + "laurel.post_laurel_norm.weight", (h,), around(1.0, 0.2))
        add(L + "per_layer_input_gate.weight", (d, h), normal(1 / math.sqrt(h)))
        add(L + "per_layer_projection.weight", (h, d), normal(1 / math.sqrt(d)))

    # The multimodal embedders are part of the real layout (the towers are not written).
    for kind in ("vision", "audio"):
        e = f"model.embed_{kind}."
        add(e + "embedding.weight", (MM_VOCAB, h), normal(1 / math.sqrt(h)))
        add(e + "hard_embedding_norm.weight", (h,), around(1.0, 0.2))
        add(e + "soft_embedding_norm.weight", (h,), around(1.0, 0.2))
        add(e + "embedding_projection.weight", (h, h), normal(1 / math.sqrt(h)))
    return plan


def _split(plan: list[PlannedTensor], shards: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of roughly equal bytes, in plan order."""
    total = sum(t.nbytes for t in plan)
    target = total / shards
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if groups[-1] and size + t.nbytes / 2 > target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(t)
        size += t.nbytes
    return groups


def make_dev_model(preset: str, out: str | Path, progress: bool = True) -> Path:
    """Write the preset's checkpoint into `out` (created; must be empty or absent)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    draws = NumpyDraws(np.random.Generator(np.random.PCG64(p.seed)))
    return write_dev_checkpoint(out, preset, p, draws, p.tokenizer_vocab, progress=progress)


def write_dev_checkpoint(
    out: str | Path,
    name: str,
    p: Preset,
    draws: Draws,
    tokenizer_vocab: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a checkpoint of shapes `p` with values from `draws` (in `draws.dtype`) into `out`.

    `tokenizer_vocab` (default: the model's text vocabulary) sizes the dev tokenizer alone: at
    E4B's 262144 its file is 58 MB and takes tens of seconds to load, while random weights need
    only that every id fits the model (a smaller tokenizer decodes the ids it lacks to nothing).
    """
    with new_checkpoint_folder(out) as tmp:
        plan = _tensor_plan(p, draws)
        write_shards(tmp, _split(plan, p.shards), f"dev model {name}", progress)
        _write_config_files(tmp, name, p, draws, tokenizer_vocab)
    return Path(out)


def _write_config_files(
    tmp: Path, name: str, p: Preset, draws: Draws, tokenizer_vocab: int | None
) -> None:
    write_json(tmp / "config.json", checkpoint_config_dict(name, p, _DTYPE_NAMES[draws.dtype]))
    ids = DEV_TOKEN_IDS
    # As google/gemma-3n-E4B-it's: the eos ids, and the sampling defaults a server applies to
    # requests that leave them unset (vLLM's rule; server/vocabulary/sampling_defaults.py).
    write_json(
        tmp / "generation_config.json",
        {
            "bos_token_id": ids.bos,
            "do_sample": True,
            "eos_token_id": [ids.eos, ids.end_of_turn],
            "pad_token_id": ids.pad,
            "top_k": 64,
            "top_p": 0.95,
        },
    )
    write_dev_tokenizer(tmp, tokenizer_vocab or p.text_vocab)


def dev_model_cache(preset: str = "mini", cache_dir: str | Path | None = None) -> Path:
    """The preset's checkpoint in the cache folder, made on first use.

    The cache is `$CONCENTRIC_CACHE`, else `~/.cache/concentric`."""
    import os

    root = Path(
        cache_dir or os.environ.get("CONCENTRIC_CACHE") or Path.home() / ".cache" / "concentric"
    )
    folder = root / f"dev-{preset}"
    if not (folder / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        make_dev_model(preset, folder)
    return folder


# The trained dev model (server/tools/training.py, packaged by server/tools/trained_preset.py),
# committed with the repository: what `concentric serve` and the CLI use when no checkpoint is
# given. The random presets above stay for tests and benchmarks.
TRAINED_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "dev-trained"


def default_dev_checkpoint() -> Path:
    """The trained dev model; the random `mini` preset where it is absent (an installed wheel
    carries no `models/` folder)."""
    if (TRAINED_CHECKPOINT / "config.json").is_file():
        return TRAINED_CHECKPOINT
    return dev_model_cache("mini")
