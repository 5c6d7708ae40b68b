"""Build malformed copies of a checkpoint: lying configs, wrong shapes, missing tensors, NaN weights.

Each helper works on a copy (see :func:`copy_checkpoint`), never on the original, and returns the folder.
Used by tests/test_validate.py, tests/test_faults.py and the fuzz test.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "examples" / "tiny-moe"
SHARD = "model.safetensors"
ROUTER = "model.layers.{L}.block_sparse_moe.gate.weight"
EXPERT = "model.layers.{L}.block_sparse_moe.experts.{E}.{P}.weight"


def copy_checkpoint(dst: Path, src: Path = TINY_MOE) -> Path:
    """Copy a checkpoint folder (regular files, no symlinks) to ``dst``."""
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, change: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> Path:
    """Set config.json fields (``None`` deletes one), or apply ``change`` to the parsed config."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    if change is not None:
        change(config)
    path.write_text(json.dumps(config, indent=2))
    return folder


def read_raw_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header JSON of a safetensors file and its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    """Write a safetensors file from a header document and a data section, as given (no checks)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(folder: Path, change: Callable[[dict[str, Any]], None], shard: str = SHARD) -> Path:
    """Apply ``change`` to the header JSON of a shard; the data section stays byte for byte."""
    path = folder / shard
    header, data = read_raw_header(path)
    change(header)
    write_raw_header(path, header, data)
    return folder


def rewrite_tensors(folder: Path, change: Callable[[dict[str, Any]], None], shard: str = SHARD) -> Path:
    """Load a shard's tensors (torch), let ``change`` edit the dict, save it back (valid safetensors)."""
    from safetensors.torch import load_file, save_file

    path = folder / shard
    tensors = load_file(str(path))
    change(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def put_nonfinite(folder: Path, name: str, nan: int = 2, inf: int = 1) -> Path:
    """Write ``nan`` NaN and ``inf`` +Inf values at the start of one tensor."""

    def change(tensors: dict[str, Any]) -> None:
        flat = tensors[name].view(-1)
        flat[:nan] = float("nan")
        flat[nan : nan + inf] = float("inf")

    return rewrite_tensors(folder, change)


def drop_tensor(folder: Path, name: str) -> Path:
    """Remove one tensor."""
    return rewrite_tensors(folder, lambda tensors: tensors.pop(name))


def transpose_tensor(folder: Path, name: str) -> Path:
    """Store one 2-D tensor transposed."""

    def change(tensors: dict[str, Any]) -> None:
        tensors[name] = tensors[name].t().contiguous()

    return rewrite_tensors(folder, change)


def truncate_rows(folder: Path, name: str, rows: int) -> Path:
    """Keep the first ``rows`` rows of one tensor (a router with fewer rows than experts)."""

    def change(tensors: dict[str, Any]) -> None:
        tensors[name] = tensors[name][:rows].contiguous()

    return rewrite_tensors(folder, change)


def to_dtype(folder: Path, names: list[str], dtype: str) -> Path:
    """Store some tensors in another torch dtype (``float8_e4m3fn`` for an FP8 input)."""
    import torch

    def change(tensors: dict[str, Any]) -> None:
        for name in names:
            tensors[name] = tensors[name].to(getattr(torch, dtype))

    return rewrite_tensors(folder, change)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (to prove an input was left untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
