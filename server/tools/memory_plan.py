"""The memory plan of a deployment: what each subnet needs on the accelerator, and in host memory.

Owns sizing arithmetic for `concentric plan`, from the checkpoint's shapes alone (no weights are
read). On the accelerator: everything width-independent once (attention, norms, AltUp, LAuReL,
the embedding that is also the LM head, the per-layer-embedding projection), the FFN rows at a
subnet's widths, and the KV cache for a number of token positions over the KV-owning layers the
subnet keeps. In host memory: the per-layer-embedding table, which never moves to the device.
Activations and the framework's workspace come on top and are not estimated here.

Plain Python. Deliberately does not know: tensors or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.vocabulary.subnets import Subnet, SubnetTable
from server.vocabulary.text_config import TextConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class SubnetPlan:
    subnet: str
    shared_bytes: int  # width-independent weights, resident once for every subnet
    ffn_bytes: int  # this subnet's FFN rows
    kv_bytes: int  # K/V for the requested token positions over its KV-owning layers
    host_bytes: int  # the per-layer-embedding table (host memory)

    @property
    def device_bytes(self) -> int:
        return self.shared_bytes + self.ffn_bytes + self.kv_bytes


def shared_params(text: TextConfig) -> int:
    """Parameters resident once whatever the subnet: all but the FFNs and the PLE table (and
    the consumer layers' unused K/V, which are never loaded)."""
    total = 0
    for name, shape in text.global_tensor_shapes().items():
        if name != "embed_tokens_per_layer.weight":
            total += _numel(shape)
    for layer in range(text.num_hidden_layers):
        for name, shape in text.layer_tensor_shapes(layer).items():
            if not name.startswith("mlp."):
                total += _numel(shape)
    return total


def kv_bytes_per_token(text: TextConfig, subnet: Subnet, dtype_bytes: int) -> int:
    per_layer = 2 * text.num_key_value_heads * text.head_dim * dtype_bytes
    return per_layer * len(subnet.kv_layers)


def plan(
    text: TextConfig, table: SubnetTable, kv_tokens: int, dtype: str = "bfloat16"
) -> list[SubnetPlan]:
    b = BYTES[dtype]
    shared = shared_params(text) * b
    host = _numel(text.global_tensor_shapes()["embed_tokens_per_layer.weight"]) * b
    out = []
    for s in table:
        ffn = sum(3 * w * text.hidden_size for w in s.widths) * b
        out.append(
            SubnetPlan(s.name, shared, ffn, kv_tokens * kv_bytes_per_token(text, s, b), host)
        )
    return out


def format_plan(plans: list[SubnetPlan], kv_tokens: int, dtype: str) -> str:
    gib = 1024**3
    rows = [("subnet", "shared", "FFN", f"KV ({kv_tokens} tok)", "device total", "host (PLE)")]
    for p in plans:
        rows.append(
            (
                p.subnet,
                *(
                    f"{v / gib:.2f} GiB"
                    for v in (p.shared_bytes, p.ffn_bytes, p.kv_bytes, p.device_bytes, p.host_bytes)
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    note = (
        f"{dtype} weights and KV. Serving several subnets at once needs, on the device, the "
        "shared part once plus the FFN rows of the widest of them per layer. Activations and "
        "workspace are extra."
    )
    return "\n".join([*lines, note])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
