"""Quantization grids: how a group of weights becomes integer codes plus a scale (and a zero point).

Every grid works on tensors with any leading dimensions (``[E, rows, n]`` for the experts of a layer,
``[E, rows]`` for one column inside GPTQ), so the same code quantizes one expert or all of a layer's
experts at once. Group parameters are rounded to their storage dtype (float16 scales, integer zero
points) *before* codes are chosen, so that the codes GPTQ picks, the dequantized weights it feeds
forward and what the loader reconstructs from disk are the same numbers.

* :class:`UniformGrid`: asymmetric ``b``-bit min/max grid with an integer zero point, as in GPTQ;
  ``clip_search`` shrinks the range where that lowers the group's error (GPTQ's ``mse`` option).
* :class:`SymmetricGrid`: symmetric ``b``-bit grid around 0, ``w ~ q * s`` with ``q`` in
  ``[-2**(b-1), 2**(b-1) - 1]`` and no zero point: what compressed-tensors' ``symmetric: true`` and the
  servers' int4/int8 MoE kernels (vLLM, SGLang) read.

Scales are stored as float16 by default. A grid can instead keep them in another dtype
(``scale_dtype``) and round its dequantized values to a ``value_dtype``: compressed-tensors
dequantizes ``q * s`` in the scale's dtype (the model's), so the values GPTQ feeds forward must be
rounded the same way to stay exactly what a server or transformers reconstructs.
* :class:`NF4Grid`: the 16 NormalFloat-4 values of QLoRA / bitsandbytes, scaled by the group's absmax.
* :class:`TernaryGrid`: ``{-s, 0, +s}`` with ``s`` the group's absmax (QMoE-style: most weights land
  on 0, which the entropy coder of :mod:`moetool.quantize.codec` turns into well under 1 bit each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

#: The NormalFloat-4 code book, as in bitsandbytes (``bitsandbytes.functional.get_4bit_type("nf4")``):
#: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# float16 scales: the smallest normal float16. A group whose whole range is below this times the code
# range gets a slightly coarser step (absolute error still below 1e-4); subnormal scales would lose
# relative precision instead.
_MIN_SCALE = 2.0**-14

#: Dtypes a grid may store its scales in (and round its dequantized values to).
SCALE_DTYPES = ("float16", "bfloat16", "float32")


class Grid(Protocol):
    """What GPTQ and round-to-nearest need from a grid."""

    #: ``uniform``, ``nf4`` or ``ternary`` (recorded in config.json).
    kind: str
    #: bits of one code as packed in memory and (except ternary, which is entropy coded) on disk.
    code_bits: int
    #: whether the grid has a zero point per group.
    has_zero: bool
    #: the dtype its scales are stored in (``float16``, ``bfloat16`` or ``float32``).
    scale_dtype: str

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Group parameters for ``w [..., rows, n]``: ``(scale [..., rows], zero [..., rows] or None)``."""
        ...

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (uint8) and dequantized values (float32) of ``w``; parameters broadcast against it."""
        ...

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Float32 weights from codes; parameters broadcast against them."""
        ...


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (one of :data:`SCALE_DTYPES`)."""
    import torch

    if name not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, not {name!r}")
    return getattr(torch, name)


def storage_scale(scale: torch.Tensor, dtype: str = "float16") -> torch.Tensor:
    """Round a scale to what its storage dtype holds (the value every later step must use)."""
    top = 65504.0 if dtype == "float16" else 3.0e38
    return scale.clamp(min=_MIN_SCALE, max=top).to(torch_dtype(dtype)).float()


def _round_values(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Dequantized values as a reader that multiplies in ``dtype`` gets them (a no-op for float32).

    The float32 product of a code (at most 8 bits) and a float16 or bfloat16 scale is exact, so one
    rounding to ``dtype`` gives what multiplying in ``dtype`` gives."""
    return values if dtype == "float32" else values.to(torch_dtype(dtype)).float()


@dataclass(frozen=True)
class UniformGrid:
    """Asymmetric uniform grid: ``q = clamp(round(w / s) + z, 0, 2**b - 1)``, ``w ~ (q - z) * s``.

    Args:
        bits: bits per code (2 to 8).
        clip_search: try shrinking the group's range (down to ``1 - max_shrink``) and keep the factor
            with the smallest ``sum |w - q|**2.4``, per row (GPTQ's ``mse`` search; it pays at 2-3 bits).
        steps: shrink factors tried.
        max_shrink: the largest fraction of the range that may be cut.
        scale_dtype: the dtype scales are stored in.
        value_dtype: the dtype dequantized values are rounded to (``float32``: exact).
    """

    bits: int
    clip_search: bool = False
    steps: int = 20
    max_shrink: float = 0.5
    scale_dtype: str = "float16"
    value_dtype: str = "float32"
    kind: str = "uniform"
    has_zero: bool = True

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def _params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        # The range always holds 0, so that zero weights (and padding) stay exactly zero.
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        flat = (hi - lo) == 0
        lo = torch.where(flat, torch.full_like(lo, -1.0), lo)
        hi = torch.where(flat, torch.full_like(hi, 1.0), hi)
        scale = storage_scale((hi - lo) / self.maxq, self.scale_dtype)
        zero = torch.clamp(torch.round(-lo / scale), 0, self.maxq)
        return scale, zero

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        w = w.float()
        lo = w.amin(-1)
        hi = w.amax(-1)
        scale, zero = self._params(lo, hi)
        if not self.clip_search:
            return scale, zero
        best = self._error(w, scale, zero)
        for step in range(1, self.steps + 1):
            factor = 1.0 - self.max_shrink * step / self.steps
            s, z = self._params(lo * factor, hi * factor)
            err = self._error(w, s, z)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
        return scale, zero

    def _error(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        _, q = self.quantize(w, scale.unsqueeze(-1), zero.unsqueeze(-1))
        return (w - q).abs().pow(2.4).sum(-1)

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        assert zero is not None
        codes = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return codes.to(torch.uint8), _round_values((codes - zero) * scale, self.value_dtype)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        import torch

        assert zero is not None
        values = (codes.to(torch.float32) - zero.to(torch.float32)) * scale.to(torch.float32)
        return _round_values(values, self.value_dtype)


@dataclass(frozen=True)
class SymmetricGrid:
    """Symmetric uniform grid: ``q = clamp(round(w / s), -2**(b-1), 2**(b-1) - 1)``, ``w ~ q * s``.

    Codes are stored offset by ``2**(b-1)`` (``0 .. 2**b - 1``, as compressed-tensors packs them). The
    scale maps the group's largest magnitude to ``(2**b - 1) / 2`` steps (GPTQ's and llm-compressor's
    symmetric rule): both ends of the range are at most half a step off, the same error bound as
    rounding, and all ``2**b`` codes are used.

    Args:
        bits: bits per code (2 to 8).
        clip_search: try shrinking the largest magnitude (down to ``1 - max_shrink``), as
            :class:`UniformGrid` does.
        steps / max_shrink: the shrink factors tried.
        scale_dtype: the dtype scales are stored in (compressed-tensors: the model's dtype).
        value_dtype: the dtype dequantized values are rounded to (compressed-tensors: the scale's).
    """

    bits: int
    clip_search: bool = False
    steps: int = 20
    max_shrink: float = 0.5
    scale_dtype: str = "float16"
    value_dtype: str = "float32"
    kind: str = "symmetric"
    has_zero: bool = False

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def offset(self) -> int:
        """What is added to a signed code to store it (``2**(b-1)``)."""
        return 1 << (self.bits - 1)

    def _scale(self, absmax: torch.Tensor) -> torch.Tensor:
        import torch

        # A group of zeros still gets a usable scale (its codes are then 0).
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        return storage_scale(absmax / (((1 << self.bits) - 1) / 2), self.scale_dtype)

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torch

        w = w.float()
        absmax = w.abs().amax(-1)
        scale = self._scale(absmax)
        if not self.clip_search:
            return scale, None
        best = self._error(w, scale)
        for step in range(1, self.steps + 1):
            s = self._scale(absmax * (1.0 - self.max_shrink * step / self.steps))
            err = self._error(w, s)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
        return scale, None

    def _error(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        _, q = self.quantize(w, scale.unsqueeze(-1), None)
        return (w - q).abs().pow(2.4).sum(-1)

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        q = torch.clamp(torch.round(w / scale), -self.offset, self.offset - 1)
        return (q + self.offset).to(torch.uint8), _round_values(q * scale, self.value_dtype)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        import torch

        values = (codes.to(torch.float32) - self.offset) * scale.to(torch.float32)
        return _round_values(values, self.value_dtype)


@dataclass(frozen=True)
class NF4Grid:
    """NormalFloat-4: ``w ~ NF4[q] * absmax`` with ``absmax`` per group (bitsandbytes' 4-bit codes)."""

    kind: str = "nf4"
    code_bits: int = 4
    has_zero: bool = False
    scale_dtype: str = "float16"

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        values = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
        return values, (values[1:] + values[:-1]) / 2

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return storage_scale(w.float().abs().amax(-1)), None

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        values, midpoints = self._table(w.device)
        # Nearest code value; ties go up, as bitsandbytes' binary search does.
        codes = torch.bucketize((w / scale).contiguous(), midpoints, right=True)
        return codes.to(torch.uint8), values[codes] * scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        values, _ = self._table(codes.device)
        return values[codes.long()] * scale.float()


@dataclass(frozen=True)
class TernaryGrid:
    """Ternary: codes 0, 1, 2 for ``-s, 0, +s``; ``s`` is the group's absmax (times ``scale_factor``).

    A weight becomes ``±s`` when its magnitude reaches ``threshold * s``, else 0. With ``s`` at the
    absmax and the round-to-nearest threshold 0.5, a weight is 0 unless it is at least half the largest
    magnitude of its group, so most codes are 0 and their entropy (the coded size) falls well below
    ``log2(3)`` bits. GPTQ's error feedback enlarges the weights it has not quantized yet, so fewer of
    them land on 0; a higher ``threshold`` (a dead zone) buys the zeros back, and GPTQ compensates the
    extra rounding error on the columns that follow. A smaller ``scale_factor`` lowers the error and
    raises the size.
    """

    scale_factor: float = 1.0
    threshold: float = 0.5
    kind: str = "ternary"
    code_bits: int = 2
    has_zero: bool = False
    scale_dtype: str = "float16"

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return storage_scale(w.float().abs().amax(-1) * self.scale_factor), None

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        ratio = w / scale
        signs = torch.where(ratio.abs() >= self.threshold, torch.sign(ratio), torch.zeros_like(ratio))
        return (signs + 1).to(torch.uint8), signs * scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        import torch

        return (codes.to(torch.float32) - 1.0) * scale.to(torch.float32)


def group_bounds(columns: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges of the groups of a row: ``group_size`` columns each, the last one may be shorter.

    ``group_size`` 0 (or at least ``columns``) gives one group per row.
    """
    size = columns if group_size <= 0 or group_size >= columns else group_size
    return [(start, min(start + size, columns)) for start in range(0, columns, size)]


def dequantize_groups(
    grid: Grid, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Float32 weights ``[..., rows, n]`` from codes and per-group parameters ``[..., rows, groups]``."""
    import torch

    columns = codes.shape[-1]
    bounds = group_bounds(columns, group_size)
    # Expand the per-group parameters to one per column (the last group may be shorter).
    sizes = torch.tensor([end - start for start, end in bounds], device=codes.device)
    scale_full = torch.repeat_interleave(scale.float(), sizes, dim=-1)
    zero_full = torch.repeat_interleave(zero.float(), sizes, dim=-1) if zero is not None else None
    return grid.dequantize(codes, scale_full, zero_full)
