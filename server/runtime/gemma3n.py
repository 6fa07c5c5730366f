"""The Gemma 3n text decoder as plain PyTorch, with the subnet of every sequence an explicit input.

Owns the forward math, top to bottom as transformers' `Gemma3nForCausalLM` computes it (the same
operations, so float32 results agree to rounding):

    embed -> per-layer inputs (PLE) -> 4 AltUp streams -> for each layer:
        predict streams -> norm -> LAuReL + attention -> FFN -> correct streams -> PLE injection
    -> merge streams -> final norm -> tied LM head -> softcap

One call runs many sequences of many subnets (`ForwardBatch`, batch.py, which planned which rows
run each layer and how). A subnet that skips a layer leaves its rows untouched there (a skipped
layer is the identity on all four streams); attention, norms, AltUp and LAuReL run over the rows
together; the FFN runs per width on views of the one weight copy, or once at the widest width
with each row masked to its own (exact: masked hidden units add nothing through `down`, and the
sparsity statistics of layers 0..9 exclude the masked columns, computed in float32).

Layers from `first_kv_shared_layer` on (20..34 in E4B) write no KV, so they run only for the rows
whose logits are wanted: a prefill's other positions stop after layer 19 (prefill early exit).

The four AltUp streams are kept row-major, [rows, 4, hidden], so predicting and correcting them
is one batched matrix product per layer. Everything constant (scales, the router's 1/hidden, the
rotation that rotary embedding applies) is prepared once at load; nothing in the layer loop
creates a tensor from Python data or reads a device value back.

Deliberately does not know: sampling, block allocation, tokenizers, or where requests come from.
Speed-ups (compile, CUDA graphs) wrap this from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.runtime.batch import (
    AttentionGroup,
    FfnPlan,
    ForwardBatch,
    LayerRows,
    PlannedStep,
    materialize,
    upload,
)
from server.runtime.kv_cache import KVCache
from server.runtime.weights import LayerWeights, Weights

# ---- small pieces, as the model defines them ------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 3n RMSNorm: no `1 + w` offset; computed in (at least) float32 and cast back."""
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), x.shape[-1:], w, eps).type_as(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rescale_to(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """Scale x to the RMS magnitude `target_rms` (AltUp stream expansion and merge)."""
    magnitude = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target_rms / magnitude


def sparsity_multiplier(p: float) -> float:
    """z = Phi^-1(p), computed as transformers does (in float32)."""
    z = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(p, dtype=torch.float32))
    return float(z)


def half_rotation(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """R such that x @ R = cat(-x[half:], x[:half]) (neox-style `rotate_half`): each output is
    one input times +-1, so the product is exact in any dtype."""
    half = dim // 2
    r = torch.zeros(dim, dim, dtype=dtype, device=device)
    r[half:, :half] = -torch.eye(half, dtype=dtype, device=device)
    r[:half, half:] = torch.eye(half, dtype=dtype, device=device)
    return r


# ---- the model ----------------------------------------------------------------------------------


class Gemma3nModel:
    """The elastic text decoder over one set of weights. Stateless between calls."""

    def __init__(self, weights: Weights):
        self.w = weights
        self.text = t = weights.text
        dtype, device = weights.dtype, weights.device

        def scalar(v: float) -> torch.Tensor:  # a constant in the weights' dtype, as HF does
            return torch.tensor(v, dtype=dtype, device=device)

        self.embed_scale = scalar(t.hidden_size**0.5)
        self.ple_scale = scalar(t.hidden_size_per_layer_input**0.5)
        self.ple_projection_scale = scalar(t.hidden_size**-0.5)
        self.ple_merge_scale = torch.rsqrt(torch.tensor(2.0)).to(dtype=dtype, device=device)
        self.z = {
            i: sparsity_multiplier(p) for i, p in enumerate(t.activation_sparsity_pattern) if p > 0
        }
        self.rotate = half_rotation(t.head_dim, dtype, device)
        # Streams 1..3 expanded and unembedded by one batched product each.
        self.altup_projections = torch.stack(weights.altup_projections)  # [A-1, H, H]
        self.altup_unembed = torch.stack(weights.altup_unembed)
        # The router reads router_norm(x) / hidden: the 1/hidden is folded into its weight, and
        # the correction's "+ 1" into a bias of ones.
        a = t.altup_num_inputs
        self.router = [lw.altup_router / t.hidden_size for lw in weights.layers]
        self.correction_bias = torch.ones(a, dtype=dtype, device=device)
        # The per-layer input is added to streams 1..3 only: a 0/1 weight per stream.
        self.ple_streams = torch.ones(a, 1, dtype=dtype, device=device)
        self.ple_streams[t.altup_active_idx] = 0

    def batch(self, planned: PlannedStep) -> ForwardBatch:
        """A planned step on the device, with its per-layer embedding rows (gathered from the
        host mapping)."""
        w = self.w
        batch = materialize(planned.spec, upload(planned.values, w.device), self.text, w.dtype)
        batch.ple_rows = w.ple_rows(planned.host_ids)
        return batch

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits [M, vocab] for the rows that want them, writing this step's K/V into `kv`.
        Callers run it without autograd (`torch.inference_mode`, or `no_grad` when compiled)."""
        t, w = self.text, self.w

        # Embeddings: the token embedding scaled by sqrt(hidden) in the weight dtype, and the
        # per-layer inputs for every layer (chunk l of a row belongs to original layer l).
        h0 = w.embed[batch.input_ids] * self.embed_scale  # [N, H]
        ple = self.per_layer_inputs(batch, h0).transpose(0, 1)  # [L, N, 1, d]
        n_kv = t.first_kv_shared_layer
        # Per layer, its [N, 1, d] slice; KV consumers see only the rows that go on (early exit).
        consumers = ple[n_kv:] if batch.logits_rows is None else ple[n_kv:, batch.logits_rows]
        ple_of = list(ple[:n_kv].unbind(0)) + list(consumers.unbind(0))

        # AltUp: stream 0 is the embedding, streams 1..3 projections of it at its magnitude.
        target = torch.mean(h0**2, dim=-1, keepdim=True) ** 0.5
        projected = torch.einsum("nh,aoh->nao", h0, self.altup_projections)
        expanded = rescale_to(projected, target[:, None])
        streams = torch.cat([h0[:, None], expanded], dim=1)  # [N, A, H]

        for layer in range(t.num_hidden_layers):
            if layer == n_kv and batch.logits_rows is not None:
                # Prefill early exit: KV consumers write nothing, so only rows whose logits are
                # wanted go on.
                streams = streams[batch.logits_rows]
            lr = batch.rows[layer]
            if lr is None:
                continue  # every subnet in the batch skips it
            if lr.index is None:
                out = self.decoder_layer(layer, streams, ple_of[layer], lr, batch, kv)
                streams = out if lr.keep is None else torch.where(lr.keep, out, streams)
            else:
                sub = streams[lr.index]
                out = self.decoder_layer(layer, sub, ple_of[layer][lr.index], lr, batch, kv)
                streams = streams.index_copy(0, lr.index, out)
        if t.first_kv_shared_layer >= t.num_hidden_layers and batch.logits_rows is not None:
            streams = streams[batch.logits_rows]

        # Merge the streams back: 1..3 are unembedded and rescaled to stream 0's magnitude.
        target = torch.mean(streams[:, 0] ** 2, dim=-1, keepdim=True) ** 0.5
        unembedded = torch.einsum("nah,aoh->nao", streams[:, 1:], self.altup_unembed)
        rescaled = rescale_to(unembedded, target[:, None])
        merged = torch.cat([streams[:, :1], rescaled], dim=1).mean(dim=1)
        hidden = rms_norm(merged, w.final_norm, t.rms_norm_eps)
        logits = F.linear(hidden, w.lm_head)
        if t.final_logit_softcapping is not None:
            cap = t.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def per_layer_inputs(self, batch: ForwardBatch, h0: torch.Tensor) -> torch.Tensor:
        t, w = self.text, self.w
        n, d = t.num_hidden_layers, t.hidden_size_per_layer_input
        table = batch.ple_rows * self.ple_scale
        proj = F.linear(h0, w.ple_model_projection) * self.ple_projection_scale
        proj = rms_norm(proj.view(-1, n, 1, d), w.ple_projection_norm, t.rms_norm_eps)
        return (proj + table.view(-1, n, 1, d)) * self.ple_merge_scale  # [N, L, 1, d]

    # ---- one decoder layer ------------------------------------------------------------------

    def decoder_layer(
        self,
        layer: int,
        streams: torch.Tensor,
        ple_input: torch.Tensor,
        lr: LayerRows,
        batch: ForwardBatch,
        kv: KVCache,
    ) -> torch.Tensor:
        """One layer over rows whose four streams are `streams` [R, A, H]. The active stream is
        kept as [R, 1, H] (a slice, not a select) so that correcting every stream with it and
        adding the per-layer input broadcast without reshaping."""
        t, lw = self.text, self.w.layers[layer]
        eps = t.rms_norm_eps
        i = t.altup_active_idx

        predictions = self.altup_predict(layer, lw, streams)
        active = predictions[:, i : i + 1]
        x = rms_norm(active, lw.input_norm, eps)
        laurel = x + rms_norm(F.linear(F.linear(x, lw.laurel_left), lw.laurel_right),
                              lw.laurel_norm, eps)  # fmt: skip
        attn = rms_norm(self.attention(layer, lw, x, lr, batch, kv), lw.post_attention_norm, eps)
        h = (active + attn + laurel) / math.sqrt(2)

        ffn = self.ffn(layer, rms_norm(h, lw.pre_ffn_norm, eps), batch.ffn[layer])
        h = h + rms_norm(ffn, lw.post_ffn_norm, eps)
        corrected = self.altup_correct(layer, lw, predictions, active, h)

        # Per-layer input: gate stream 0 (scaled), multiply by this layer's PLE, project back,
        # and add to streams 1..3 only.
        g = corrected[:, i : i + 1]
        if t.altup_correct_scale:
            g = g * lw.altup_correct_scale
        g = gelu(F.linear(g, lw.ple_gate)) * ple_input
        g = rms_norm(F.linear(g, lw.ple_projection), lw.ple_post_norm, eps)
        return torch.addcmul(corrected, self.ple_streams, g)

    def altup_router(self, layer: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        routed = F.linear(rms_norm(x, lw.altup_router_norm, self.text.rms_norm_eps),
                          self.router[layer])  # fmt: skip
        if routed.dtype not in (torch.float32, torch.float64):
            return torch.tanh(routed.float()).type_as(x)  # as transformers: tanh in float32
        return torch.tanh(routed)

    def altup_predict(self, layer: int, lw: LayerWeights, streams: torch.Tensor) -> torch.Tensor:
        """Each stream predicted as a mix of all four: [R, A, A] coefficients @ [R, A, H]."""
        a, i = self.text.altup_num_inputs, self.text.altup_active_idx
        modalities = self.altup_router(layer, lw, streams[:, i : i + 1])  # [R, 1, A]
        coefs = F.linear(modalities, lw.altup_prediction_coefs).view(-1, a, a)
        return torch.baddbmm(streams, coefs, streams)

    def altup_correct(
        self,
        layer: int,
        lw: LayerWeights,
        predictions: torch.Tensor,
        active: torch.Tensor,
        activated: torch.Tensor,
    ) -> torch.Tensor:
        """Every stream corrected by the active stream's innovation (what the layer computed
        minus what was predicted for it), weighted per stream."""
        modalities = self.altup_router(layer, lw, activated)
        innovation = activated - active  # [R, 1, H]
        coefs = F.linear(modalities, lw.altup_correction_coefs, self.correction_bias)  # [R, 1, A]
        return torch.baddbmm(predictions, coefs.transpose(1, 2), innovation)

    def attention(
        self,
        layer: int,
        lw: LayerWeights,
        x: torch.Tensor,
        lr: LayerRows,
        batch: ForwardBatch,
        kv: KVCache,
    ) -> torch.Tensor:
        t = self.text
        heads, kv_heads, dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        kind = t.layer_types[layer]
        cos, sin = batch.rope[(lr.positions_key, kind)]  # [R, 1, dim]

        q = rms_norm(F.linear(x, lw.q_proj).view(-1, heads, dim), lw.q_norm, t.rms_norm_eps)
        q = torch.addcmul(q * cos, q @ self.rotate, sin)  # rotary: q*cos + rotate_half(q)*sin

        source = t.kv_source(layer)  # itself, or the producer (18/19) for a consumer layer
        if source == layer:
            k = rms_norm(F.linear(x, lw.k_proj).view(-1, kv_heads, dim), lw.k_norm, t.rms_norm_eps)
            k = torch.addcmul(k * cos, k @ self.rotate, sin)
            v = rms_norm(F.linear(x, lw.v_proj).view(-1, kv_heads, dim), None, t.rms_norm_eps)
            slots = batch.write_slots[layer]
            kv.k[slots] = k
            kv.v[slots] = v

        out = None
        for g in batch.attention[layer]:
            if g.paged is not None:
                o = self.attend_paged(g.paged[source], q, kv, g.num_seqs)
            else:
                o = self.attend(g, q, self.read(g, source, layer, batch, kv))
            if g.scatter is None:
                out = o  # one group, one query per row, rows in order
                break
            if out is None:
                out = q.new_empty(q.shape[0], 1, heads * dim)
            dest, flat = g.scatter
            out.index_copy_(0, dest, o.reshape(-1, 1, heads * dim)[flat])
        return F.linear(out, lw.o_proj)  # [R, 1, H]

    @staticmethod
    def read(
        g: AttentionGroup, source: int, layer: int, batch: ForwardBatch, kv: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a group reads from `source`'s cache, [G, kv_heads, K, dim]. Every
        KV consumer of one producer reads the same ones: gathered once per step."""
        key = (g.key, source)
        if key in batch.reads:
            return batch.reads[key]
        slots = g.slots[source]
        reads = (kv.k[slots].transpose(1, 2), kv.v[slots].transpose(1, 2))
        if source != layer:
            batch.reads[key] = reads
        return reads

    def attend(
        self, g: AttentionGroup, q: torch.Tensor, reads: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Grouped-query attention of one group without copying K/V per query head: the `rep`
        query heads that share a KV head are folded into the query-length axis."""
        t = self.text
        heads, kv_heads, dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        rep, n, q_len = heads // kv_heads, g.num_seqs, g.q_len
        keys, values = reads
        if g.q_index is None:  # one query per sequence, in row order
            qg = q.view(n, kv_heads, rep, dim)
        else:
            qg = q[g.q_index].view(n, q_len, kv_heads, rep, dim).permute(0, 2, 3, 1, 4)
            qg = qg.reshape(n, kv_heads, rep * q_len, dim)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask, scale=1.0)
        if g.q_index is None:
            return o.view(n, 1, heads * dim)
        return o.view(n, kv_heads, rep, q_len, dim).permute(0, 3, 1, 2, 4)  # [G, Q, kv, rep, d]

    def attend_paged(self, blocks: BlockMask, q: torch.Tensor, kv: KVCache, n: int) -> torch.Tensor:
        """One query per sequence attending the cache where it lies: FlexAttention over the
        whole pool, visiting only the blocks `blocks` lists for each sequence (batch.py
        `_paged`), so no K/V is gathered. Query head h reads KV head h // rep, as above."""
        t = self.text
        heads, dim = t.num_attention_heads, t.head_dim
        keys = kv.k.permute(1, 0, 2)[None].expand(n, -1, -1, -1)  # [n, kv_heads, slots, dim]
        values = kv.v.permute(1, 0, 2)[None].expand(n, -1, -1, -1)
        # A product, not a view: inductor (2.13) cannot lower a CPU FlexAttention whose query
        # is a view of a buffer of another rank ("not enough values to unpack"), and it drops
        # a clone (or copy) as a no-op; x * 1.0 is exact.
        query = q.view(n, heads, 1, dim) * 1.0
        o = flex_attention(query, keys, values, block_mask=blocks, scale=1.0, enable_gqa=True)
        return o.view(n, 1, heads * dim)

    # ---- the elastic FFN --------------------------------------------------------------------

    def ffn(self, layer: int, x: torch.Tensor, plan: FfnPlan) -> torch.Tensor:
        if plan.groups:  # one GEMM per width, on that width's rows
            out = torch.empty_like(x)
            for width, idx in plan.groups:
                out.index_copy_(0, idx, self.ffn_at_width(layer, x[idx], width))
            return out
        gate_w, up_w, down_w = self.w.ffn(layer, plan.width)
        gate = F.linear(x, gate_w)
        z = self.z.get(layer, 0.0)
        if plan.row_width is None:
            if z:
                gate = self.sparsify(gate, z)
            return F.linear(gelu(gate) * F.linear(x, up_w), down_w)
        keep = plan.keep  # [R, width] True inside each row's own width
        if z:
            gate = self.sparsify(gate, z, keep, plan.row_width)
        return F.linear(gelu(gate) * F.linear(x, up_w) * keep, down_w)

    def ffn_at_width(self, layer: int, x: torch.Tensor, width: int) -> torch.Tensor:
        gate_w, up_w, down_w = self.w.ffn(layer, width)
        gate = F.linear(x, gate_w)
        z = self.z.get(layer, 0.0)
        if z:
            gate = self.sparsify(gate, z)
        return F.linear(gelu(gate) * F.linear(x, up_w), down_w)

    @staticmethod
    def sparsify(
        gate: torch.Tensor,
        z: float,
        keep: torch.Tensor | None = None,
        row_width: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gaussian top-k: keep what lies above mean + z*std of the gate outputs over the row's
        own width. The statistics are float32 in every dtype and in both FFN layouts (a count
        like 4915 is not a bfloat16, and a bfloat16 mean would differ from the masked layout's),
        and the cutoff is two single-rounding ops, not a fused `add(alpha=)`: on a CPU the fused
        form rounds once in the vectorised loop and twice in its scalar tail, which would make a
        row's cutoff depend on how many rows the step has."""
        g32 = gate.float()
        if keep is None:
            std, mean = torch.std_mean(g32, dim=-1, keepdim=True, correction=0)
        else:
            mean = (g32 * keep).sum(-1, keepdim=True) / row_width
            std = (((g32 - mean) * keep) ** 2).sum(-1, keepdim=True).div(row_width).sqrt()
        cutoff = mean + std * z
        return F.relu(gate - cutoff.type_as(gate))
