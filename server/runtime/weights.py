"""Compute-ready weights of the text decoder, and the per-subnet FFN views into them.

Owns: taking tensors from the host store into the compute dtype and device ONCE, and handing out
views. When the stored dtype is the compute dtype and the device is the CPU, every tensor here is
the store's memory-mapped view: the process holds one copy of the checkpoint (the page cache's).
When a conversion is needed (bf16 on disk, float32 compute), it is made once per tensor at load
and shared by every subnet, never per subnet. On a CPU with `huge_pages`, every tensor here is
instead copied once, in the compute dtype, into one huge-page arena (huge_pages.py: a step reads
its weights faster through 2 MiB pages than through the page cache's 4 KiB ones); the FFN
residency then takes its views of those copies.

A subnet's FFN for layer l at width k is `gate[:k]`, `up[:k]` (contiguous row prefixes) and
`down[:, :k]` (a strided column prefix that BLAS takes through its leading dimension): views of
the one copy, whatever the number of subnets served.

The per-layer-embedding table stays where the store mapped it (host memory, stored dtype): only
the rows of the tokens in a batch are gathered, converted and moved, per step.

Deliberately does not know: subnets' names or validity, batching, or the forward math.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.checkpoint.store import CheckpointStore
from server.runtime.device import on_device
from server.runtime.huge_pages import HugePageArena, unavailable
from server.runtime.residency import FfnResidency, PendingResize, ResizeReport
from server.vocabulary.text_config import TextConfig


@dataclass
class LayerWeights:
    q_proj: torch.Tensor
    k_proj: torch.Tensor | None  # None for KV-consumer layers: never loaded
    v_proj: torch.Tensor | None
    o_proj: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor | None
    gate: torch.Tensor  # [full_width, hidden]
    up: torch.Tensor  # [full_width, hidden]
    down: torch.Tensor  # [hidden, full_width]
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    pre_ffn_norm: torch.Tensor
    post_ffn_norm: torch.Tensor
    altup_correct_scale: torch.Tensor
    altup_correction_coefs: torch.Tensor
    altup_prediction_coefs: torch.Tensor
    altup_router: torch.Tensor
    altup_router_norm: torch.Tensor
    laurel_left: torch.Tensor
    laurel_right: torch.Tensor
    laurel_norm: torch.Tensor
    ple_gate: torch.Tensor
    ple_projection: torch.Tensor
    ple_post_norm: torch.Tensor


class Weights:
    def __init__(
        self,
        store: CheckpointStore,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        private_ffn: bool | None = None,
        huge_pages: bool = False,
    ):
        self.store = store
        self.text: TextConfig = store.text
        self.device = torch.device(device)
        embed_name = "embed_tokens.weight"
        self.stored_dtype = store.dtype(store.config.text_prefix + embed_name)
        self.dtype = dtype or self.stored_dtype
        self.arena = self._arena() if huge_pages and self.device.type == "cpu" else None
        get = self._load

        self.embed = get(embed_name)
        self.lm_head = (
            self.embed
            if self.text.tie_word_embeddings
            else self._place(store.tensor("lm_head.weight"))
        )
        # Host-resident, stored dtype: rows are gathered per step (see module docstring).
        self.ple_table = store.text_tensor("embed_tokens_per_layer.weight")
        self._ple_staging: torch.Tensor | None = None  # pinned, for the host->device copy
        self._ple_copied: torch.cuda.Event | None = None  # the last copy out of it
        self.ple_model_projection = get("per_layer_model_projection.weight")
        self.ple_projection_norm = get("per_layer_projection_norm.weight")
        n_streams = self.text.altup_num_inputs
        self.altup_projections = [
            get(f"altup_projections.{i}.weight") for i in range(n_streams - 1)
        ]
        self.altup_unembed = [
            get(f"altup_unembed_projections.{i}.weight") for i in range(n_streams - 1)
        ]
        self.final_norm = get("norm.weight")
        # FFN rows live in resident buffers (residency.py): views of the mapping on a CPU in the
        # stored dtype, or of the arena's copies (already in the compute dtype), the device's own
        # copies otherwise (or when asked, e.g. by tests).
        if private_ffn is None:
            private_ffn = self.device.type != "cpu" or (
                self.dtype != self.stored_dtype and self.arena is None
            )
        host = self._host
        host_ffn = [
            tuple(host(f"layers.{i}.mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
            for i in range(self.text.num_hidden_layers)
        ]
        self.residency = FfnResidency(host_ffn, self.device, self.dtype, private_ffn)
        self.layers = [self._layer(i) for i in range(self.text.num_hidden_layers)]
        self.residency.on_replace = self._replace_ffn
        self._check_altup_clip()

    def _arena(self) -> HugePageArena | None:
        """An arena for every text tensor but the PLE table, in the compute dtype (tensors never
        loaded, such as KV-consumer layers' K/V projections, leave pages that are never touched,
        which cost nothing); None, with a warning, where the kernel has no huge pages."""
        reason = unavailable()
        if reason is not None:
            warnings.warn(f"huge_pages: {reason}; the weights stay in 4 KiB pages", stacklevel=3)
            return None
        prefix, itemsize = self.store.config.text_prefix, self.dtype.itemsize
        skip = prefix + "embed_tokens_per_layer.weight"
        names = [n for n in self.store.names() if n.startswith(prefix) and n != skip]
        names += ["lm_head.weight"] if "lm_head.weight" in self.store else []
        return HugePageArena.for_sizes([math.prod(self.store.shape(n)) * itemsize for n in names])

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if self.arena is not None:
            return self.arena.copy(t, self.dtype)
        if t.dtype == self.dtype and t.device == self.device:
            return t  # the store's zero-copy view
        return t.to(device=self.device, dtype=self.dtype)

    def _host(self, relative: str) -> torch.Tensor:
        """A tensor as host memory holds it for the FFN residency: the arena's copy, or the
        store's view."""
        t = self.store.text_tensor(relative)
        return t if self.arena is None else self._place(t)

    def _load(self, relative: str) -> torch.Tensor:
        return self._place(self.store.text_tensor(relative))

    def _layer(self, i: int) -> LayerWeights:
        def get(name: str) -> torch.Tensor:
            return self._load(f"layers.{i}.{name}")

        owns_kv = self.text.owns_kv(i)
        return LayerWeights(
            q_proj=get("self_attn.q_proj.weight"),
            k_proj=get("self_attn.k_proj.weight") if owns_kv else None,
            v_proj=get("self_attn.v_proj.weight") if owns_kv else None,
            o_proj=get("self_attn.o_proj.weight"),
            q_norm=get("self_attn.q_norm.weight"),
            k_norm=get("self_attn.k_norm.weight") if owns_kv else None,
            gate=self.residency.buffers[i][0],
            up=self.residency.buffers[i][1],
            down=self.residency.buffers[i][2],
            input_norm=get("input_layernorm.weight"),
            post_attention_norm=get("post_attention_layernorm.weight"),
            pre_ffn_norm=get("pre_feedforward_layernorm.weight"),
            post_ffn_norm=get("post_feedforward_layernorm.weight"),
            altup_correct_scale=get("altup.correct_output_scale"),
            altup_correction_coefs=get("altup.correction_coefs.weight"),
            altup_prediction_coefs=get("altup.prediction_coefs.weight"),
            altup_router=get("altup.modality_router.weight"),
            altup_router_norm=get("altup.router_norm.weight"),
            laurel_left=get("laurel.linear_left.weight"),
            laurel_right=get("laurel.linear_right.weight"),
            laurel_norm=get("laurel.post_laurel_norm.weight"),
            ple_gate=get("per_layer_input_gate.weight"),
            ple_projection=get("per_layer_projection.weight"),
            ple_post_norm=get("post_per_layer_input_norm.weight"),
        )

    def _check_altup_clip(self) -> None:
        # transformers 4.x clamped the correction coefficients IN PLACE on every call; 5.x (our
        # oracle) uses them as stored outside training. We never write into shared weights, so
        # we follow 5.x and only say so when the clamp would have mattered.
        clip = self.text.altup_coef_clip
        if clip is None:
            return
        over = [i for i, w in enumerate(self.layers) if w.altup_correction_coefs.abs().max() > clip]
        if over:
            warnings.warn(
                f"AltUp correction coefficients exceed ±{clip} in layers {over}; using them "
                "unclamped, as transformers 5 does at inference",
                stacklevel=2,
            )

    # ---- subnet views -----------------------------------------------------------------------

    def ffn(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate, up and down of `layer` at FFN width `width`: views, never copies."""
        return self.residency.view(layer, width)

    # ---- resident FFN widths (what elasticity drives: server/engine/elasticity.py) ------------

    @property
    def full_widths(self) -> tuple[int, ...]:
        return self.residency.full

    @property
    def resident_widths(self) -> tuple[int, ...]:
        return self.residency.widths

    @property
    def resident_bytes(self) -> int:
        return self.residency.resident_bytes

    @property
    def ffn_generation(self) -> int:
        """Changes whenever a resize replaces resident FFN buffers (residency.py)."""
        return self.residency.generation

    def bytes_for(self, widths) -> int:
        return self.residency.bytes_for(widths)

    def transient_bytes(self, widths) -> int:
        return self.residency.transient_bytes(widths)

    def resize_ffn(self, widths) -> ResizeReport:
        """Change the resident FFN widths now (between steps only)."""
        return self.commit_ffn(self.residency.prepare(widths, background=False))

    def prepare_ffn(self, widths, background: bool = True) -> PendingResize:
        """Build buffers for new widths, in the background by default (see residency.py)."""
        return self.residency.prepare(widths, background=background)

    def abandon_ffn(self, pending: PendingResize) -> None:
        """Drop a prepared resize (waits for its background build to end)."""
        self.residency.abandon(pending)

    def commit_ffn(self, pending: PendingResize) -> ResizeReport:
        """Swap prepared FFN buffers in (between steps only)."""
        return self.residency.commit(pending)

    def release_cached(self) -> None:
        """Give freed device memory back to the device (PyTorch caches it otherwise)."""
        self.residency.release_cached()

    def _replace_ffn(self, i: int, buffers) -> None:
        # The layer's references follow its buffers, so nothing here holds replaced ones alive.
        layer = self.layers[i]
        layer.gate, layer.up, layer.down = buffers

    def ple_rows(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Per-layer-embedding rows for `token_ids`, gathered from host memory: [N, L*d].

        Ids outside the PLE vocabulary (vision/audio placeholders) read row 0, as transformers
        does: decided here, on the host, where the ids are (no tensor ops for it)."""
        size = self.text.vocab_size_per_layer_input
        ids = torch.tensor([i if 0 <= i < size else 0 for i in token_ids], dtype=torch.long)
        if self.device.type != "cuda":
            return self.ple_table.index_select(0, ids).to(dtype=self.dtype)
        # Gather into a reusable pinned buffer, so the copy to the device is asynchronous (it
        # overlaps the embedding and the first layers' work instead of stalling the step). The
        # previous step's copy may still be reading it: wait for that copy's event first.
        n, width = ids.numel(), self.ple_table.shape[1]
        if self._ple_copied is not None:
            self._ple_copied.synchronize()
        with on_device(self.device):
            if self._ple_staging is None or self._ple_staging.shape[0] < n:
                # A normal tensor, though eager steps (inference mode) make it: compiled steps
                # (no_grad) gather into it too, and an inference tensor refuses in-place writes
                # outside inference mode (the first H200 run: every compiled step failed so).
                with torch.inference_mode(False):
                    self._ple_staging = torch.empty(
                        (max(n, 256), width), dtype=self.ple_table.dtype, pin_memory=True
                    )
            staged = self._ple_staging[:n]
            torch.index_select(self.ple_table, 0, ids, out=staged)
            rows = staged.to(device=self.device, dtype=self.dtype, non_blocking=True)
            self._ple_copied = torch.cuda.Event()
            self._ple_copied.record(torch.cuda.current_stream(self.device))
        return rows
