"""bitsandbytes where it does real work for moetool: its NF4 dequantization kernel in the loader.

What bitsandbytes 0.50 and transformers 5.25 can and cannot do with MoE experts (checked here, CPU):

* transformers' bitsandbytes integration replaces ``nn.Linear`` modules only. transformers 5 keeps
  routed experts as fused 3-D parameters, so ``load_in_4bit`` leaves them in full precision, and a
  pre-quantized checkpoint's per-expert 4-bit tensors have no load operation that turns them into
  those parameters (its 4-bit quantizer has a "deserialize" operation for linear modules, no
  "dequantize" one for the per-expert merge). The exception is Llama-4, whose experts transformers
  unfolds into per-expert linears for bitsandbytes; moetool does not quantize Llama-4's transposed
  experts. So there is no ``--format bnb-nf4`` checkpoint transformers would load right.
* moetool's ``--method nf4`` uses bitsandbytes' NF4 code book; where the row length is a multiple of
  the group size and the group size is one of bitsandbytes' block sizes, its codes and absmax scales
  are exactly a bitsandbytes 4-bit tensor (nibbles swapped, scales widened to float32). On a CUDA
  device the loader then dequantizes each expert with bitsandbytes' kernel (:func:`dequantize_nf4`)
  instead of unpacking and indexing in PyTorch; the values are identical (code value times absmax, in
  float32).

bitsandbytes is optional: without it, or on the CPU (where importing it may try to fetch kernels from
the Hub and prints a notice), moetool's own PyTorch code dequantizes.
"""

from __future__ import annotations

import contextlib
import io
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: bitsandbytes' 4-bit block sizes (its kernels' template instances).
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@cache
def functional() -> Any | None:
    """``bitsandbytes.functional``, imported quietly once, or ``None`` when it is unusable."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes.functional as bnb_f
    except Exception:  # ImportError, or a native library that fails to load
        return None
    return bnb_f


def usable(codes: torch.Tensor, columns: int, group_size: int, *, cpu: bool = False) -> bool:
    """Whether :func:`dequantize_nf4` applies: a CUDA tensor (or ``cpu``), rows made of whole blocks of a
    size bitsandbytes has, and bitsandbytes importable."""
    if codes.device.type != "cuda" and not cpu:
        return False
    if group_size not in BLOCK_SIZES or columns % group_size or columns % 2:
        return False
    return functional() is not None


def dequantize_nf4(codes: torch.Tensor, scale: torch.Tensor, columns: int, group_size: int) -> torch.Tensor:
    """Float32 weights ``[..., rows, columns]`` from moetool's packed NF4 codes and scales, by bitsandbytes.

    Args:
        codes: uint8 ``[..., rows, columns / 2]``, moetool's packing (first code in the low nibble).
        scale: ``[..., rows, columns / group_size]`` absmax scales.
        columns / group_size: the row length and the group (block) size.
    """
    import torch

    bnb_f = functional()
    assert bnb_f is not None
    *lead, rows, _ = codes.shape
    # bitsandbytes packs the first code of a pair in the high nibble, over the flattened tensor; with
    # whole blocks per row its blocks are moetool's row groups.
    swapped = ((codes << 4) | (codes >> 4)).reshape(-1, 1).contiguous()
    state = bnb_f.QuantState(
        absmax=scale.float().reshape(-1).contiguous(),
        shape=torch.Size([*lead, rows, columns]),
        code=bnb_f.get_4bit_type("nf4", device=codes.device),
        blocksize=group_size,
        quant_type="nf4",
        dtype=torch.float32,
    )
    return bnb_f.dequantize_4bit(swapped, state)
