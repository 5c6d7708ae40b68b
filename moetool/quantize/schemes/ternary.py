"""``ternary``: codes -1/0/+1 with a scale per group, one entropy-coded stream per tensor (QMoE-style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moetool.quantize.codec import CODEC_LZMA2_BASE3, CODEC_NAMES
from moetool.quantize.schemes.base import Expect, Scheme

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid
    from moetool.quantize.request import QuantizeOptions
    from moetool.quantize.storage import QuantFormat

TERNARY_CODEC = CODEC_NAMES[CODEC_LZMA2_BASE3]


class TernaryScheme(Scheme):
    """:class:`~moetool.quantize.grids.TernaryGrid` codes, stored by :mod:`moetool.quantize.codec` and held
    in memory as 2-bit codes."""

    name = "ternary"
    codec = TERNARY_CODEC

    def request_bits(self, bits: int | None, method: str) -> int | None:
        return None  # ternary codes have no fixed width on disk

    def config_error(self, qc: Mapping[str, Any]) -> str | None:
        codec = qc.get("codec")
        return None if codec == TERNARY_CODEC else f"codec {codec!r} (ternary codes use {TERNARY_CODEC})"

    def config_bits(self, qc: Mapping[str, Any]) -> int | None:
        return None

    def grid(self, fmt: QuantFormat, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        from moetool.quantize.grids import TernaryGrid

        return TernaryGrid(scale_factor=ternary_scale)

    def details(self, request: QuantizeOptions) -> dict[str, Any]:
        out: dict[str, Any] = {"ternary_bits_target": request.ternary_bits or None}
        if not request.ternary_bits:
            out["ternary_scale"] = request.ternary_scale
        return out

    def card_options(self, request: QuantizeOptions) -> dict[str, Any]:
        if request.ternary_bits:
            return {"ternary bits target": request.ternary_bits}
        return {"ternary scale": request.ternary_scale}

    def encode_codes(self, codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        import torch

        from moetool.quantize.codec import encode_trits

        return torch.frombuffer(bytearray(encode_trits(codes)), dtype=torch.uint8)

    def decode_codes(
        self, raw: torch.Tensor, shape: tuple[int, ...], fmt: QuantFormat, expect: Expect, where: str
    ) -> tuple[torch.Tensor, int]:
        import torch

        from moetool.errors import CheckpointError
        from moetool.quantize.codec import decode_trits
        from moetool.quantize.pack import pack_bits

        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise CheckpointError(
                f"{where} must be a 1-D uint8 stream, got {raw.dtype} {list(raw.shape)}",
                hint="the checkpoint does not match its quantization_config; re-create it",
                code="QUANT_SHAPE_MISMATCH",
            )
        count = 1
        for dim in shape:
            count *= dim
        trits = decode_trits(raw.numpy().tobytes(), count).reshape(shape)
        return pack_bits(trits, 2), 2
