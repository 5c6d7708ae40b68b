"""Bit packing of integer codes: exact round trips for 1 to 8 bits per code, and 5 trits per byte.

Codes are packed along the last dimension, each row on its own, so that a packed ``[..., rows, n]``
tensor can be sliced by expert or by row before unpacking (the loader dequantizes one expert at a
time). The bit order is little-endian: code ``i`` of a row occupies bits ``i*b .. i*b+b-1`` of the
row's bit string, and bit ``k`` of the string is bit ``k % 8`` of byte ``k // 8``. A row of ``n``
codes takes ``ceil(n * b / 8)`` bytes; the unused high bits of the last byte are zero.

Ternary codes (0, 1, 2 for -1, 0, +1) also pack five to a byte in base 3 (``3**5 = 243 <= 256``):
1.6 bits per trit before entropy coding (:mod:`moetool.quantize.codec` goes below that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take in one packed row."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into uint8.

    Args:
        codes: any integer tensor ``[..., n]``; values outside the range are an error.
        bits: bits per code, 1 to 8.

    Returns:
        uint8 ``[..., ceil(n * bits / 8)]``.

    Raises:
        ValueError: a bad ``bits`` or a code that does not fit.
    """
    import torch

    _check_bits(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    # Eight codes of b bits are exactly b bytes: pack each run of eight into one 64-bit integer and cut
    # it into bytes. The same little-endian bit string as code-by-code packing, without a bit tensor.
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*lead, -1, 8).to(torch.int64)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
    value = (runs << code_shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
    packed = ((value >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)
    return packed[..., : packed_size(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes of every packed row, as uint8.

    Raises:
        ValueError: a bad ``bits``, or rows too short for ``n`` codes.
    """
    import torch

    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] < packed_size(n, bits):
        raise ValueError(f"a packed row of {packed.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed[..., :n].contiguous()
    lead = packed.shape[:-1]
    runs = (n + 7) // 8
    packed = packed[..., : packed_size(n, bits)]
    pad = runs * bits - packed.shape[-1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    grouped = packed.reshape(*lead, runs, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    value = (grouped << byte_shifts).sum(-1, keepdim=True)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    codes = ((value >> code_shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.reshape(*lead, runs * 8)[..., :n].contiguous()


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of trits (0, 1, 2) five per byte, in base 3 (first trit least significant).

    Returns:
        uint8 ``[ceil(n / 5)]``; padding trits are 0.

    Raises:
        ValueError: a value outside 0..2.
    """
    import torch

    flat = trits.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2):
        raise ValueError("trits must be 0, 1 or 2")
    pad = (-flat.numel()) % TRITS_PER_BYTE
    flat = flat.to(torch.int32)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=flat.device)
    return (flat.reshape(-1, TRITS_PER_BYTE) * pow3).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``n`` trits, as uint8.

    Raises:
        ValueError: too few bytes for ``n`` trits, or a byte above 242 (not a base-3 group of five).
    """
    import torch

    flat = packed.reshape(-1)
    if flat.numel() * TRITS_PER_BYTE < n:
        raise ValueError(f"{flat.numel()} bytes cannot hold {n} trits")
    if flat.numel() and int(flat.max()) > 242:
        raise ValueError("a byte above 242 is not five base-3 trits")
    values = flat.to(torch.int32).unsqueeze(-1)
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=flat.device)
    return ((values // pow3) % 3).reshape(-1)[:n].to(torch.uint8)
