"""``uniform``: integer codes with a scale per group, and a zero point unless symmetric (GPTQ's grid)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moetool.errors import UsageError
from moetool.quantize.schemes.base import Scheme

if TYPE_CHECKING:
    from moetool.quantize.grids import Grid
    from moetool.quantize.request import QuantizeOptions
    from moetool.quantize.storage import QuantFormat

UNIFORM_BITS = (2, 3, 4, 8)
DEFAULT_BITS = 4


class UniformScheme(Scheme):
    """Asymmetric (:class:`~moetool.quantize.grids.UniformGrid`) or symmetric
    (:class:`~moetool.quantize.grids.SymmetricGrid`) integer codes of 2, 3, 4 or 8 bits."""

    name = "uniform"
    symmetry_choice = True

    def request_bits(self, bits: int | None, method: str) -> int | None:
        bits = DEFAULT_BITS if bits is None else bits
        if bits not in UNIFORM_BITS:
            raise UsageError(
                f"--bits must be 2, 3, 4 or 8, not {bits}",
                hint="or pass --ternary for 1.58-bit codes stored below 1 bit",
                code="BITS_INVALID",
            )
        return bits

    def config_error(self, qc: Mapping[str, Any]) -> str | None:
        bits = qc.get("bits")
        return None if bits in UNIFORM_BITS else f"bits {bits!r} (uniform codes have 2, 3, 4 or 8 bits)"

    def grid(self, fmt: QuantFormat, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        from moetool.quantize.grids import SymmetricGrid, UniformGrid

        assert fmt.bits is not None
        dtypes = {"scale_dtype": fmt.scale_dtype, "value_dtype": fmt.value_dtype}
        if fmt.symmetric:
            return SymmetricGrid(fmt.bits, clip_search=clip_search, **dtypes)
        return UniformGrid(fmt.bits, clip_search=clip_search, **dtypes)

    def zero_point(self, symmetric: bool) -> bool:
        return not symmetric

    def label(self, fmt: QuantFormat) -> str:
        return f"w{fmt.bits}"

    def details(self, request: QuantizeOptions) -> dict[str, Any]:
        return {"clip_search": True} if request.clip_search else {}
