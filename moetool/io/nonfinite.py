"""Count NaN and infinite values in safetensors files, one tensor (and one bounded chunk) at a time.

safetensors never checks values, so a checkpoint can hold NaN or Inf that every later step silently
spreads (a merge averages them into other experts, a quantizer turns them into garbage scales). This
module finds them by the bits of each float format (exponent all ones: Inf when the mantissa is zero,
NaN otherwise), with numpy on plain ``read()`` calls:

* no torch, so ``inspect --scan-nonfinite`` stays light;
* no mmap, so a file truncated while it is scanned is a short read, reported as
  :class:`~moetool.errors.InputChangedError`, never a SIGBUS;
* memory holds one chunk (:data:`CHUNK_BYTES`) whatever the tensor size.

Results are remembered per file (path, size, mtime, inode), so a command that validates its input in
the CLI and again in the library reads the data once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetool.errors import CheckpointError, InputChangedError
from moetool.io.safetensors_header import SafetensorsHeader, TensorInfo, read_header

#: Bytes read (and held) at a time.
CHUNK_BYTES = 32 * 1024 * 1024

# dtype -> (unsigned integer width in bytes, exponent mask, mantissa mask) of IEEE-style formats with
# Inf and NaN encodings (exponent all ones).
_IEEE: dict[str, tuple[int, int, int]] = {
    "F64": (8, 0x7FF0_0000_0000_0000, 0x000F_FFFF_FFFF_FFFF),
    "F32": (4, 0x7F80_0000, 0x007F_FFFF),
    "F16": (2, 0x7C00, 0x03FF),
    "BF16": (2, 0x7F80, 0x007F),
    "F8_E5M2": (1, 0x7C, 0x03),
}
# Formats without Inf whose only NaN patterns are listed (the sign bit does not matter).
_NAN_ONLY: dict[str, tuple[int, ...]] = {
    "F8_E4M3": (0x7F, 0xFF),  # e4m3fn: S.1111.111
    "F8_E4M3FNUZ": (0x80,),  # "negative zero" is the NaN
    "F8_E5M2FNUZ": (0x80,),
    "F8_E8M0": (0xFF,),
}

#: dtypes the scan can say something about (integer and sub-byte float formats cannot hold NaN/Inf).
SCANNED_DTYPES = frozenset(_IEEE) | frozenset(_NAN_ONLY)


@dataclass(frozen=True)
class NonfiniteCount:
    """NaN and infinite values found in one tensor.

    Attributes:
        tensor: the tensor name.
        file: the shard that holds it.
        nan: number of NaN values.
        inf: number of +Inf or -Inf values.
    """

    tensor: str
    file: str
    nan: int
    inf: int

    @property
    def total(self) -> int:
        return self.nan + self.inf

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "file": self.file, "nan": self.nan, "inf": self.inf}


# (real path, size, mtime_ns, inode, device) -> every tensor of that file with a non-finite value.
_MEMO: dict[tuple[str, int, int, int, int], list[NonfiniteCount]] = {}


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _changed(path: Path, file: str, what: str) -> InputChangedError:
    return InputChangedError(
        f"{file} changed while being read ({what})",
        hint=f"make sure no other program writes {path} while moetool runs, then run the command again",
    )


# dtypes numpy computes with natively: np.isfinite is several times faster than bit masks there.
_NATIVE = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _count_chunk(np: Any, data: memoryview, dtype: str) -> tuple[int, int]:
    if dtype in _NATIVE:
        values = np.frombuffer(data, dtype=np.dtype(_NATIVE[dtype]))
        if np.isfinite(values).all():  # the common case: one pass
            return 0, 0
        return int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))
    if dtype in _IEEE:
        width, exp_mask, man_mask = _IEEE[dtype]
        words = np.frombuffer(data, dtype=np.dtype(f"<u{width}"))
        # Without the sign bit, NaN and Inf are exactly the values >= the all-ones exponent.
        if int((words & (exp_mask | man_mask)).max(initial=0)) < exp_mask:
            return 0, 0
        hits = words[(words & exp_mask) == exp_mask]
        nan = int(np.count_nonzero(hits & man_mask))
        return nan, int(hits.size) - nan
    bytes_ = np.frombuffer(data, dtype=np.uint8)
    nan = sum(int(np.count_nonzero(bytes_ == pattern)) for pattern in _NAN_ONLY[dtype])
    return nan, 0


def _scan_tensor(
    np: Any,
    handle: Any,
    header: SafetensorsHeader,
    info: TensorInfo,
    buffer: bytearray,
    path: Path,
    on_bytes: Callable[[int], None] | None,
) -> tuple[int, int]:
    width = _IEEE[info.dtype][0] if info.dtype in _IEEE else 1
    handle.seek(header.data_offset + info.data_start)
    remaining = info.nbytes
    nan = inf = 0
    view = memoryview(buffer)
    while remaining:
        want = min(remaining, len(buffer))
        got = handle.readinto(view[:want])
        if got != want:
            raise _changed(path, header.file, f"it ended {remaining - (got or 0)} bytes early")
        usable = got - got % width  # chunks are multiples of every width; this only guards odd sizes
        n, i = _count_chunk(np, view[:usable], info.dtype)
        nan += n
        inf += i
        remaining -= got
        if on_bytes is not None:
            on_bytes(got)
    return nan, inf


def scan_file(
    path: Path,
    *,
    file: str | None = None,
    header: SafetensorsHeader | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> list[NonfiniteCount]:
    """Count NaN/Inf in every float tensor of one safetensors file.

    Args:
        path: the file.
        file: the name to report (default: the file name).
        header: its already validated header (read again when ``None``).
        on_bytes: progress callback, bytes read.

    Returns:
        The tensors that hold at least one NaN or Inf, in file order.

    Raises:
        InputChangedError: the file is not the size its header says, or shrank while being read.
        CheckpointError: the header is invalid (when it is read here).
    """
    path = Path(path)
    name = file if file is not None else path.name
    key = _file_key(path)
    if key in _MEMO:
        return list(_MEMO[key])
    if header is None:
        header = read_header(path, file=name)
    expected = header.data_offset + header.data_size
    if key[1] != expected:
        raise _changed(path, name, f"it is {key[1]:,} bytes, its header says {expected:,}")
    import numpy as np

    found: list[NonfiniteCount] = []
    buffer = bytearray(CHUNK_BYTES)
    try:
        with open(path, "rb") as handle:
            for info in sorted(header.tensors.values(), key=lambda t: t.data_start):
                if info.dtype not in SCANNED_DTYPES or not info.nbytes:
                    continue
                nan, inf = _scan_tensor(np, handle, header, info, buffer, path, on_bytes)
                if nan or inf:
                    found.append(NonfiniteCount(info.name, name, nan, inf))
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {name} ({path}): {exc.strerror or exc}",
            hint="check that the file exists and is readable",
            code="SHARD_UNREADABLE",
        ) from None
    if _file_key(path) != key:
        raise _changed(path, name, "its size or modification time changed during the scan")
    _MEMO[key] = list(found)
    return found


def scan_checkpoint(
    checkpoint: Any,
    names: Iterable[str] | None = None,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> list[NonfiniteCount]:
    """Count NaN/Inf in the float tensors of a local checkpoint, one shard at a time.

    Args:
        checkpoint: an opened :class:`~moetool.io.checkpoint.Checkpoint` with a local folder.
        names: only report these tensors (all when ``None``); shards holding none of them are skipped.
        on_bytes: progress callback, bytes read.

    Returns:
        The tensors holding at least one NaN or Inf, in shard then file order.

    Raises:
        CheckpointError: ``NO_LOCAL_WEIGHTS`` for a checkpoint read from its headers only.
        InputChangedError: a shard changed since it was opened.
    """
    if checkpoint.root is None:
        raise CheckpointError(
            f"{checkpoint.name} was read from its headers only; scanning values needs the weights",
            hint="download the checkpoint (hf download REPO) and pass the local folder",
            code="NO_LOCAL_WEIGHTS",
        )
    from moetool.io.checkpoint import resolve_inside

    wanted = None if names is None else set(names)
    by_shard: dict[str, dict[str, TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        by_shard.setdefault(info.file, {})[info.name] = info
    found: list[NonfiniteCount] = []
    for shard in checkpoint.shards:
        tensors = by_shard.get(shard, {})
        if wanted is not None and not wanted.intersection(tensors):
            continue
        path = resolve_inside(checkpoint.root, shard)
        try:
            header = read_header(path, file=shard)
        except CheckpointError as exc:
            raise _changed(path, shard, exc.message) from None
        if header.tensors.keys() != tensors.keys():
            raise _changed(path, shard, "its tensors are not the ones it held when it was opened")
        hits = scan_file(path, file=shard, header=header, on_bytes=on_bytes)
        found += [hit for hit in hits if wanted is None or hit.tensor in wanted]
    return found


def scan_folder(folder: Path) -> list[NonfiniteCount]:
    """Count NaN/Inf in every ``*.safetensors`` file directly inside ``folder`` (an output being written).

    Args:
        folder: the folder; other files are ignored.

    Returns:
        The tensors holding at least one NaN or Inf.
    """
    found: list[NonfiniteCount] = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.is_file() and not path.is_symlink():
            found += scan_file(path)
    return found


def describe(found: list[NonfiniteCount], limit: int = 3) -> str:
    """``"3 tensor(s) hold NaN/Inf: a (2 NaN), b (1 Inf) and 1 more"`` for one-line messages."""
    parts = []
    for hit in found[:limit]:
        what = " and ".join(f"{n:,} {kind}" for n, kind in ((hit.nan, "NaN"), (hit.inf, "Inf")) if n)
        parts.append(f"{hit.tensor} ({what})")
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"{len(found)} tensor(s) hold NaN/Inf: {', '.join(parts)}{more}"
