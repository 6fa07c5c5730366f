"""The Gemma 3n text decoder as plain PyTorch, with the subnet of every sequence an explicit input.

Owns the forward math, top to bottom as transformers' `Gemma3nForCausalLM` computes it (its
operation order is kept so that float32 results agree to rounding):

    embed -> per-layer inputs (PLE) -> 4 AltUp streams -> for each layer:
        predict streams -> norm -> LAuReL + attention -> FFN -> correct streams -> PLE injection
    -> merge streams -> final norm -> tied LM head -> softcap

One call runs many sequences of many subnets (`ForwardBatch`). Per layer, only the rows of
subnets that keep the layer take part (the others pass through untouched: a skipped layer is the
identity on all four streams); attention, norms, AltUp and LAuReL run over those rows together;
the FFN runs per width on views of the one weight copy ("grouped"), or once at the widest width
with each row masked to its own ("masked": exact, because masked hidden units add nothing
through `down`, and the sparsity statistics of layers 0..9 exclude the masked columns).

Layers from `first_kv_shared_layer` on (20..34 in E4B) write no KV, so they run only for the rows
whose logits are wanted: a prefill's other positions stop after layer 19 (prefill early exit).

Deliberately does not know: sampling, block allocation, tokenizers, or where requests come from.
Speed-ups (compile, CUDA graphs) wrap this from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from server.runtime.batch import ForwardBatch
from server.runtime.kv_cache import KVCache
from server.runtime.step_context import LayerRows, StepContext
from server.runtime.weights import LayerWeights, Weights
from server.vocabulary.compute import FFN_MODES, check_choice

# ---- small pieces, as the model defines them ------------------------------------------------


def widened(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (16-bit activations are widened; float64 reference runs are not
    narrowed)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 3n RMSNorm: no `1 + w` offset; computed in (at least) float32 and cast back."""
    if widened(x) is not x:
        w = None if weight is None else weight.float()
        return rms_norm(x.float(), w, eps).type_as(x)
    y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return y if weight is None else y * weight


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def sparsity_multiplier(p: float, dtype: torch.dtype) -> torch.Tensor:
    """z = Phi^-1(p), computed as transformers does (in float32, then cast)."""
    z = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p, dtype=torch.float32))
    return z.type(dtype)


def rescale_to(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """Scale x to the RMS magnitude `target_rms` (AltUp stream expansion and merge)."""
    magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target_rms / magnitude


# ---- the model --------------------------------------------------------------------------------


class Gemma3nModel:
    """The elastic text decoder over one set of weights. Stateless between calls."""

    def __init__(self, weights: Weights, ffn_mode: str = "grouped"):
        check_choice("ffn_mode", ffn_mode, FFN_MODES)
        self.w = weights
        self.text = weights.text
        self.ffn_mode = ffn_mode
        t = self.text
        self.z = {
            i: sparsity_multiplier(p, weights.dtype)
            for i, p in enumerate(t.activation_sparsity_pattern)
            if p > 0
        }

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv: KVCache, ffn_mode: str | None = None
    ) -> torch.Tensor:
        """Logits [M, vocab] for `batch.logits_rows`, writing this step's K/V into `kv`."""
        t, w = self.text, self.w
        ctx = StepContext(t, batch, w.dtype)
        mode = ffn_mode or self.ffn_mode

        # Embeddings: the token embedding scaled by sqrt(hidden) in the weight dtype, and the
        # per-layer inputs for every layer (chunk l of a row belongs to original layer l).
        h0 = w.embed[batch.input_ids] * torch.tensor(t.hidden_size**0.5, dtype=w.dtype)
        ple = self.per_layer_inputs(batch.input_ids, h0)  # [N, L, d]

        # AltUp: stream 0 is the embedding, streams 1..3 projections of it at its magnitude.
        target = torch.mean(h0**2, dim=-1, keepdim=True) ** 0.5
        streams = torch.stack(
            [h0] + [rescale_to(h0 @ p.T, target) for p in w.altup_projections]
        )  # [A, N, H]

        for layer in range(t.num_hidden_layers):
            phase = 0 if t.owns_kv(layer) else 1
            if layer == t.first_kv_shared_layer:
                # Prefill early exit: KV consumers write nothing, so only rows whose logits are
                # wanted go on.
                streams = streams[:, batch.logits_rows]
            keep = tuple(seg.subnet.keeps(layer) for seg in batch.segments)
            if not any(keep):
                continue
            lr = ctx.layer_rows(phase, keep)
            if lr.index is None:
                streams = self.decoder_layer(layer, streams, lr, ple[lr.rows, layer], ctx, kv, mode)
            else:
                sub = self.decoder_layer(
                    layer, streams[:, lr.index], lr, ple[lr.rows, layer], ctx, kv, mode
                )
                streams = streams.index_copy(1, lr.index, sub)
        if t.first_kv_shared_layer >= t.num_hidden_layers:
            streams = streams[:, batch.logits_rows]

        # Merge the streams back: 1..3 are unembedded and rescaled to stream 0's magnitude.
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        merged = [streams[0]] + [
            rescale_to(streams[i + 1] @ p.T, target) for i, p in enumerate(w.altup_unembed)
        ]
        hidden = rms_norm(torch.stack(merged).mean(dim=0), w.final_norm, t.rms_norm_eps)
        logits = hidden @ w.lm_head.T
        if t.final_logit_softcapping is not None:
            cap = t.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def per_layer_inputs(self, ids: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        t, w = self.text, self.w
        n, d = t.num_hidden_layers, t.hidden_size_per_layer_input
        table = w.ple_rows(ids) * torch.tensor(d**0.5, dtype=w.dtype)
        table = table.reshape(-1, n, d)
        proj = h0 @ w.ple_model_projection.T
        proj = proj * torch.tensor(t.hidden_size**-0.5, dtype=w.dtype)
        proj = rms_norm(proj.reshape(-1, n, d), w.ple_projection_norm, t.rms_norm_eps)
        return (proj + table) * torch.rsqrt(torch.tensor(2.0)).to(w.dtype)

    # ---- one decoder layer ------------------------------------------------------------------

    def decoder_layer(
        self,
        layer: int,
        streams: torch.Tensor,
        lr: LayerRows,
        ple_input: torch.Tensor,
        ctx: StepContext,
        kv: KVCache,
        mode: str,
    ) -> torch.Tensor:
        """One layer over the rows `lr` whose four streams are `streams` [A, R, H]."""
        t, lw = self.text, self.w.layers[layer]
        eps = t.rms_norm_eps

        predictions = self.altup_predict(lw, streams)
        active = predictions[t.altup_active_idx]
        x = rms_norm(active, lw.input_norm, eps)
        laurel = x + rms_norm(x @ lw.laurel_left.T @ lw.laurel_right.T, lw.laurel_norm, eps)
        attn = rms_norm(self.attention(layer, lw, x, lr, ctx, kv), lw.post_attention_norm, eps)
        h = (active + attn + laurel) / math.sqrt(2)

        ffn = self.ffn(layer, rms_norm(h, lw.pre_ffn_norm, eps), lr, ctx, mode)
        h = h + rms_norm(ffn, lw.post_ffn_norm, eps)
        corrected = self.altup_correct(lw, predictions, h)

        # Per-layer input: gate stream 0 (scaled), multiply by this layer's PLE, project back,
        # and add to streams 1..3 only.
        g = corrected[t.altup_active_idx]
        if t.altup_correct_scale:
            g = g * lw.altup_correct_scale
        g = gelu(g @ lw.ple_gate.T) * ple_input
        g = rms_norm(g @ lw.ple_projection.T, lw.ple_post_norm, eps)
        corrected[1:] += g
        return corrected

    def altup_router(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        t = self.text
        routed = (
            rms_norm(x, lw.altup_router_norm, t.rms_norm_eps) * (1.0 / t.hidden_size)
        ) @ lw.altup_router.T
        return torch.tanh(widened(routed)).type_as(x)

    def altup_predict(self, lw: LayerWeights, streams: torch.Tensor) -> torch.Tensor:
        a = self.text.altup_num_inputs
        modalities = self.altup_router(lw, streams[self.text.altup_active_idx])
        coefs = (modalities @ lw.altup_prediction_coefs.T).reshape(-1, a, a).transpose(1, 2)
        predictions = torch.matmul(streams.permute(1, 2, 0), coefs).permute(2, 0, 1)  # [A, R, H]
        return (predictions + streams).contiguous()

    def altup_correct(
        self, lw: LayerWeights, predictions: torch.Tensor, activated: torch.Tensor
    ) -> torch.Tensor:
        modalities = self.altup_router(lw, activated)
        innovation = activated - predictions[self.text.altup_active_idx]
        coefs = (modalities @ lw.altup_correction_coefs.T + 1.0).T[:, :, None]  # [A, R, 1]
        return innovation[None] * coefs + predictions

    def attention(
        self,
        layer: int,
        lw: LayerWeights,
        x: torch.Tensor,
        lr: LayerRows,
        ctx: StepContext,
        kv: KVCache,
    ) -> torch.Tensor:
        t = self.text
        heads, kv_heads, dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        kind = t.layer_types[layer]
        rows = lr.rows
        cos, sin = ctx.rope_rows(lr, kind)

        q = rms_norm((x @ lw.q_proj.T).view(-1, heads, dim), lw.q_norm, t.rms_norm_eps)
        q = q * cos + rotate_half(q) * sin  # [R, heads, dim]

        source = t.kv_source(layer)  # itself, or the producer (18/19) for a consumer layer
        if source == layer:
            k = rms_norm((x @ lw.k_proj.T).view(-1, kv_heads, dim), lw.k_norm, t.rms_norm_eps)
            k = k * cos + rotate_half(k) * sin
            v = rms_norm((x @ lw.v_proj.T).view(-1, kv_heads, dim), None, t.rms_norm_eps)
            slots = self.slots(
                ctx.batch, source, ctx.batch.row_seq[rows], ctx.batch.positions[rows]
            )
            kv.k[slots] = k
            kv.v[slots] = v

        groups = ctx.attention_groups(lr, kind)
        read_key = (source, lr.key, kind)
        reads = ctx.consumer_reads.get(read_key) if source != layer else None
        if reads is None:
            reads = []
            for g in groups:
                slots = self.slots(ctx.batch, source, g.seqs[:, None], g.key_pos)  # [G, K]
                reads.append((kv.k[slots].permute(0, 2, 1, 3), kv.v[slots].permute(0, 2, 1, 3)))
            if source != layer:
                ctx.consumer_reads[read_key] = reads

        out = torch.empty(rows.numel(), heads * dim, dtype=x.dtype, device=x.device)
        rep = heads // kv_heads
        for g, (keys, values) in zip(groups, reads, strict=True):  # keys: [G, kv_heads, K, dim]
            n_seq, q_len = g.q_index.shape
            # Grouped-query attention without copying K/V: the `rep` query heads that share a
            # KV head are folded into the query-length axis.
            qg = q[g.q_index].view(n_seq, q_len, kv_heads, rep, dim).permute(0, 2, 3, 1, 4)
            qg = qg.reshape(n_seq, kv_heads, rep * q_len, dim)
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask, scale=1.0)
            o = o.view(n_seq, kv_heads, rep, q_len, dim).permute(0, 3, 1, 2, 4)
            o = o.reshape(n_seq, q_len, heads * dim)
            out[g.q_index[g.q_valid]] = o[g.q_valid]
        return out @ lw.o_proj.T

    @staticmethod
    def slots(
        batch: ForwardBatch, layer: int, seqs: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """KV slot of (sequence, position) pairs in `layer`'s blocks."""
        bs = batch.block_size
        blocks = batch.block_tables[seqs, layer, positions // bs]
        return blocks.clamp(min=0) * bs + positions % bs

    # ---- the elastic FFN --------------------------------------------------------------------

    def ffn(
        self, layer: int, x: torch.Tensor, lr: LayerRows, ctx: StepContext, mode: str
    ) -> torch.Tensor:
        layer_widths = tuple(seg.subnet.width_of(layer) for seg in ctx.batch.segments)
        widths = ctx.widths(lr, layer_widths)  # [(width, row indices or None)]
        if len(widths) == 1:
            return self.ffn_at_width(layer, x, widths[0][0])
        if mode == "grouped":
            out = torch.empty_like(x)
            for width, idx in widths:
                out[idx] = self.ffn_at_width(layer, x[idx], width)
            return out
        return self.ffn_masked(layer, x, widths)

    def ffn_at_width(self, layer: int, x: torch.Tensor, width: int) -> torch.Tensor:
        gate_w, up_w, down_w = self.w.ffn(layer, width)
        gate = x @ gate_w.T
        if layer in self.z:
            # Gaussian top-k: keep what lies above mean + z*std of THIS width's gate outputs.
            mean = torch.mean(gate, dim=-1, keepdim=True)
            std = torch.std(gate, dim=-1, keepdim=True, unbiased=False)
            gate = F.relu(gate - (mean + std * self.z[layer]))
        return (gelu(gate) * (x @ up_w.T)) @ down_w.T

    def ffn_masked(
        self, layer: int, x: torch.Tensor, widths: list[tuple[int, torch.Tensor | None]]
    ) -> torch.Tensor:
        top = max(wd for wd, _ in widths)
        gate_w, up_w, down_w = self.w.ffn(layer, top)
        row_width = torch.empty(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for wd, idx in widths:
            row_width[idx] = wd
        keep = torch.arange(top, device=x.device)[None, :] < row_width  # [R, top]
        gate = x @ gate_w.T
        if layer in self.z:
            kept = gate * keep
            mean = kept.sum(-1, keepdim=True) / row_width
            var = ((gate - mean) * keep).pow(2).sum(-1, keepdim=True) / row_width
            gate = F.relu(gate - (mean + var.sqrt() * self.z[layer]))
        hidden = gelu(gate) * (x @ up_w.T) * keep
        return hidden @ down_w.T
