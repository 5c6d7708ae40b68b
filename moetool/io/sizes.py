"""Sizes: ``--max-shard-size`` parsed once, and output sizes known before anything is computed.

:func:`parse_size` turns a size the user typed into bytes (the CLI calls it once; libraries take ints).

merge and upcycle plan every output tensor up front, so they know their size exactly. quantize does
not plan its packed tensors before it runs, but their size follows from the shapes and the format:
:func:`estimate_quantized_bytes` gives it from the headers alone, slightly on the high side, so a
disk that cannot hold the result is refused before the model is even loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from moetool.errors import UsageError

# The hub and mergekit convention: many 5 GB shards stream and resume better than a few huge ones.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

# Headers, the index, config and tokenizer files: a little on top of the tensor data.
_SLACK_BYTES = 1 << 20
_SLACK_RATIO = 0.01
# Bits per value of a 16-bit scale (and of a packed zero point, when the format has one).
_SCALE_BITS = 16


def estimate_quantized_bytes(checkpoint: Any, quantized: Collection[str], fmt: Any) -> int:
    """Bytes a quantized copy of ``checkpoint`` takes on disk (a slight overestimate).

    Args:
        checkpoint: the source :class:`~moetool.io.checkpoint.Checkpoint` (headers only are used).
        quantized: the names of the tensors replaced by packed codes; the others are copied.
        fmt: the quantized format: ``bits`` per code (``None``: ternary, counted as 2 bits),
            ``group_size`` columns per scale (0: one per row) and ``zero_point``.

    Returns:
        The estimate, tensor data plus a margin for headers and small files.
    """
    bits = getattr(fmt, "bits", None) or 2
    group = int(getattr(fmt, "group_size", 0) or 0)
    zero_point = bool(getattr(fmt, "zero_point", False))
    total = 0
    for name, info in checkpoint.tensors.items():
        if name not in quantized or not info.shape:
            total += info.nbytes
            continue
        columns = info.shape[-1]
        rows = info.numel // columns if columns else 0
        groups = math.ceil(columns / group) if group else 1
        total += rows * math.ceil(columns * bits / 8)
        total += rows * groups * _SCALE_BITS // 8
        if zero_point:
            total += rows * math.ceil(groups * bits / 8)
    return total + int(total * _SLACK_RATIO) + _SLACK_BYTES


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str | int) -> int:
    """Parse a size such as ``"5GB"``, ``"500MiB"``, ``"500M"`` or ``1000000`` into bytes.

    Decimal units (KB, MB, GB, TB, and the bare K, M, G, T) are powers of 1000, as in
    ``huggingface_hub``; binary units (KiB, MiB, GiB, TiB) are powers of 1024. Case does not matter.

    Args:
        value: an integer number of bytes, or a string with an optional unit.

    Returns:
        The size in bytes, always positive.

    Raises:
        UsageError: the value is not a size, or is zero or negative.
    """
    hint = 'use a positive size such as "5GB", "500MB" or "2GiB"'
    if isinstance(value, bool):  # bool is an int subclass; True is not a size
        raise UsageError(f"invalid size {value!r}", hint=hint)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise UsageError(f"invalid size {value!r}", hint=hint)
        number, prefix, binary, _ = match.groups()
        if binary and not prefix:  # "5iB" is not a unit
            raise UsageError(f"invalid size {value!r}", hint=hint)
        base = 1024 if binary else 1000
        multiplier = base ** _SIZE_POWERS[prefix.lower()]
        # Decimal numbers are allowed ("1.5GB") but the result must be whole bytes.
        if "." in number:
            whole, frac = number.split(".")
            size = int(whole) * multiplier + (int(frac) * multiplier) // (10 ** len(frac))
        else:
            size = int(number) * multiplier
    else:
        raise UsageError(f"invalid size {value!r}", hint=hint)
    if size <= 0:
        raise UsageError(f"size must be positive, got {value!r}", hint=hint)
    return size
