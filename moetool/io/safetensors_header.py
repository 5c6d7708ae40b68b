"""Validated reading of safetensors headers, without touching tensor data.

A safetensors file is an 8-byte little-endian length ``N``, ``N`` bytes of JSON (per tensor: dtype,
shape, ``data_offsets`` relative to the data section; optionally ``__metadata__``), then the data.
Everything moetool needs for inspection (names, dtypes, shapes, sizes) is in the header, so this
module reads exactly ``8 + N`` bytes and checks the header the way the safetensors library's own
``validate()`` does: sane length, strict JSON, known dtypes, shape x dtype = byte range, offsets
contiguous from 0 and covering the whole data section. Every problem is a :class:`CheckpointError`
with its own ``code``. No torch or numpy here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetool.errors import CheckpointError
from moetool.io.jsonfile import loads_strict

#: Bits per element of every dtype string the safetensors format defines (safetensors 0.8).
DTYPE_BITS: dict[str, int] = {
    "F64": 64,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F32": 32,
    "I32": 32,
    "U32": 32,
    "F16": 16,
    "BF16": 16,
    "I16": 16,
    "U16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}

#: The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024

METADATA_KEY = "__metadata__"

# Sizes are u64 in the format; a tensor whose bit count reaches 2**63 cannot exist on any disk, and
# stopping there keeps the arithmetic bounded for hostile shapes like [2**62] * 1000.
_SIZE_LIMIT = 2**63
_U64_MAX = 2**64 - 1

HINT_REDOWNLOAD = (
    "re-download the file (hf download REPO --force-download, or check it with hf cache verify) "
    "or re-save it with safetensors"
)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor entry of a safetensors header.

    Attributes:
        name: the tensor name.
        dtype: the safetensors dtype string, e.g. ``"BF16"``.
        shape: the logical shape (for ``F4`` the element count, two per byte on disk).
        file: the shard file name relative to the model folder.
        data_start: start offset, relative to the start of the data section.
        data_end: end offset (exclusive), relative to the start of the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    data_start: int
    data_end: int

    @property
    def numel(self) -> int:
        """Number of elements: 1 for a 0-dim scalar, 0 when any dimension is 0."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.data_end - self.data_start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file.

    Attributes:
        file: the file name relative to the model folder.
        tensors: tensor name -> :class:`TensorInfo`, in header order.
        metadata: the ``__metadata__`` entry (str -> str), ``{}`` if absent.
        header_len: ``N``, the length of the JSON header in bytes (padding included).
        file_size: the file size in bytes, ``None`` when not known (a remote file).
    """

    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_len: int
    file_size: int | None

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the data section."""
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        """Size of the data section according to the header (the end of the last tensor)."""
        return max((t.data_end for t in self.tensors.values()), default=0)


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: names and shapes in headers can be huge and hostile."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(file: str, what: str, code: str) -> CheckpointError:
    return CheckpointError(f"{file}: {what}", hint=HINT_REDOWNLOAD, code=code)


def _is_size_list(values: Any) -> bool:
    """A JSON list of integers in [0, 2**64), as the format's u64 sizes and offsets require."""
    # `type(v) is int`, not isinstance: JSON true/false arrive as bool, an int subclass.
    return type(values) is list and all(type(v) is int and 0 <= v <= _U64_MAX for v in values)


def _parse_entry(file: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """Check the types of one tensor entry; return (dtype, shape, start, end)."""

    def bad(what: str) -> CheckpointError:
        return _invalid(file, f"header entry for tensor {short_repr(name)} {what}", "HEADER_INVALID_JSON")

    if not isinstance(entry, dict):
        raise bad(f"is a JSON {type(entry).__name__}, not an object")
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError:
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        raise bad(f"lacks {', '.join(missing)}") from None
    if not isinstance(dtype, str):
        raise bad("has a non-string dtype")
    if dtype not in DTYPE_BITS:
        raise bad(f"has unknown dtype {short_repr(dtype, 40)} (known: {', '.join(DTYPE_BITS)})")
    if not _is_size_list(shape):
        raise bad("has a shape that is not a list of non-negative integers")
    if not (_is_size_list(offsets) and len(offsets) == 2):
        raise bad("has data_offsets that are not two non-negative integers [start, end]")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _expected_nbytes(file: str, name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype and shape occupies; refuses absurd shapes without big arithmetic."""
    bits = DTYPE_BITS[dtype]
    total = bits
    for dim in shape:
        total *= dim
        if total >= _SIZE_LIMIT:
            # Like safetensors' checked_mul: overflow is reported even if a later dimension is 0.
            raise _invalid(
                file,
                f"tensor {short_repr(name)} has shape {short_repr(list(shape))} whose size overflows 2**63 bits",
                "VALIDATION_OVERFLOW",
            )
    if total % 8:
        # Sub-byte dtypes (F4, F6_*) must fill whole bytes; safetensors refuses misaligned tensors too.
        raise _invalid(
            file,
            f"tensor {short_repr(name)} ({dtype}, shape {short_repr(list(shape))}) "
            "does not fill a whole number of bytes",
            "TENSOR_INVALID_INFO",
        )
    return total // 8


def parse_header(header_json: bytes, *, file: str, data_size: int | None) -> SafetensorsHeader:
    """Parse and validate the JSON header of a safetensors file.

    Args:
        header_json: the ``N`` header bytes (after the 8-byte length prefix), padding included.
        file: the file name to report in errors and to store in each :class:`TensorInfo`.
        data_size: the size of the data section (file size - 8 - N) when known; ``None`` skips the
            truncation / trailing-data check (remote headers).

    Returns:
        The validated header, ``header_len = len(header_json)``.

    Raises:
        CheckpointError: ``HEADER_INVALID_UTF8``, ``HEADER_INVALID_JSON``, ``VALIDATION_OVERFLOW``,
            ``TENSOR_INVALID_INFO``, ``INVALID_OFFSET``, ``SHARD_TRUNCATED`` or ``SHARD_TRAILING_DATA``.
    """
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(
            file, f"header is not valid UTF-8 (byte {exc.start} of the header)", "HEADER_INVALID_UTF8"
        ) from None
    try:
        doc = loads_strict(text, what=f"{file}: header", error=CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(exc.message, hint=HINT_REDOWNLOAD, code="HEADER_INVALID_JSON") from None
    if not isinstance(doc, dict):
        raise _invalid(file, f"header is a JSON {type(doc).__name__}, not an object", "HEADER_INVALID_JSON")

    metadata = doc.get(METADATA_KEY)
    if metadata is None:  # absent, or null as serde's Option accepts
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(file, f"{METADATA_KEY} must map strings to strings", "HEADER_INVALID_JSON")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if name == METADATA_KEY:
            continue
        dtype, shape, start, end = _parse_entry(file, name, entry)
        tensors[name] = TensorInfo(name, dtype, shape, file, start, end)

    # Header order need not be offset order (older writers sorted by name): validate in offset order,
    # as safetensors does. Each tensor must start where the previous one ended: no gap, no overlap.
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.data_start, t.data_end)):
        if info.data_start != position or info.data_end < info.data_start:
            if info.data_end < info.data_start:
                why = "ends before it starts"
            elif info.data_start > position:
                why = f"leaves a gap: it starts at {info.data_start}, the previous data ends at {position}"
            else:
                why = f"overlaps the previous data: it starts at {info.data_start}, before {position}"
            raise _invalid(
                file,
                f"tensor {short_repr(info.name)} has invalid data_offsets [{info.data_start}, {info.data_end}]: {why}",
                "INVALID_OFFSET",
            )
        position = info.data_end
        expected = _expected_nbytes(file, info.name, info.dtype, info.shape)
        if info.nbytes != expected:
            raise _invalid(
                file,
                f"tensor {short_repr(info.name)} ({info.dtype}, shape {short_repr(list(info.shape))}) "
                f"needs {expected} bytes "
                f"but its data_offsets span {info.nbytes}",
                "TENSOR_INVALID_INFO",
            )

    if data_size is not None and position != data_size:
        actual = 8 + len(header_json) + data_size
        expected_file = 8 + len(header_json) + position
        if data_size < position:
            raise _invalid(
                file,
                f"file is truncated: the header needs {expected_file} bytes, the file has {actual}",
                "SHARD_TRUNCATED",
            )
        raise _invalid(
            file,
            f"file has {actual - expected_file} bytes after the last tensor "
            f"(expected size {expected_file}, actual {actual})",
            "SHARD_TRAILING_DATA",
        )

    return SafetensorsHeader(
        file=file,
        tensors=tensors,
        metadata=dict(metadata),
        header_len=len(header_json),
        file_size=None if data_size is None else 8 + len(header_json) + data_size,
    )


def check_header_length(n: int, *, file: str, file_size: int | None) -> None:
    """Check the 8-byte length prefix before anything of that size is read or allocated.

    Args:
        n: the header length the prefix claims.
        file: the file name for error messages.
        file_size: the file size when known.

    Raises:
        CheckpointError: ``HEADER_TOO_LARGE`` above :data:`MAX_HEADER_BYTES`, ``INVALID_HEADER_LENGTH``
            for 0 or a length past the end of the file.
    """
    if n > MAX_HEADER_BYTES:
        raise _invalid(
            file,
            f"header length prefix claims {n} bytes, above the {MAX_HEADER_BYTES} limit",
            "HEADER_TOO_LARGE",
        )
    if n == 0:
        raise _invalid(file, "header length prefix is 0", "INVALID_HEADER_LENGTH")
    if file_size is not None and n > file_size - 8:
        raise _invalid(
            file,
            f"header length prefix claims {n} bytes but only {file_size - 8} follow it "
            "(the file is truncated or not a safetensors file)",
            "INVALID_HEADER_LENGTH",
        )


def read_header(path: Path, *, file: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file, reading only ``8 + N`` bytes.

    Args:
        path: the file to read.
        file: the name to report and store (the shard name relative to the model folder); defaults
            to ``path.name``.

    Returns:
        The validated header, with ``file_size`` set.

    Raises:
        CheckpointError: ``HEADER_TOO_SMALL`` for files under 8 bytes, ``SHARD_UNREADABLE`` when the
            file cannot be opened, and every error of :func:`check_header_length` and
            :func:`parse_header`.
    """
    path = Path(path)
    name = file if file is not None else path.name
    try:
        with open(path, "rb") as fh:
            # fstat on the open descriptor: the size of the file we actually read.
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _invalid(
                    name, f"file is {size} bytes, too small to hold a safetensors header", "HEADER_TOO_SMALL"
                )
            (n,) = struct.unpack("<Q", fh.read(8))
            check_header_length(n, file=name, file_size=size)
            header_json = fh.read(n)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {name} ({path}): {exc.strerror or exc}",
            hint="check that the file exists and is readable",
            code="SHARD_UNREADABLE",
        ) from None
    if len(header_json) != n:
        # The file shrank between fstat and read.
        raise _invalid(name, f"file ended inside the header ({len(header_json)} of {n} bytes)", "SHARD_TRUNCATED")
    return parse_header(header_json, file=name, data_size=size - 8 - n)
