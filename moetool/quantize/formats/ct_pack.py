"""compressed-tensors' int32 packing of integer codes ("pack-quantized"), written without the library.

Codes are stored unsigned (a signed code plus ``2**(bits-1)``, which is exactly moetool's unsigned
code), ``32 / bits`` of them per int32 word, code ``i`` of a row in bits ``i*bits .. i*bits+bits-1``
of the row's bit string and word ``w`` holding bits ``32w .. 32w+31`` (little-endian). A row of ``n``
codes takes ``ceil(n * bits / 32)`` words; the unused high bits of the last word are zero. Weights
are packed along their rows (the last dimension); asymmetric zero points along the output dimension
(the second to last). For 4 and 8 bits this is the layout of every compressed-tensors release (older
ones pad other widths differently, which is one reason moetool writes only 4 and 8 bits).

The words are assembled with integer arithmetic, not by reinterpreting bytes, so the result does not
depend on the machine's byte order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.quantize.pack import pack_bits, packed_size, unpack_bits

if TYPE_CHECKING:
    import torch


def words_per_row(n: int, bits: int) -> int:
    """int32 words that ``n`` codes of ``bits`` bits take in one packed row."""
    return (n * bits + 31) // 32


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (values below ``2**bits``) into int32 ``[..., ceil(n*bits/32)]``."""
    import torch

    packed = pack_bits(codes, bits)  # the same little-endian bit string, in bytes
    words = words_per_row(codes.shape[-1], bits)
    pad = 4 * words - packed.shape[-1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    quads = packed.reshape(*packed.shape[:-1], words, 4).to(torch.int64)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=codes.device)
    value = (quads << shifts).sum(-1)
    # Two's complement: words with the top bit set are negative int32s.
    value = torch.where(value >= 1 << 31, value - (1 << 32), value)
    return value.to(torch.int32).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``n`` unsigned codes of every row, as uint8.

    Raises:
        ValueError: not int32, or rows too short for ``n`` codes.
    """
    import torch

    if words.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {words.dtype}")
    if words.shape[-1] < words_per_row(n, bits):
        raise ValueError(f"a packed row of {words.shape[-1]} words cannot hold {n} codes of {bits} bits")
    value = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=words.device)
    quads = ((value.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
    packed = quads.reshape(*words.shape[:-1], -1)[..., : packed_size(n, bits)]
    return unpack_bits(packed.contiguous(), bits, n)


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., rows, groups]`` codes along ``rows`` (compressed-tensors' zero-point layout):
    int32 ``[..., ceil(rows*bits/32), groups]``."""
    return pack_int32(codes.transpose(-1, -2).contiguous(), bits).transpose(-1, -2).contiguous()


def unpack_int32_rows(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32_rows`: uint8 ``[..., rows, groups]``."""
    return unpack_int32(words.transpose(-1, -2).contiguous(), bits, rows).transpose(-1, -2).contiguous()
