"""``nf4``: bitsandbytes' 4-bit NormalFloat code book with an absmax scale per group."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.quantize.schemes.codebook import CodebookScheme

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid
    from moetool.quantize.storage import QuantFormat


class NF4Scheme(CodebookScheme):
    """:class:`~moetool.quantize.grids.NF4Grid` codes; on CUDA the loader dequantizes with bitsandbytes'
    own kernel when it is installed (the same values)."""

    name = "nf4"

    def grid(self, fmt: QuantFormat, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        from moetool.quantize.grids import NF4Grid

        return NF4Grid()

    def dequantize(
        self,
        fmt: QuantFormat,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        bits: int,
        columns: int,
    ) -> torch.Tensor:
        from moetool.quantize import bnb

        if bnb.usable(codes, columns, fmt.group_size):  # bitsandbytes' kernel on CUDA, same values
            return bnb.dequantize_nf4(codes, scale, columns, fmt.group_size)
        return super().dequantize(fmt, codes, scale, zero, bits, columns)
