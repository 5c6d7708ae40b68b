"""The interface every quantization scheme implements: its grid, its codes on disk, its config fields.

A scheme is what the codes of a weight mean (``uniform`` integers with a scale and maybe a zero point,
the ``nf4`` code book, ``ternary`` -1/0/+1 ...). It owns which bits a request may ask for, the grid that
chooses and decodes its codes, how the codes are stored in moetool's format (packed rows or one
entropy-coded stream) and read back, the ``quantization_config`` fields it checks, and its words in
labels and model cards. Adding one is one module with a subclass plus its entry in
:data:`moetool.quantize.schemes.SCHEMES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid
    from moetool.quantize.request import QuantizeOptions
    from moetool.quantize.storage import QuantFormat

#: Checks a stored tensor against the dtype and shape it must have (raises ``QUANT_SHAPE_MISMATCH``).
Expect = Callable[["torch.Tensor", "torch.dtype", tuple[int, ...]], "torch.Tensor"]


class Scheme(ABC):
    """A quantization scheme (see the module docstring)."""

    #: ``scheme`` in ``quantization_config`` and in :class:`~moetool.quantize.storage.QuantFormat`.
    name: ClassVar[str]
    #: the entropy coder of its stored codes (``None``: codes packed per row).
    codec: ClassVar[str | None] = None
    #: whether ``--sym``/``--asym`` chooses between codes with and without a zero point.
    symmetry_choice: ClassVar[bool] = False

    @abstractmethod
    def request_bits(self, bits: int | None, method: str) -> int | None:
        """The bits per code a request for ``bits`` (``None``: the default) gets under ``method``.

        Raises:
            UsageError: bits this scheme cannot have.
        """

    @abstractmethod
    def config_error(self, qc: Mapping[str, Any]) -> str | None:
        """Why a ``quantization_config`` of this scheme is impossible (bits, codec), or ``None``."""

    def config_bits(self, qc: Mapping[str, Any]) -> int | None:
        """The bits per code a valid ``quantization_config`` records."""
        return qc.get("bits")

    @abstractmethod
    def grid(self, fmt: QuantFormat, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        """The grid that chooses (or, with defaults, decodes) the codes of ``fmt``."""

    def zero_point(self, symmetric: bool) -> bool:
        """Whether the codes carry a zero point per group."""
        return False

    def label(self, fmt: QuantFormat) -> str:
        """The scheme's word in ``gptq w4 g64``-style labels."""
        return self.name

    def details(self, request: QuantizeOptions) -> dict[str, Any]:
        """Informative settings of this scheme a request records in ``quantization_config``."""
        return {}

    def card_options(self, request: QuantizeOptions) -> dict[str, Any]:
        """The scheme's settings in the model card's option table."""
        return {}

    def encode_codes(self, codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        """The stored ``qweight`` of unpacked codes ``[..., rows, columns]``: each row packed on its own."""
        from moetool.quantize.pack import pack_bits

        assert fmt.bits is not None
        return pack_bits(codes, fmt.bits)

    def decode_codes(
        self, raw: torch.Tensor, shape: tuple[int, ...], fmt: QuantFormat, expect: Expect, where: str
    ) -> tuple[torch.Tensor, int]:
        """The stored ``qweight`` as codes packed per row in memory, and their bits per code.

        Raises:
            CheckpointError: ``QUANT_SHAPE_MISMATCH`` or ``QUANT_STREAM_INVALID``.
        """
        import torch

        from moetool.quantize.pack import packed_size

        assert fmt.bits is not None
        *lead, rows, columns = shape
        return expect(raw, torch.uint8, (*lead, rows, packed_size(columns, fmt.bits))), fmt.bits

    def dequantize(
        self,
        fmt: QuantFormat,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        bits: int,
        columns: int,
    ) -> torch.Tensor:
        """Full-precision weights from codes packed per row (what the loader's modules compute)."""
        from moetool.quantize.grids import dequantize_groups
        from moetool.quantize.pack import unpack_bits

        return dequantize_groups(fmt.grid(), unpack_bits(codes, bits, columns), scale, zero, fmt.group_size)
