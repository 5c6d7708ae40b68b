"""Output sizes known before anything is computed, for the free-space preflight of writing commands.

merge and upcycle plan every output tensor up front, so they know their size exactly. quantize does
not plan its packed tensors before it runs, but their size follows from the shapes and the format:
:func:`estimate_quantized_bytes` gives it from the headers alone, slightly on the high side, so a
disk that cannot hold the result is refused before the model is even loaded.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

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
