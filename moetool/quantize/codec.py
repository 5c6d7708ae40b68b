"""Entropy-coded storage of ternary codes: below 1 bit per weight when most codes are 0.

A ternary weight carries ``log2(3) = 1.58`` bits at most, but the codes of a ternary-quantized expert
are far from uniform (with the scale at the group's absmax, 80-90% are 0), and their entropy is well
under 1 bit. The stream stores them in two exact steps:

1. five trits per byte in base 3 (:func:`moetool.quantize.pack.pack_trits`): 243 symbols;
2. LZMA2 (a range coder over the bytes, with matches) in raw mode, with literal-context bits 0: each
   byte is then coded by its own frequency, which comes within about 3% of the order-0 entropy of the
   codes; the match finder is set for speed (hash chains, short matches), since the codes have little
   repetition for matches to exploit.

Layout of a stream (a uint8 tensor in the safetensors file): ``MTQ3`` magic, version (1 byte), codec
id (1 byte), the number of trits (uint64, little-endian), the LZMA2 dictionary size (uint32), the CRC-32
of the base-3 bytes (uint32), then the LZMA2 data (raw LZMA2 has no checksum of its own). Decoding
checks every field, caps the output at the expected size (no decompression bomb), refuses trailing
bytes and checks the CRC, so a corrupt or truncated stream is an error, never wrong weights.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from typing import TYPE_CHECKING

from moetool.errors import CheckpointError
from moetool.quantize.pack import TRITS_PER_BYTE, pack_trits, unpack_trits

if TYPE_CHECKING:
    import torch

MAGIC = b"MTQ3"
VERSION = 1
CODEC_LZMA2_BASE3 = 1
CODEC_NAMES = {CODEC_LZMA2_BASE3: "lzma2-base3"}
_HEADER = struct.Struct("<4sBBQII")
_DICT_SIZE = 1 << 20  # the codes have no long-range repetition; a small window encodes fastest


def _filters(dict_size: int, *, encode: bool) -> list[dict]:
    if not encode:
        return [{"id": lzma.FILTER_LZMA2, "dict_size": dict_size}]
    return [
        {
            "id": lzma.FILTER_LZMA2,
            "dict_size": dict_size,
            # Literal coding by the byte alone (no context from the previous byte or position): the
            # codes are close to independent, and context bits only split the statistics thinner.
            "lc": 0,
            "lp": 0,
            "pb": 0,
            "mode": lzma.MODE_NORMAL,  # optimal parsing: the range coder is what matters here
            "mf": lzma.MF_HC3,
            "nice_len": 8,
            "depth": 1,
        }
    ]


def encode_trits(trits: torch.Tensor) -> bytes:
    """Code ternary codes (values 0, 1, 2; any shape, read row-major) into a self-describing stream."""
    count = int(trits.numel())
    packed = pack_trits(trits).cpu().numpy().tobytes()
    payload = lzma.compress(packed, format=lzma.FORMAT_RAW, filters=_filters(_DICT_SIZE, encode=True))
    return _HEADER.pack(MAGIC, VERSION, CODEC_LZMA2_BASE3, count, _DICT_SIZE, zlib.crc32(packed)) + payload


def stream_count(stream: bytes) -> int:
    """The number of trits a stream holds, from its header.

    Raises:
        CheckpointError: ``QUANT_STREAM_INVALID`` for a stream that is not moetool's ternary format.
    """
    return _parse_header(stream)[0]


def _parse_header(stream: bytes) -> tuple[int, int, int]:
    if len(stream) < _HEADER.size:
        raise _invalid("shorter than its header")
    magic, version, codec, count, dict_size, crc = _HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise _invalid("bad magic bytes")
    if version != VERSION:
        raise _invalid(f"format version {version}, this moetool reads version {VERSION}")
    if codec not in CODEC_NAMES:
        raise _invalid(f"unknown codec id {codec}")
    if not 4096 <= dict_size <= 1 << 30:
        raise _invalid(f"implausible dictionary size {dict_size}")
    return count, dict_size, crc


def _invalid(why: str) -> CheckpointError:
    return CheckpointError(
        f"a ternary code stream is corrupt: {why}",
        hint="the checkpoint is damaged or was not written by moetool quantize; re-create it",
        code="QUANT_STREAM_INVALID",
    )


def decode_trits(stream: bytes, count: int | None = None) -> torch.Tensor:
    """Decode a stream from :func:`encode_trits` into a flat uint8 tensor of trits.

    Args:
        stream: the bytes.
        count: the number of trits expected (checked against the header), when known.

    Raises:
        CheckpointError: ``QUANT_STREAM_INVALID``: bad header, wrong count, corrupt or truncated data,
            trailing bytes.
    """
    stored, dict_size, crc = _parse_header(stream)
    if count is not None and stored != count:
        raise _invalid(f"it holds {stored} codes where {count} are expected")
    want = (stored + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_filters(dict_size, encode=False))
    try:
        packed = decoder.decompress(stream[_HEADER.size :], max_length=want)
        # The end marker may still be pending: more output here means more codes than promised.
        if len(packed) == want and not decoder.eof and decoder.decompress(b"", max_length=1):
            raise _invalid("more codes than its header says")
    except lzma.LZMAError as exc:
        raise _invalid(f"LZMA2 data: {exc}") from None
    if len(packed) != want:
        raise _invalid(f"decoded {len(packed)} bytes, expected {want}")
    if not decoder.eof:
        raise _invalid("truncated (no end marker)")
    if decoder.unused_data:
        raise _invalid("extra bytes after the end marker")
    if zlib.crc32(packed) != crc:
        raise _invalid("checksum mismatch")
    import torch

    try:
        raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.empty(0, dtype=torch.uint8)
        return unpack_trits(raw, stored)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
