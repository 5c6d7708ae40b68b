"""moetool's quantized storage: tensor names, packed layouts and the ``quantization_config``.

A quantized tensor ``X.weight`` (or a fused ``X`` without the suffix) of shape ``[..., rows, columns]``
is replaced by:

* ``X.qweight``: the codes. Uniform and NF4: uint8 ``[..., rows, ceil(columns * bits / 8)]``, each row
  packed on its own (:func:`moetool.quantize.pack.pack_bits`). Ternary: uint8 ``[n]``, one entropy-coded
  stream for the whole tensor (:mod:`moetool.quantize.codec`);
* ``X.qscale``: float16 ``[..., rows, groups]``, one scale per group of ``group_size`` input columns (the
  last group may be shorter; ``group_size`` 0 means one group per row);
* ``X.qzero``: asymmetric uniform only, the integer zero points, uint8
  ``[..., rows, ceil(groups * bits / 8)]`` packed like the codes.

Weights are ``(q - zero) * scale`` (uniform), ``(q - 2**(bits-1)) * scale`` (symmetric uniform),
``NF4[q] * scale`` (nf4) or ``(q - 1) * scale`` (ternary).
The per-expert or fused layout and the tensor names are the source checkpoint's, so every other tool
that reads the family's names finds the experts where it expects them.

config.json carries ``quantization_config`` with ``quant_method: "moetool"``, ``format_version``, the
scheme, bits, group size, codec and the quantized categories, plus how the codes were chosen (method,
act-order, dampening); loaders read only the first group. Symmetric uniform codes (no zero point) are
``format_version`` 2, so that an older moetool refuses them instead of looking for zero points.

:class:`QuantFormat` also describes codes stored in other formats (``storage``, see
:mod:`moetool.quantize.formats`): their grid, scale dtype and the dtype values are rounded to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import CheckpointError, ConfigError
from moetool.quantize.grids import Grid, group_bounds
from moetool.quantize.pack import pack_bits, packed_size, unpack_bits
from moetool.quantize.schemes import SCHEMES as _SCHEMES
from moetool.quantize.schemes import Scheme, scheme_named
from moetool.quantize.schemes.ternary import TERNARY_CODEC
from moetool.quantize.schemes.uniform import UNIFORM_BITS

if TYPE_CHECKING:
    import torch

    from moetool.quantize.rtn import QuantizedWeight

QUANT_METHOD = "moetool"
FORMAT_VERSION = 1
#: ``format_version`` of symmetric uniform codes; readers accept every version up to this one.
FORMAT_VERSION_SYMMETRIC = 2
CODES, SCALE, ZERO = "qweight", "qscale", "qzero"
SUFFIXES = (CODES, SCALE, ZERO)
#: The scheme names (the objects: :data:`moetool.quantize.schemes.SCHEMES`).
SCHEMES = tuple(_SCHEMES)
__all__ = ["SCHEMES", "TERNARY_CODEC", "UNIFORM_BITS", "PackedWeight", "QuantFormat"]


def base_name(name: str) -> str:
    """``a.b.weight`` -> ``a.b``; a fused name without ``.weight`` stays as it is."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def packed_names(name: str) -> dict[str, str]:
    """The stored names that replace a quantized tensor ``name``, by suffix."""
    base = base_name(name)
    return {suffix: f"{base}.{suffix}" for suffix in SUFFIXES}


def source_name(stored: str) -> tuple[str, str] | None:
    """``(base, suffix)`` of a stored packed tensor name, ``None`` for any other tensor."""
    base, _, suffix = stored.rpartition(".")
    return (base, suffix) if base and suffix in SUFFIXES else None


@dataclass(frozen=True)
class QuantFormat:
    """How the codes of a checkpoint are stored (what ``quantization_config`` records).

    Attributes:
        scheme: a name in :data:`moetool.quantize.schemes.SCHEMES` (``uniform``, ``nf4``, ``ternary``);
            :attr:`spec` is the object that owns its behaviour.
        bits: bits per code for ``uniform`` (2, 3, 4, 8); 4 for ``nf4``; ``None`` for ``ternary``.
        group_size: input columns per scale (0: one per row).
        categories: the quantized parameter categories.
        method: how the codes were chosen (``gptq``, ``rtn``, ``nf4``); informative.
        details: more informative settings (act-order, dampening, calibration), written to the config.
        symmetric: uniform codes around 0 without a zero point.
        storage: the on-disk format (``moetool`` or ``compressed-tensors``, see
            :mod:`moetool.quantize.formats`).
        scale_dtype: the dtype scales are stored in (moetool's format: float16).
        value_dtype: the dtype dequantized weights are rounded to (``float32``: exact).
    """

    scheme: str
    bits: int | None
    group_size: int
    categories: tuple[str, ...] = ("routed_experts",)
    method: str = "rtn"
    details: Mapping[str, Any] = field(default_factory=dict)
    symmetric: bool = False
    storage: str = QUANT_METHOD
    scale_dtype: str = "float16"
    value_dtype: str = "float32"

    @property
    def spec(self) -> Scheme:
        """The scheme object (grid, stored codes, config checks)."""
        return scheme_named(self.scheme)

    @property
    def codec(self) -> str | None:
        return self.spec.codec

    @property
    def zero_point(self) -> bool:
        return self.spec.zero_point(self.symmetric)

    def grid(self, *, clip_search: bool = False, ternary_scale: float = 1.0) -> Grid:
        """The grid that chooses (or, with defaults, decodes) this format's codes."""
        return self.spec.grid(self, clip_search=clip_search, ternary_scale=ternary_scale)

    @property
    def label(self) -> str:
        """``gptq w4 g64``, ``rtn w4 sym g32``, ``nf4 g64``, ``gptq ternary per-row`` ..."""
        what = self.spec.label(self)
        if self.symmetric:
            what += " sym"
        group = f"g{self.group_size}" if self.group_size else "per-row"
        # A method named after its scheme (nf4) is said once.
        method = "" if self.method == self.scheme else f"{self.method} "
        return f"{method}{what} {group}"

    def to_config(self) -> dict[str, Any]:
        """The ``quantization_config`` object of moetool's own format, for config.json."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION_SYMMETRIC if self.symmetric else FORMAT_VERSION,
            "scheme": self.scheme,
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            **({"symmetric": True} if self.symmetric else {}),
            "scale_dtype": "float16",
            "codec": self.codec,
            "quantized": list(self.categories),
            "method": self.method,
            **dict(self.details),
        }

    @classmethod
    def from_config(cls, qc: Mapping[str, Any], *, where: str = "config.json") -> QuantFormat:
        """Read and validate a ``quantization_config`` written by :meth:`to_config`.

        Raises:
            ConfigError: ``QUANT_CONFIG_INVALID`` for a missing or impossible field, or a newer format.
        """

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"{where}: quantization_config is not a valid moetool format: {why}",
                hint="re-create the checkpoint with moetool quantize, or upgrade moetool",
                code="QUANT_CONFIG_INVALID",
            )

        if qc.get("quant_method") != QUANT_METHOD:
            raise bad(f"quant_method is {qc.get('quant_method')!r}")
        version = qc.get("format_version")
        if version not in (FORMAT_VERSION, FORMAT_VERSION_SYMMETRIC) or isinstance(version, bool):
            raise bad(f"format_version {version!r} (this moetool reads up to {FORMAT_VERSION_SYMMETRIC})")
        scheme = qc.get("scheme")
        if scheme not in _SCHEMES:
            raise bad(f"unknown scheme {scheme!r}")
        spec = _SCHEMES[scheme]
        why = spec.config_error(qc)
        if why:
            raise bad(why)
        group = qc.get("group_size")
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise bad(f"group_size {group!r}")
        categories = qc.get("quantized", ["routed_experts"])
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise bad(f"quantized {categories!r}")
        symmetric = qc.get("symmetric", False)
        if symmetric not in (True, False) or (
            symmetric and (not spec.symmetry_choice or version != FORMAT_VERSION_SYMMETRIC)
        ):
            raise bad(f"symmetric {symmetric!r} (only uniform codes of format_version 2 are symmetric)")
        if spec.symmetry_choice and bool(qc.get("zero_point", True)) == bool(symmetric):
            raise bad(f"zero_point {qc.get('zero_point')!r} with symmetric {symmetric!r}")
        known = {"quant_method", "format_version", "scheme", "bits", "group_size", "zero_point", "scale_dtype"}
        known |= {"codec", "quantized", "method", "symmetric"}
        details = {k: v for k, v in qc.items() if k not in known}
        return cls(
            scheme=scheme,
            bits=spec.config_bits(qc),
            group_size=group,
            categories=tuple(categories),
            method=str(qc.get("method", "rtn")),
            details=details,
            symmetric=bool(symmetric),
        )


# ----------------------------------------------------------------------------- encoding


def num_groups(columns: int, group_size: int) -> int:
    return len(group_bounds(columns, group_size))


def encode_weight(weight: QuantizedWeight, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """The stored tensors (by suffix) of one quantized weight ``[..., rows, columns]``."""
    import torch

    out: dict[str, torch.Tensor] = {SCALE: weight.scale.to(torch.float16).contiguous()}
    out[CODES] = fmt.spec.encode_codes(weight.codes, fmt)
    if fmt.zero_point:
        assert weight.zero is not None and fmt.bits is not None
        out[ZERO] = pack_bits(weight.zero, fmt.bits)
    return out


@dataclass
class PackedWeight:
    """A weight as the loader keeps it: codes packed per row in memory, scales, zero points.

    Attributes:
        codes: uint8 ``[..., rows, packed]`` with ``code_bits`` bits per code.
        scale: ``[..., rows, groups]``, in the format's scale dtype (float16 in moetool's format).
        zero: uint8 ``[..., rows, groups]`` (unpacked) or ``None``.
        code_bits: bits per code in ``codes`` (2 for ternary).
        columns: logical columns per row.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    code_bits: int
    columns: int


def decode_weight(
    read: Callable[[str], torch.Tensor], fmt: QuantFormat, shape: tuple[int, ...], name: str
) -> PackedWeight:
    """Read one quantized weight back, checking every stored shape against the logical ``shape``.

    Args:
        read: returns the stored tensor for a suffix (``qweight``, ``qscale``, ``qzero``).
        fmt: the checkpoint's format.
        shape: the logical ``[..., rows, columns]`` shape the config implies.
        name: the original tensor name, for messages.

    Raises:
        CheckpointError: ``QUANT_SHAPE_MISMATCH`` or ``QUANT_STREAM_INVALID``.
    """
    import torch

    *lead, rows, columns = shape
    groups = num_groups(columns, fmt.group_size)

    def expect(tensor: torch.Tensor, suffix: str, dtype: torch.dtype, want: tuple[int, ...]) -> torch.Tensor:
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(want):
            raise CheckpointError(
                f"{base_name(name)}.{suffix} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"expected {str(dtype).removeprefix('torch.')} {list(want)}",
                hint="the checkpoint does not match its quantization_config; re-create it",
                code="QUANT_SHAPE_MISMATCH",
            )
        return tensor

    scale = expect(read(SCALE), SCALE, torch.float16, (*lead, rows, groups))
    zero = None
    if fmt.zero_point:
        assert fmt.bits is not None
        packed_zero = expect(read(ZERO), ZERO, torch.uint8, (*lead, rows, packed_size(groups, fmt.bits)))
        zero = unpack_bits(packed_zero, fmt.bits, groups)
    codes, code_bits = fmt.spec.decode_codes(
        read(CODES), shape, fmt, lambda t, dtype, want: expect(t, CODES, dtype, want), f"{base_name(name)}.{CODES}"
    )
    return PackedWeight(codes, scale, zero, code_bits, columns)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights of equal width along the row dimension (gate and up into gate_up)."""
    import torch

    first = parts[0]
    return PackedWeight(
        codes=torch.cat([p.codes for p in parts], dim=-2),
        scale=torch.cat([p.scale for p in parts], dim=-2),
        zero=None if first.zero is None else torch.cat([p.zero for p in parts if p.zero is not None], dim=-2),
        code_bits=first.code_bits,
        columns=first.columns,
    )


def stack_experts(parts: list[PackedWeight]) -> PackedWeight:
    """Stack per-expert packed weights into one ``[E, rows, ...]`` weight."""
    import torch

    first = parts[0]
    return PackedWeight(
        codes=torch.stack([p.codes for p in parts]),
        scale=torch.stack([p.scale for p in parts]),
        zero=None if first.zero is None else torch.stack([p.zero for p in parts if p.zero is not None]),
        code_bits=first.code_bits,
        columns=first.columns,
    )
