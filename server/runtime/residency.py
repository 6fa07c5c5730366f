"""Resident FFN widths: which rows of each layer's FFN live where the model computes.

Owns the FFN buffers the forward pass reads. Host memory always holds the whole checkpoint (the
store's mapping); per layer, the compute device holds the rows up to a *resident width*: gate/up
row prefixes and the matching `down` column prefix. A subnet is servable iff each of its layers'
widths is at most the resident width. Everything width-independent (attention, norms, AltUp,
LAuReL, embeddings) is resident once, outside this module.

Two kinds of buffers:
- views: on a CPU computing in the stored dtype, the resident rows are views of the mapping, so
  resizing costs nothing and moves nothing (the page cache holds the bytes);
- private: on an accelerator (or when converting dtype) each layer has its own buffers.

Resizing private buffers, and what it costs in device memory:
- growing builds each changed layer's new buffers whole (the resident prefix copied on the
  device, only the missing ring crossing from host memory) while the old ones keep serving steps,
  in the background (a thread, and on CUDA a side stream that first waits for the main stream's
  work). Its peak is the new buffers of every changed layer on top of the resident ones
  (`transient_bytes`), which is what elasticity budgets for. `commit` swaps them in between
  steps: the main stream waits for the upload's event, and the new buffers are marked as used by
  the main stream (`record_stream`: they were allocated on the side stream, whose pool would
  otherwise reuse them while the main stream still reads them). A build that fails (out of
  memory: the headroom went elsewhere meanwhile) leaves its error on the pending resize; the
  resident buffers are untouched.
- shrinking happens at commit, between steps, one layer at a time: the kept prefix is copied and
  the layer's old buffers dropped before the next layer, so it holds one layer's new buffers at
  most, and it cannot fail (if even that copy finds no memory, the layer keeps a view of its old
  buffers: narrower, freeing nothing, until the next resize).
Freed buffers go back to PyTorch's cache, not to the device: `release_cached` hands them back.

Host-to-device copies go through one pinned staging buffer, reused: before it is refilled, the
event recorded after the previous copy from it is waited for (a non-blocking copy reads the
host memory later, on the device's schedule).

A resize must happen between engine steps; the caller (the engine) guarantees no running request
uses a width that a shrink removes.

Deliberately does not know: headroom, policies, or which requests run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.runtime.device import allocation_failure, on_device, release_cached

Ffn = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [K, H], up [K, H], down [H, K]


@dataclass
class PendingResize:
    widths: tuple[int, ...]
    old: tuple[int, ...]  # the widths it starts from
    grown: dict[int, Ffn] | None = None  # layer -> its new (wider) buffers, once built
    error: BaseException | None = None
    thread: threading.Thread | None = None
    ready: object | None = None  # CUDA: an event recorded after the upload

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
        host_ffn: Sequence[Ffn],
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
        self.widths = tuple(widths or self.full)
        self.buffers: list[Ffn] = []
        self._views: dict[tuple[int, int], Ffn] = {}
        # Called with (layer, buffers) whenever a layer's buffers are replaced (weights.py keeps
        # its per-layer references in step with them, so old buffers are not held elsewhere).
        self.on_replace: Callable[[int, Ffn], None] | None = None
        # Counts buffer replacements: what holds a buffer's address (a captured CUDA graph)
        # knows from it that the address may be gone.
        self.generation = 0
        self._staging: torch.Tensor | None = None  # pinned, in the compute dtype, reused
        self._staged: object | None = None  # event: the last copy out of the staging buffer
        self._staging_lock = threading.Lock()
        with on_device(device):
            for layer, width in enumerate(self.widths):
                self.buffers.append(self._upload_layer(layer, width))

    # ---- queries ----------------------------------------------------------------------------

    def view(self, layer: int, width: int) -> Ffn:
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
        return sum(self._layer_bytes(layer, w) for layer, w in enumerate(widths))

    def transient_bytes(self, widths: Sequence[int]) -> int:
        """Device bytes a resize from the resident widths to `widths` holds at its peak on top
        of the resident buffers: every grown layer's new buffers (built whole before the swap),
        or, for a shrink alone, the largest one layer's kept prefix (copied layer by layer)."""
        if not self.private:
            return 0
        grown = [
            self._layer_bytes(layer, w)
            for layer, (w, r) in enumerate(zip(widths, self.widths, strict=True))
            if w > r
        ]
        shrunk = [
            self._layer_bytes(layer, w)
            for layer, (w, r) in enumerate(zip(widths, self.widths, strict=True))
            if w < r
        ]
        return sum(grown) + max(shrunk, default=0)

    @property
    def resident_bytes(self) -> int:
        return self.bytes_for(self.widths)

    def _layer_bytes(self, layer: int, width: int) -> int:
        return 3 * width * self.host[layer][0].shape[1] * self.dtype.itemsize

    # ---- resizing ---------------------------------------------------------------------------

    def prepare(self, widths: Sequence[int], background: bool = True) -> PendingResize:
        """Build the buffers of the layers that grow, without touching the ones in use. In the
        background (a thread; a side CUDA stream on a GPU) steps keep running on the current
        widths meanwhile; `commit` swaps them in between steps. Layers that shrink are done by
        `commit`."""
        widths = tuple(widths)
        if len(widths) != len(self.full) or any(
            not 0 < w <= f for w, f in zip(widths, self.full, strict=True)
        ):
            raise ValueError(
                f"resident widths must be in (0, full] for each of {len(self.full)} layers"
            )
        pending = PendingResize(widths, self.widths)
        growing = [
            layer for layer, (w, r) in enumerate(zip(widths, self.widths, strict=True)) if w > r
        ]
        if not growing:
            pending.grown = {}
            return pending
        current = list(self.buffers)
        cuda = self.device.type == "cuda"
        # The side stream must not read the resident buffers before the main stream's queued
        # work (the copies of an earlier shrink, say) has written them.
        main_done = torch.cuda.Event() if cuda else None
        if main_done is not None:
            main_done.record(torch.cuda.current_stream(self.device))

        def build() -> None:
            try:
                with on_device(self.device):
                    stream = torch.cuda.Stream(self.device) if cuda else None
                    ctx = torch.cuda.stream(stream) if stream else contextlib.nullcontext()
                    with ctx:
                        if stream is not None:
                            stream.wait_event(main_done)
                        grown = {
                            layer: self._grow_layer(
                                layer, pending.old[layer], widths[layer], current[layer]
                            )
                            for layer in growing
                        }
                    if stream is not None:
                        pending.ready = torch.cuda.Event()
                        pending.ready.record(stream)
                        pending.ready.synchronize()  # done() means uploaded
                pending.grown = grown
            except Exception as e:  # reported at commit; the resident buffers are untouched
                pending.error = e

        if background:
            pending.thread = threading.Thread(target=build, name="ffn-resize", daemon=True)
            pending.thread.start()
        else:
            build()
        return pending

    def abandon(self, pending: PendingResize) -> None:
        """Drop a prepared resize (after its build ends); its buffers go back to the cache."""
        if pending.thread is not None:
            pending.thread.join()
        pending.grown = None

    def commit(self, pending: PendingResize) -> ResizeReport:
        """Swap in prepared buffers and shrink what shrinks (waits if the build is not done)."""
        if pending.thread is not None:
            pending.thread.join()
        if pending.error is not None:
            raise pending.error
        if pending.old != self.widths:
            raise RuntimeError("the resident widths changed while a resize was being prepared")
        assert pending.grown is not None
        before = self.resident_bytes
        with on_device(self.device):
            if self.device.type == "cuda" and pending.grown:
                main = torch.cuda.current_stream(self.device)
                if pending.ready is not None:
                    main.wait_event(pending.ready)
                for tensors in pending.grown.values():
                    for t in tensors:
                        t.record_stream(main)
            for layer, buffers in pending.grown.items():
                self._replace(layer, buffers)
            for layer, (w, r) in enumerate(zip(pending.widths, pending.old, strict=True)):
                if w < r:
                    self._replace(layer, self._shrink_layer(layer, w))
        pending.grown = None
        self.widths = pending.widths
        after = self.resident_bytes
        return ResizeReport(max(0, after - before), max(0, before - after), pending.widths)

    def release_cached(self) -> None:
        """Hand the allocator's freed blocks back to the device (no-op off CUDA)."""
        release_cached(self.device)

    def _replace(self, layer: int, buffers: Ffn) -> None:
        self.buffers[layer] = buffers
        self.generation += 1
        for key in [k for k in self._views if k[0] == layer]:
            del self._views[key]
        if self.on_replace is not None:
            self.on_replace(layer, buffers)

    # ---- one layer ----------------------------------------------------------------------------

    def _upload_layer(self, layer: int, width: int) -> Ffn:
        gate_h, up_h, down_h = self.host[layer]
        if not self.private:
            return gate_h[:width], up_h[:width], down_h[:, :width]
        gate = torch.empty((width, gate_h.shape[1]), dtype=self.dtype, device=self.device)
        up = torch.empty_like(gate)
        down = torch.empty((down_h.shape[0], width), dtype=self.dtype, device=self.device)
        self._copy_in(gate, gate_h[:width])
        self._copy_in(up, up_h[:width])
        self._copy_in(down, down_h[:, :width])
        return gate, up, down

    def _grow_layer(self, layer: int, old: int, new: int, current: Ffn) -> Ffn:
        """New buffers at width `new`: the resident prefix copied on the device, only the ring
        old..new from host memory."""
        gate_h, up_h, down_h = self.host[layer]
        if not self.private:
            return gate_h[:new], up_h[:new], down_h[:, :new]
        gate_o, up_o, down_o = current
        gate = torch.empty((new, gate_o.shape[1]), dtype=self.dtype, device=self.device)
        up = torch.empty_like(gate)
        down = torch.empty((down_o.shape[0], new), dtype=self.dtype, device=self.device)
        gate[:old].copy_(gate_o)
        up[:old].copy_(up_o)
        down[:, :old].copy_(down_o)
        self._copy_in(gate[old:], gate_h[old:new])
        self._copy_in(up[old:], up_h[old:new])
        self._copy_in(down[:, old:], down_h[:, old:new])
        return gate, up, down

    def _shrink_layer(self, layer: int, new: int) -> Ffn:
        """The kept prefix in buffers of its own, so the old ones can go; a view of the old
        ones if even that copy finds no memory (the memory is released at the next resize)."""
        gate, up, down = self.buffers[layer]
        if not self.private:
            return self._upload_layer(layer, new)
        for attempt in range(2):
            try:
                return gate[:new].clone(), up[:new].clone(), down[:, :new].contiguous()
            except Exception as e:
                if allocation_failure(e) is None:
                    raise
                if attempt == 0:
                    release_cached(self.device)
        return gate[:new], up[:new], down[:, :new]

    def _copy_in(self, dest: torch.Tensor, host: torch.Tensor) -> None:
        """Copy host rows into device (or private host) memory, converting the dtype once."""
        if self.device.type != "cuda":
            dest.copy_(host)
            return
        # Through the pinned staging buffer (converted to the compute dtype on the host, so only
        # its bytes cross), reused once the previous copy out of it is done.
        with self._staging_lock:
            staging = self._staging_for(host.shape)
            staging.copy_(host)
            dest.copy_(staging, non_blocking=True)
            self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(self.device))

    def _staging_for(self, shape: torch.Size) -> torch.Tensor:
        if self._staged is not None:
            self._staged.synchronize()  # the last non-blocking copy has read the buffer
        n = shape.numel()
        if self._staging is None or self._staging.numel() < n:
            # A normal tensor even when made in an inference-mode step: written in place later,
            # perhaps outside that mode, where an inference tensor refuses in-place updates.
            with torch.inference_mode(False):
                self._staging = torch.empty(n, dtype=self.dtype, pin_memory=True)
        return self._staging[:n].view(shape)
