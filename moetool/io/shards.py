"""The one safetensors writer: size-bounded shards named like ``save_pretrained``, tensor bytes streamed.

Every command that writes weights (upcycle, merge, quantize, export, distill) goes through
:class:`ShardWriter`, inside :func:`~moetool.io.writer.staged_output`. It has two ways in, one format out:

* **with a plan** (every output tensor's name, dtype and shape known up front: upcycle, merge): shards
  are assigned first (:func:`plan_shards`), each shard's header is written when the shard opens, and
  each tensor's bytes go straight from its memory into the final file, in plan order. The exact file
  sizes are known before anything is written (``--dry-run`` prints them);
* **without a plan** (quantize: packed code streams whose length is known only once encoded): tensors
  arrive in any order; their bytes go to a data file beside the shard being filled, and when the shard
  is full its header is written and the data copied after it (a kernel-side copy).

Either way memory holds no tensor data beyond the one being written, and the files are the same for
the same tensors in the same order: ``model.safetensors`` alone, or ``model-0000k-of-0000N.safetensors``
plus ``model.safetensors.index.json``; headers carry ``__metadata__`` with ``format: pt`` (sorted keys),
padded to 8 bytes as the safetensors library does. A shard closes when the next tensor would push it
past ``max_shard_size`` bytes of data; a larger tensor gets a shard of its own.

torch is imported only inside the methods that receive tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import MoetoolError, OutputError, UsageError
from moetool.io.dtypes import dtype_name
from moetool.io.safetensors_header import DTYPE_BITS
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.io.writer import DiskFullError, is_disk_full, open_new_for_write, write_json

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of the import graph
    import torch

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_NAME",
    "SINGLE_SHARD_NAME",
    "DuplicateTensorError",
    "PlannedEntry",
    "ShardLayout",
    "ShardWriter",
    "WriteResult",
    "WriterOrderError",
    "plan_shards",
    "unique_state_tensors",
]

SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Header JSON is padded with spaces to a multiple of this, as the safetensors library does, so that the
# data section starts aligned.
_HEADER_ALIGN = 8
_SPILL_PREFIX = ".moetool-shard-"
_COPY_CHUNK = 16 * 2**20


class DuplicateTensorError(MoetoolError, ValueError):
    """The same tensor name was given to the writer (or planned) twice (a bug in the caller)."""

    default_code = "DUPLICATE_TENSOR"


class WriterOrderError(MoetoolError):
    """A tensor given to a planned :class:`ShardWriter` is not the one the plan expects next (a bug)."""

    default_code = "WRITER_ORDER"


@dataclass(frozen=True)
class WriteResult:
    """What :meth:`ShardWriter.finalize` wrote.

    Attributes:
        files: the weight files and, when sharded, the index, in the order written.
        total_size: bytes of tensor data (the index's ``metadata.total_size``).
        num_tensors: number of tensors written.
    """

    files: list[str] = field(default_factory=list)
    total_size: int = 0
    num_tensors: int = 0


@dataclass(frozen=True)
class PlannedEntry:
    """One output tensor as a plan knows it before it exists.

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
        """Bytes of tensor data."""
        return sum(e.nbytes for e in self.entries)

    @property
    def file_bytes(self) -> int:
        """The file's size on disk: header plus data."""
        return len(self.header) + self.data_bytes


def _check_name(name: Any, seen: set[str]) -> None:
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise MoetoolError(f"invalid tensor name {name!r}", code="INVALID_TENSOR_NAME")
    if name in seen:
        raise DuplicateTensorError(f"tensor {name!r} was given twice")


def _check_entries(entries: Sequence[PlannedEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        _check_name(entry.name, seen)
        if entry.dtype not in DTYPE_BITS or DTYPE_BITS[entry.dtype] % 8:
            raise MoetoolError(f"tensor {entry.name!r} has unsupported dtype {entry.dtype!r}", code="UNSUPPORTED_DTYPE")
        if any(not isinstance(d, int) or d < 0 for d in entry.shape):
            raise MoetoolError(f"tensor {entry.name!r} has an invalid shape {entry.shape!r}", code="INVALID_SHAPE")
        seen.add(entry.name)


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
    # transformers refuses to load shards whose format is not "pt"; it cannot be overridden.
    return dict(sorted({**metadata, "format": "pt"}.items()))


def _header(entries: Sequence[PlannedEntry], metadata: dict[str, str]) -> bytes:
    """A shard's header bytes (length prefix, JSON, padding) for tensors stored back to back in order."""
    doc: dict[str, Any] = {"__metadata__": metadata}
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


def _shard_name(number: int, count: int, stem: str) -> str:
    return f"{stem}.safetensors" if count == 1 else f"{stem}-{number:05d}-of-{count:05d}.safetensors"


def _group(entries: Sequence[PlannedEntry], max_shard_size: int) -> list[list[PlannedEntry]]:
    """Entries cut into shards in order: a shard closes before a tensor that would overflow it."""
    groups: list[list[PlannedEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def plan_shards(
    entries: Sequence[PlannedEntry],
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    *,
    metadata: dict[str, str] | None = None,
    stem: str = "model",
) -> list[ShardLayout]:
    """Assign tensors to shards in order and compute every shard's header (no I/O, no torch).

    Args:
        entries: the output tensors in write order.
        max_shard_size: bound on tensor bytes per shard.
        metadata: extra ``__metadata__`` strings (``format: pt`` is always set).
        stem: the file name stem (``model`` gives ``model.safetensors``).

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
    meta = _check_metadata(metadata)
    groups = _group(entries, max_shard_size)
    return [
        ShardLayout(_shard_name(number, len(groups), stem), tuple(group), _header(group, meta))
        for number, group in enumerate(groups, start=1)
    ]


def _byte_view(name: str, tensor: torch.Tensor) -> tuple[str, memoryview]:
    """The tensor's safetensors dtype and its bytes (a copy only when it is not contiguous on the CPU)."""
    import torch

    t = tensor.detach()
    if t.device.type == "meta":
        raise MoetoolError(f"tensor {name!r} has no data (meta device)", code="META_TENSOR")
    dtype = dtype_name(t.dtype)
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return dtype, memoryview(b"")
    # numpy has no bfloat16: reinterpret as bytes first, which every dtype allows.
    return dtype, memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes tensors into size-bounded safetensors shards, then the index (see the module docstring).

    Call :meth:`add` once per tensor (with a plan: in plan order, each checked against its entry;
    :meth:`add_parts` streams one planned tensor in slices along its first dimension), then
    :meth:`finalize`. As a context manager it finalizes on a normal exit (the result is then in
    :attr:`result`) and deletes everything it wrote on an exception.

    Args:
        folder: the output folder, normally the staging folder of
            :func:`~moetool.io.writer.staged_output` (created if missing; must hold no weights yet).
        plan: the output tensors in write order, when known up front; ``None`` takes any tensors in any
            order.
        max_shard_size: bound on the tensor bytes per shard.
        metadata: extra string metadata for every shard header (``format: pt`` is always set).
        stem: the file name stem (``model``: ``model.safetensors``, ``model-00001-of-00002.safetensors``,
            ``model.safetensors.index.json``).
        on_bytes: called with the number of bytes after each write (progress).
    """

    def __init__(
        self,
        folder: Path,
        plan: Sequence[PlannedEntry] | None = None,
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        stem: str = "model",
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise MoetoolError("writing safetensors needs a little-endian machine", code="UNSUPPORTED_PLATFORM")
        if max_shard_size <= 0:
            raise UsageError(f"max shard size must be positive, got {max_shard_size}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Old weights or an old index beside the new ones would be loaded instead of (or mixed with) them.
        own = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
        existing = sorted(p.name for p in self.folder.iterdir() if own.fullmatch(p.name))
        if existing:
            raise OutputError(
                f"{self.folder} already holds weight files ({', '.join(existing[:3])})",
                hint="write into an empty folder",
                code="OUTPUT_EXISTS",
            )
        self.max_shard_size = int(max_shard_size)
        self.metadata = _check_metadata(metadata)
        self.stem = stem
        self.result: WriteResult | None = None
        self._on_bytes = on_bytes
        self._closed = False
        self._handle: Any = None  # the file being written: a planned shard, or the spill data file
        self._written: list[Path] = []  # every file created so far (deleted by abort)
        self._total_size = 0
        self._count = 0
        # Planned mode: the layout, and where the next tensor goes.
        self.shards: list[ShardLayout] | None = None
        self._shard_index = -1
        self._entry_index = 0
        # Unplanned mode: the shard being filled (its entries, data bytes) and the shards closed so far.
        self._names: set[str] = set()
        self._entries: list[PlannedEntry] = []
        self._pending_bytes = 0
        self._spill_path: Path | None = None
        self._closed_shards: list[tuple[Path, list[PlannedEntry]]] = []
        if plan is not None:
            self.shards = plan_shards(plan, self.max_shard_size, metadata=metadata, stem=stem)
            self._open_next_shard()

    @property
    def planned(self) -> bool:
        """Whether the writer was given a plan."""
        return self.shards is not None

    @property
    def total_size(self) -> int:
        """Bytes of tensor data: the plan's (planned), or added so far (unplanned)."""
        if self.shards is not None:
            return sum(s.data_bytes for s in self.shards)
        return self._total_size

    @property
    def num_tensors(self) -> int:
        """Tensors written so far."""
        return self._count

    @property
    def file_bytes(self) -> int:
        """Bytes of all weight files, headers included (planned mode: known before anything is written)."""
        if self.shards is None:
            raise MoetoolError("file sizes are known in advance only with a plan", code="WRITER_UNPLANNED")
        return sum(s.file_bytes for s in self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    # ------------------------------------------------------------------ writing

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor.

        Args:
            name: with a plan, the next entry's name; without, any name not given before.
            tensor: any dense tensor (moved to CPU; nothing of it is kept after the call). With a plan
                its dtype and shape must match the entry exactly (no silent conversion).

        Raises:
            WriterOrderError: (planned) the name, dtype or shape is not what the plan says comes next.
            DuplicateTensorError: (unplanned) ``name`` was already added.
            MoetoolError: the writer was finalized, the tensor is on the meta device, or of a dtype
                safetensors cannot store.
            DiskFullError: writing ran out of space.
        """
        if self.shards is not None:
            entry = self._expect(name)
            dtype, view = _byte_view(name, tensor)
            if dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise WriterOrderError(
                    f"tensor {name!r} is {dtype} {list(tensor.shape)}; the plan says {entry.dtype} {list(entry.shape)}"
                )
            self._write(view)
            self._advance()
            return
        self._check_open()
        _check_name(name, self._names)
        dtype, view = _byte_view(name, tensor)
        entry = PlannedEntry(name, dtype, tuple(int(d) for d in tensor.shape))
        if self._entries and self._pending_bytes + entry.nbytes > self.max_shard_size:
            self._close_spilled_shard()
        if self._handle is None:
            self._spill_path = self.folder / f"{_SPILL_PREFIX}{len(self._closed_shards) + 1:05d}.data"
            self._handle = open(self._spill_path, "wb")  # noqa: SIM115 - closed in _close_spilled_shard / abort
        self._write(view)
        self._entries.append(entry)
        self._names.add(name)
        self._pending_bytes += entry.nbytes
        self._total_size += entry.nbytes
        self._count += 1

    def add_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor from consecutive slices along its first dimension.

        Each part has the entry's dtype and trailing dimensions; their first dimensions must add up to
        the entry's. Only one part needs to be in memory at a time (a fused ``[E, ...]`` expert tensor
        one expert at a time, say).

        Raises:
            WriterOrderError: a part does not fit the entry, the parts do not cover it exactly, or the
                writer has no plan.
        """
        if self.shards is None:
            raise WriterOrderError("add_parts needs a planned writer (the tensor's shape comes from the plan)")
        entry = self._expect(name)
        if not entry.shape:
            raise WriterOrderError(f"tensor {name!r} is a scalar; write it whole")
        rows = 0
        for part in parts:
            dtype, view = _byte_view(name, part)
            if dtype != entry.dtype or tuple(part.shape[1:]) != entry.shape[1:] or part.dim() != len(entry.shape):
                raise WriterOrderError(
                    f"a part of {name!r} is {dtype} {list(part.shape)}; the plan says {entry.dtype} "
                    f"[*, {', '.join(map(str, entry.shape[1:]))}]"
                )
            rows += part.shape[0]
            if rows > entry.shape[0]:
                raise WriterOrderError(f"the parts of {name!r} exceed its {entry.shape[0]} rows")
            self._write(view)
        if rows != entry.shape[0]:
            raise WriterOrderError(f"the parts of {name!r} cover {rows} of its {entry.shape[0]} rows")
        self._advance()

    def _check_open(self) -> None:
        if self._closed:
            raise MoetoolError("the writer is already finalized", code="WRITER_CLOSED")

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._handle.write(data)
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full(len(data)) from None
            raise
        if self._on_bytes is not None and len(data):
            self._on_bytes(len(data))

    def _disk_full(self, nbytes: int) -> DiskFullError:
        free = shutil.disk_usage(self.folder).free
        return DiskFullError(
            f"disk full while writing shards in {self.folder}: needs {nbytes:,} more bytes, {free:,} free",
            hint="free some space or choose -o on another disk",
        )

    # ------------------------------------------------------------------ planned mode

    def _open_next_shard(self) -> None:
        assert self.shards is not None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._shard_index += 1
        self._entry_index = 0
        if self._shard_index >= len(self.shards):
            return
        shard = self.shards[self._shard_index]
        path = self.folder / shard.filename
        fd = open_new_for_write(path, exclusive=True)
        self._written.append(path)
        self._handle = os.fdopen(fd, "wb")
        on_bytes, self._on_bytes = self._on_bytes, None  # headers are not progress
        try:
            self._write(shard.header)
        finally:
            self._on_bytes = on_bytes

    def _expect(self, name: str) -> PlannedEntry:
        assert self.shards is not None
        self._check_open()
        if self._shard_index >= len(self.shards):
            raise WriterOrderError(f"tensor {name!r} was given after every planned tensor was written")
        entry = self.shards[self._shard_index].entries[self._entry_index]
        if name != entry.name:
            raise WriterOrderError(f"tensor {name!r} was given where the plan expects {entry.name!r}")
        return entry

    def _advance(self) -> None:
        assert self.shards is not None
        self._count += 1
        self._entry_index += 1
        if self._entry_index == len(self.shards[self._shard_index].entries):
            self._open_next_shard()

    # ------------------------------------------------------------------ unplanned mode

    def _close_spilled_shard(self) -> None:
        """Close the shard being filled: its header, then its data copied from the spill file."""
        if self._handle is None:
            return
        assert self._spill_path is not None
        spill, handle = self._spill_path, self._handle
        self._handle = self._spill_path = None
        handle.close()
        header = _header(self._entries, self.metadata)
        path = self.folder / f"{_SPILL_PREFIX}{len(self._closed_shards) + 1:05d}.safetensors"
        try:
            with open(path, "wb") as out, open(spill, "rb") as source:
                self._handle = out
                on_bytes, self._on_bytes = self._on_bytes, None  # the data was counted when it arrived
                try:
                    self._write(header)
                finally:
                    self._on_bytes = on_bytes
                try:
                    shutil.copyfileobj(source, out, _COPY_CHUNK)
                except OSError as exc:
                    if is_disk_full(exc):
                        raise self._disk_full(self._pending_bytes) from None
                    raise
        except BaseException:
            path.unlink(missing_ok=True)
            spill.unlink(missing_ok=True)
            raise
        finally:
            self._handle = None
        spill.unlink(missing_ok=True)
        self._closed_shards.append((path, self._entries))
        self._entries = []
        self._pending_bytes = 0

    # ------------------------------------------------------------------ the end

    def finalize(self) -> WriteResult:
        """Close the last shard, give shards their final names and write the index when sharded.

        Returns:
            The files written, the total tensor bytes and the number of tensors.

        Raises:
            MoetoolError: ``NOTHING_TO_WRITE`` (no tensor added) or ``WRITER_CLOSED``.
            WriterOrderError: (planned) some planned tensors were never written.
        """
        self._check_open()
        if self.shards is not None:
            if self._shard_index < len(self.shards):
                missing = self.shards[self._shard_index].entries[self._entry_index].name
                raise WriterOrderError(f"finalize() before every planned tensor was written (next: {missing!r})")
            layout = [(s.filename, [e.name for e in s.entries]) for s in self.shards]
        else:
            if not self._names:
                raise MoetoolError("no tensors were given to the writer", code="NOTHING_TO_WRITE")
            self._close_spilled_shard()
            layout = []
            count = len(self._closed_shards)
            for number, (path, entries) in enumerate(self._closed_shards, start=1):
                filename = _shard_name(number, count, self.stem)
                os.replace(path, self.folder / filename)
                layout.append((filename, [e.name for e in entries]))
            self._written = [self.folder / filename for filename, _ in layout]
            self._closed_shards = []
        self._closed = True
        files = [filename for filename, _ in layout]
        if len(layout) > 1:
            weight_map = {name: filename for filename, names in layout for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / f"{self.stem}.safetensors.index.json", index)
            files.append(f"{self.stem}.safetensors.index.json")
        self.result = WriteResult(files=files, total_size=self.total_size, num_tensors=self._count)
        return self.result

    def abort(self) -> None:
        """Drop the shard being filled and delete every file written so far (idempotent)."""
        self._closed = True
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
        if self._spill_path is not None:
            self._spill_path.unlink(missing_ok=True)
            self._spill_path = None
        self._entries = []
        for path, _entries in self._closed_shards:
            path.unlink(missing_ok=True)
        self._closed_shards = []
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written = []


def unique_state_tensors(module: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A torch module's state dict, one name per tensor: tied aliases (the same storage, offset, shape and
    strides) under their first name only, as ``save_pretrained`` keeps them (``model.embed_tokens.weight``,
    not ``lm_head.weight``); transformers and ``safetensors.torch.load_model`` re-tie the rest on load."""
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in module.state_dict().items():
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor
