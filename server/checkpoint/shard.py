"""One safetensors file: reading its header, memory-mapping its tensors, writing one in a stream.

Owns the file format. Reading parses the 8-byte length and the JSON header ourselves, so that a
truncated or corrupt shard is reported by name before any tensor is touched (the format is simple
and the library's own errors speak of offsets, not files). Tensors are `torch.frombuffer` views
of a read-only `mmap`: nothing is read into private memory, pages are shared with the OS page cache
(and with any other process mapping the same file), and a stray in-place write would fault instead
of silently changing the weights every subnet shares.

Writing streams tensor after tensor to disk with a header computed up front, so an export or a dev
checkpoint never holds more than one tensor in memory.

Deliberately does not know: which tensors a model needs, or what they mean.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes we accept.
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class ShardError(ValueError):
    """A safetensors file that cannot be read as one."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Shard:
    """A read-only, memory-mapped safetensors file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = _read_header(self.path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of one tensor, backed by the mapping."""
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        count = e.nbytes // dtype.itemsize
        if count == 0:
            return torch.empty(e.shape, dtype=dtype)
        with warnings.catch_warnings():
            # The buffer is read-only on purpose (see module docstring); torch warns about it.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map, dtype=dtype, count=count, offset=self._data_start + e.begin
            )
        return flat.view(e.shape)

    def close(self) -> None:
        # Tensors handed out keep the mapping alive through their buffer; dropping our reference
        # is all that is safe to do.
        self._map = None


def _read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ShardError(
                    f"{path}: corrupt or truncated safetensors file "
                    f"(header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise ShardError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPES[dtype].itemsize or begin < 0:
            raise ShardError(f"{path}: tensor {name!r}: byte range does not match its shape")
        if end > data_size:
            raise ShardError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of a "
                f"{data_size}-byte data section"
            )
        entries[name] = TensorEntry(name, dtype, shape, begin, end)
    return entries, metadata, 8 + n


# ---- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its header entry, and how to produce it when its turn comes.

    `produce` returns the whole tensor, or an iterable of consecutive row blocks (dim 0) for a
    tensor too large to hold in memory at once."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_shard(
    path: Path,
    tensors: Iterable[PlannedTensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write a safetensors file one tensor at a time; returns the data-section size in bytes.

    Tensors are laid out in the given order; the header is padded to 8 bytes so every tensor
    starts aligned. Each `produce()` result is checked against its planned dtype and shape.
    """
    plan = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in plan:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in plan:
            produced = t.produce()
            blocks = [produced] if isinstance(produced, torch.Tensor) else produced
            rows = 0
            for block in blocks:
                if block.dtype != t.dtype or tuple(block.shape[1:]) != t.shape[1:]:
                    raise ValueError(
                        f"{t.name}: produced {block.dtype}{tuple(block.shape)}, "
                        f"planned {t.dtype}{t.shape}"
                    )
                rows += block.shape[0] if block.dim() else 1
                data = block.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)  # the buffer itself: no second copy of a large tensor
                if on_bytes is not None:
                    on_bytes(data.nbytes)
            if rows != (t.shape[0] if t.shape else 1):
                raise ValueError(f"{t.name}: produced {rows} rows, planned {t.shape}")
    os.replace(tmp, path)  # a crash never leaves a half-written shard under the real name
    return offset
