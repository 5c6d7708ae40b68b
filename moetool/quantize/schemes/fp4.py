"""``fp4``: 4-bit floating-point codes (E2M1, the element type of MXFP4 and NVFP4) with a scale per group.

A code is a sign bit and an index into the eight E2M1 magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``
(``code = sign << 3 | index``, the OCP microscaling encoding); a weight is ``value[code] * scale`` with
``scale`` the group's absmax over 6, stored as float16 like every moetool scale (MXFP4 uses a power-of-two
scale per 32 values, NVFP4 an FP8 one per 16: these codes are theirs, the scales are finer). Weights
round to the nearest value, ties to the even code, as the OCP specification converts. Compared with
NF4's normal-quantile code book, E2M1 spaces its values geometrically: finer near 0, coarser in the
tails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moetool.quantize.schemes.codebook import CodebookScheme

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid
    from moetool.quantize.storage import QuantFormat

#: The E2M1 magnitudes, by the three low bits of a code.
E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class FP4Grid:
    """E2M1 codes times an absmax scale per group (a :class:`~moetool.quantize.grids.Grid`)."""

    kind: str = "fp4"
    code_bits: int = 4
    has_zero: bool = False
    scale_dtype: str = "float16"

    def _values(self, device: torch.device) -> torch.Tensor:
        """The 16 code values: ``+m`` for codes 0-7, ``-m`` for codes 8-15."""
        import torch

        magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
        return torch.cat([magnitudes, -magnitudes])

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from moetool.quantize.grids import storage_scale

        return storage_scale(w.float().abs().amax(-1) / E2M1_MAGNITUDES[-1]), None

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=w.device)
        midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
        ratio = (w.float() / scale).contiguous()
        size = ratio.abs()
        # At a midpoint bucketize picks the lower value; a tie goes to the even index instead.
        index = torch.bucketize(size, midpoints)
        tie = (index < len(midpoints)) & (size == midpoints[index.clamp(max=len(midpoints) - 1)])
        index = torch.where(tie & (index % 2 == 1), index + 1, index)
        codes = torch.where((ratio < 0) & (index > 0), index + 8, index)
        return codes.to(torch.uint8), self._values(w.device)[codes] * scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        return self._values(codes.device)[codes.long()] * scale.float()


class FP4Scheme(CodebookScheme):
    """:class:`FP4Grid` codes, packed two per byte like NF4's."""

    name = "fp4"

    def grid(self, fmt: QuantFormat, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        return FP4Grid()
