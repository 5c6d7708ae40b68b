"""NF4: bitsandbytes' 4-bit NormalFloat codes, with one absmax scale per group.

The code book is bitsandbytes' (:data:`moetool.quantize.grids.NF4_VALUES`); a weight goes to the
nearest code value after division by its group's absmax, as ``bitsandbytes.functional.quantize_4bit``
does with ``quant_type="nf4"``. Differences from bitsandbytes' own storage: groups run along each row
(bitsandbytes blocks the flattened tensor; the two agree when the row length is a multiple of the
group size), the absmax is stored as float16 (bitsandbytes: float32, or 8-bit with double
quantization), and codes are packed low nibble first. :func:`bitsandbytes_nf4` runs bitsandbytes itself
when it is installed, for cross-checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.quantize.grids import NF4Grid
from moetool.quantize.rtn import QuantizedWeight, rtn_quantize

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit


def nf4_quantize(weight: torch.Tensor, group_size: int = DEFAULT_BLOCK) -> QuantizedWeight:
    """NF4 codes and float16 absmax scales of ``weight [..., rows, columns]`` (round to nearest)."""
    return rtn_quantize(weight, NF4Grid(), group_size)


def bitsandbytes_nf4(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor] | None:
    """bitsandbytes' own NF4 codes (unpacked, row-major) and dequantized weights, or ``None`` without it.

    Only for cross-checking :func:`nf4_quantize`; bitsandbytes is not a dependency.
    """
    try:
        import bitsandbytes.functional as bnb_f
    except Exception:  # ImportError, or a broken native library
        return None
    import torch

    w = weight.detach().float().contiguous()
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    flat = packed.reshape(-1)
    # bitsandbytes puts the first code of a pair in the high nibble.
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[: w.numel()].reshape(w.shape)
    return codes.to(torch.uint8), bnb_f.dequantize_4bit(packed, state).float()
