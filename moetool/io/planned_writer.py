"""Streaming safetensors output for writers that know every tensor in advance (upcycle, merge, quantize).

:class:`~moetool.io.writer.ShardedWriter` buffers a whole shard in memory because it learns tensors
one at a time. When the caller knows the name, dtype and shape of every output tensor up front (a
plan), nothing needs buffering: shards are assigned first (:func:`plan_shards`), each shard's header
is written as soon as the shard is opened, and each tensor's bytes go straight from the tensor's
memory into the open file (zero-copy) as it arrives. Memory then holds only the tensors the caller
has in flight, whatever the output size, and the output's exact file sizes are known before anything
is written (``--dry-run`` can print them).

The files look like ``save_pretrained`` output: ``model.safetensors`` alone, or
``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``; headers carry
``__metadata__ = {"format": "pt"}``. The same entries always give byte-identical files.

torch is imported only inside the methods that receive tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import MoetoolError, UsageError
from moetool.io.safetensors_header import DTYPE_BITS
from moetool.io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_NAME,
    SINGLE_SHARD_NAME,
    DiskFullError,
    DuplicateTensorError,
    WriteResult,
    _is_disk_full,
    _open_new_for_write,
    write_json,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PlannedEntry",
    "PlannedShardWriter",
    "ShardLayout",
    "WriterOrderError",
    "dtype_name",
    "plan_shards",
    "torch_dtype",
]

# torch dtype attribute name <-> safetensors dtype string, for the dtypes moetool writes.
_TORCH_TO_ST: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}

# Header JSON is padded with spaces to a multiple of this, as the safetensors library does, so that
# the data section starts aligned.
_HEADER_ALIGN = 8


class WriterOrderError(MoetoolError):
    """A tensor given to :class:`PlannedShardWriter` is not the one the plan expects next (a bug)."""

    default_code = "WRITER_ORDER"


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    key = str(dtype).removeprefix("torch.")
    if key not in _TORCH_TO_ST:
        raise MoetoolError(f"moetool cannot write tensors of dtype {dtype}", code="UNSUPPORTED_DTYPE")
    return _TORCH_TO_ST[key]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    if name not in _ST_TO_TORCH:
        raise MoetoolError(f"moetool cannot write tensors of dtype {name}", code="UNSUPPORTED_DTYPE")
    return getattr(torch, _ST_TO_TORCH[name])


@dataclass(frozen=True)
class PlannedEntry:
    """One output tensor as the plan knows it before it exists.

    Attributes:
        name: the tensor name in the checkpoint.
        dtype: safetensors dtype string (``"BF16"``, ``"F32"``, ...).
        shape: the shape.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, its tensors (in write order) and its exact size.

    Attributes:
        filename: ``model.safetensors`` or ``model-0000k-of-0000N.safetensors``.
        entries: the tensors it holds, in the order they are written.
        header: the complete header bytes (8-byte length prefix included).
    """

    filename: str
    entries: tuple[PlannedEntry, ...]
    header: bytes

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def file_bytes(self) -> int:
        """The file's size on disk: header plus data."""
        return len(self.header) + self.data_bytes


def _check_entries(entries: Sequence[PlannedEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry.name, str) or not entry.name or entry.name == "__metadata__":
            raise MoetoolError(f"invalid tensor name {entry.name!r}", code="INVALID_TENSOR_NAME")
        if entry.name in seen:
            raise DuplicateTensorError(f"tensor {entry.name!r} is planned twice")
        if entry.dtype not in DTYPE_BITS or DTYPE_BITS[entry.dtype] % 8:
            raise MoetoolError(f"tensor {entry.name!r} has unsupported dtype {entry.dtype!r}", code="UNSUPPORTED_DTYPE")
        if any(not isinstance(d, int) or d < 0 for d in entry.shape):
            raise MoetoolError(f"tensor {entry.name!r} has an invalid shape {entry.shape!r}", code="INVALID_SHAPE")
        seen.add(entry.name)


def _header(entries: Sequence[PlannedEntry], metadata: dict[str, str]) -> bytes:
    doc: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for entry in entries:
        doc[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(
    entries: Sequence[PlannedEntry],
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    *,
    metadata: dict[str, str] | None = None,
) -> list[ShardLayout]:
    """Assign tensors to shards in order and compute every shard's header (no I/O, no torch).

    A new shard starts when the next tensor would push the current one past ``max_shard_size`` bytes
    of tensor data; a tensor larger than that gets a shard of its own (the rule
    :class:`~moetool.io.writer.ShardedWriter` follows).

    Args:
        entries: the output tensors in write order.
        max_shard_size: bound on tensor bytes per shard.
        metadata: extra ``__metadata__`` strings (``format: pt`` is always set).

    Returns:
        The shards, in order, with their final file names.

    Raises:
        UsageError: ``max_shard_size`` is not positive.
        MoetoolError: an empty plan, a duplicate or invalid name, an unsupported dtype.
    """
    if max_shard_size <= 0:
        raise UsageError(f"max shard size must be positive, got {max_shard_size}")
    if not entries:
        raise MoetoolError("no tensors were planned", code="NOTHING_TO_WRITE")
    _check_entries(entries)
    meta = {**(metadata or {}), "format": "pt"}
    groups: list[list[PlannedEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    count = len(groups)
    shards = []
    for number, group in enumerate(groups, start=1):
        filename = SINGLE_SHARD_NAME if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        shards.append(ShardLayout(filename, tuple(group), _header(group, meta)))
    return shards


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a copy only when it is not contiguous on the CPU)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # numpy has no bfloat16: reinterpret as bytes first, which every dtype allows.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class PlannedShardWriter:
    """Writes planned tensors straight into their shard files, in plan order.

    Call :meth:`write` once per planned entry, in order (or :meth:`write_parts` to stream one tensor
    in pieces along its first dimension, e.g. a fused ``[E, ...]`` expert tensor one expert at a
    time), then :meth:`finalize`. Every tensor is checked against its entry (name, dtype, shape)
    before a byte is written. On an exception inside a ``with`` block the files written so far are
    deleted.

    Args:
        folder: an existing, empty output folder (normally the staging folder of
            :func:`~moetool.io.writer.staged_output`).
        entries: the output tensors in write order.
        max_shard_size: bound on tensor bytes per shard.
        metadata: extra ``__metadata__`` strings for every shard header.
        on_bytes: called with the number of bytes after each write (progress).
    """

    def __init__(
        self,
        folder: Path,
        entries: Sequence[PlannedEntry],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise MoetoolError("writing safetensors needs a little-endian machine", code="UNSUPPORTED_PLATFORM")
        self.folder = Path(folder)
        existing = sorted(p.name for p in self.folder.glob("model*.safetensors*"))
        if existing:
            raise MoetoolError(
                f"{self.folder} already holds weight files ({', '.join(existing[:3])})",
                hint="write into an empty folder",
                code="OUTPUT_EXISTS",
            )
        self.shards = plan_shards(entries, max_shard_size, metadata=metadata)
        self.result: WriteResult | None = None
        self._on_bytes = on_bytes
        self._shard_index = -1
        self._entry_index = 0  # within the current shard
        self._handle: Any = None
        self._written: list[Path] = []
        self._closed = False
        self._open_next_shard()

    @property
    def total_size(self) -> int:
        """Bytes of tensor data the plan holds (the index's ``metadata.total_size``)."""
        return sum(s.data_bytes for s in self.shards)

    @property
    def file_bytes(self) -> int:
        """Bytes of all weight files, headers included."""
        return sum(s.file_bytes for s in self.shards)

    def __enter__(self) -> PlannedShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    # ------------------------------------------------------------------ writing

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._shard_index += 1
        self._entry_index = 0
        if self._shard_index >= len(self.shards):
            return
        shard = self.shards[self._shard_index]
        path = self.folder / shard.filename
        fd = _open_new_for_write(path, exclusive=True)
        self._written.append(path)
        self._handle = os.fdopen(fd, "wb")
        self._raw_write(shard.header)

    def _raw_write(self, data: bytes | memoryview) -> None:
        try:
            self._handle.write(data)
        except OSError as exc:
            if _is_disk_full(exc):
                free = shutil.disk_usage(self.folder).free
                raise DiskFullError(
                    f"disk full while writing {self.shards[self._shard_index].filename} in {self.folder} "
                    f"({free:,} bytes free)",
                    hint="free some space or choose -o on another disk",
                ) from None
            raise

    def _expect(self, name: str) -> PlannedEntry:
        if self._closed:
            raise MoetoolError("the writer is already finalized", code="WRITER_CLOSED")
        if self._shard_index >= len(self.shards):
            raise WriterOrderError(f"tensor {name!r} was given after every planned tensor was written")
        entry = self.shards[self._shard_index].entries[self._entry_index]
        if name != entry.name:
            raise WriterOrderError(f"tensor {name!r} was given where the plan expects {entry.name!r}")
        return entry

    def _advance(self) -> None:
        self._entry_index += 1
        if self._entry_index == len(self.shards[self._shard_index].entries):
            self._open_next_shard()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor.

        Args:
            name: must be the next entry's name.
            tensor: its dtype and shape must match the entry exactly (no silent conversion).

        Raises:
            WriterOrderError: the name, dtype or shape is not what the plan says comes next.
            DiskFullError: the file system ran out of space.
        """
        entry = self._expect(name)
        got_dtype = dtype_name(tensor.dtype)
        if got_dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise WriterOrderError(
                f"tensor {name!r} is {got_dtype} {list(tensor.shape)}; the plan says {entry.dtype} {list(entry.shape)}"
            )
        view = _byte_view(tensor)
        self._raw_write(view)
        if self._on_bytes is not None:
            self._on_bytes(len(view))
        self._advance()

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor from consecutive slices along its first dimension.

        Each part has the entry's dtype and trailing dimensions; their first dimensions must add up
        to the entry's. Only one part needs to be in memory at a time.

        Raises:
            WriterOrderError: a part does not fit the entry, or the parts do not cover it exactly.
        """
        entry = self._expect(name)
        if not entry.shape:
            raise WriterOrderError(f"tensor {name!r} is a scalar; write it whole")
        rows = 0
        for part in parts:
            got_dtype = dtype_name(part.dtype)
            if got_dtype != entry.dtype or tuple(part.shape[1:]) != entry.shape[1:] or part.dim() != len(entry.shape):
                raise WriterOrderError(
                    f"a part of {name!r} is {got_dtype} {list(part.shape)}; the plan says {entry.dtype} "
                    f"[*, {', '.join(map(str, entry.shape[1:]))}]"
                )
            rows += part.shape[0]
            if rows > entry.shape[0]:
                raise WriterOrderError(f"the parts of {name!r} exceed its {entry.shape[0]} rows")
            view = _byte_view(part)
            self._raw_write(view)
            if self._on_bytes is not None:
                self._on_bytes(len(view))
        if rows != entry.shape[0]:
            raise WriterOrderError(f"the parts of {name!r} cover {rows} of its {entry.shape[0]} rows")
        self._advance()

    def finalize(self) -> WriteResult:
        """Check that every planned tensor was written, close the last shard, write the index.

        Returns:
            The files written, the total tensor bytes and the number of tensors.

        Raises:
            WriterOrderError: some planned tensors were never written.
        """
        if self._closed:
            raise MoetoolError("the writer is already finalized", code="WRITER_CLOSED")
        if self._shard_index < len(self.shards):
            missing = self.shards[self._shard_index].entries[self._entry_index].name
            raise WriterOrderError(f"finalize() before every planned tensor was written (next: {missing!r})")
        self._closed = True
        files = [s.filename for s in self.shards]
        if len(self.shards) > 1:
            weight_map = {e.name: s.filename for s in self.shards for e in s.entries}
            write_json(
                self.folder / INDEX_NAME,
                {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))},
            )
            files.append(INDEX_NAME)
        self.result = WriteResult(
            files=files, total_size=self.total_size, num_tensors=sum(len(s.entries) for s in self.shards)
        )
        return self.result

    def abort(self) -> None:
        """Close and delete the files written so far (idempotent)."""
        self._closed = True
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written = []
