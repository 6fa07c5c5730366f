"""Resident FFN widths: which rows of each layer's FFN live where the model computes.

Owns the FFN buffers the forward pass reads. Host memory always holds the whole checkpoint (the
store's mapping); per layer, the compute device holds the rows up to a *resident width*: gate/up
row prefixes and the matching `down` column prefix. A subnet is servable iff each of its layers'
widths is at most the resident width. Everything width-independent (attention, norms, AltUp,
LAuReL, embeddings) is resident once, outside this module.

Two kinds of buffers:
- views: on a CPU computing in the stored dtype, the resident rows are views of the mapping, so
  resizing costs nothing and moves nothing (the page cache holds the bytes);
- private: on an accelerator (or when converting dtype) each layer has its own buffers. Growing
  uploads only the missing ring (rows old..new, converted once) and keeps the resident prefix in
  place on the device; shrinking keeps the prefix and releases the rest.

A resize must happen between engine steps; the caller (the engine) guarantees no running request
uses a width that a shrink removes.

Deliberately does not know: headroom, policies, or which requests run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PendingResize:
    widths: tuple[int, ...]
    old: tuple[int, ...]  # the widths it starts from
    buffers: list | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


@dataclass(frozen=True)
class ResizeReport:
    uploaded_bytes: int
    released_bytes: int
    widths: tuple[int, ...]


class FfnResidency:
    def __init__(
        self,
        host_ffn: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        device: torch.device,
        dtype: torch.dtype,
        private: bool,
        widths: Sequence[int] | None = None,
    ):
        self.host = list(host_ffn)  # per layer (gate [K, H], up [K, H], down [H, K]) in host memory
        self.device = device
        self.dtype = dtype
        self.private = private
        self.full = tuple(g.shape[0] for g, _, _ in self.host)
        self.widths = tuple(self.full)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer, width in enumerate(widths or self.full):
            self.buffers.append(self._load(layer, 0, width, None))
        self.widths = tuple(widths or self.full)

    # ---- queries ----------------------------------------------------------------------------

    def view(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate, up and down of `layer` at FFN width `width`: views of the resident buffers."""
        if not 0 < width <= self.widths[layer]:
            raise ValueError(
                f"layer {layer}: width {width} outside the resident (0, {self.widths[layer]}]"
            )
        views = self._views.get((layer, width))
        if views is None:  # made once per (layer, width) until the buffers change
            gate, up, down = self.buffers[layer]
            views = self._views[(layer, width)] = (gate[:width], up[:width], down[:, :width])
        return views

    def fits(self, layers: Sequence[int], widths: Sequence[int]) -> bool:
        return all(w <= self.widths[layer] for layer, w in zip(layers, widths, strict=True))

    def bytes_for(self, widths: Sequence[int]) -> int:
        """Device bytes the FFN buffers need at `widths` (0 where they are views)."""
        if not self.private:
            return 0
        item = self.dtype.itemsize
        return sum(
            3 * w * g.shape[1] * item for (g, _, _), w in zip(self.host, widths, strict=True)
        )

    @property
    def resident_bytes(self) -> int:
        return self.bytes_for(self.widths)

    # ---- resizing ---------------------------------------------------------------------------

    def prepare(self, widths: Sequence[int], background: bool = True) -> PendingResize:
        """Build the buffers for `widths` without touching the ones in use. In the background
        (a thread; a side CUDA stream on a GPU), growing stages and uploads its rings while
        steps keep running on the current widths; `commit` swaps them in between steps."""
        widths = tuple(widths)
        if len(widths) != len(self.full) or any(
            not 0 < w <= f for w, f in zip(widths, self.full, strict=True)
        ):
            raise ValueError(
                f"resident widths must be in (0, full] for each of {len(self.full)} layers"
            )
        pending = PendingResize(widths, self.widths)
        current = list(self.buffers)

        def build() -> None:
            try:
                stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    new = list(current)
                    for layer, (old_w, new_w) in enumerate(zip(pending.old, widths, strict=True)):
                        if new_w != old_w:
                            new[layer] = self._load(layer, old_w, new_w, current[layer])
                if stream is not None:
                    stream.synchronize()
                pending.buffers = new
            except BaseException as e:  # reported at commit
                pending.error = e

        if background:
            pending.thread = threading.Thread(target=build, name="ffn-resize", daemon=True)
            pending.thread.start()
        else:
            build()
        return pending

    def commit(self, pending: PendingResize) -> ResizeReport:
        """Swap in prepared buffers (waits if they are not ready yet)."""
        if pending.thread is not None:
            pending.thread.join()
        if pending.error is not None:
            raise pending.error
        if pending.old != self.widths:
            raise RuntimeError("the resident widths changed while a resize was being prepared")
        assert pending.buffers is not None
        if self.device.type == "cuda":  # built on a side stream, used on the main one from now
            for tensors in pending.buffers:
                for t in tensors:
                    t.record_stream(torch.cuda.current_stream(self.device))
        before = self.resident_bytes
        self.buffers, self.widths = pending.buffers, pending.widths
        self._views.clear()
        after = self.resident_bytes
        return ResizeReport(max(0, after - before), max(0, before - after), pending.widths)

    def _load(
        self,
        layer: int,
        old: int,
        new: int,
        current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ):
        gate_h, up_h, down_h = self.host[layer]
        if not self.private:
            return gate_h[:new], up_h[:new], down_h[:, :new]
        if current is None or old == 0:
            return (
                self._upload(gate_h[:new]),
                self._upload(up_h[:new]),
                self._upload(down_h[:, :new]),
            )
        gate, up, down = current
        if new < old:  # keep the prefix, release the rest (a copy, so the old storage is freed)
            return gate[:new].clone(), up[:new].clone(), down[:, :new].contiguous()
        # grow: only the ring old..new crosses from host memory
        return (
            torch.cat([gate, self._upload(gate_h[old:new])]),
            torch.cat([up, self._upload(up_h[old:new])]),
            torch.cat([down, self._upload(down_h[:, old:new])], dim=1),
        )

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        # Through one contiguous, pinned-if-possible staging copy of just these rows.
        staged = host.contiguous()
        if self.device.type == "cuda":
            staged = staged.pin_memory()
        return staged.to(device=self.device, dtype=self.dtype, non_blocking=True)
