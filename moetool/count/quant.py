"""Logical parameter counts of quantized storage.

A checkpoint stores quantized weights as packed integers plus scales. Parameters are counted as the
logical (unpacked) values; scales, zero points, group indices and codebooks are storage, not
parameters. Handled layouts:

* MXFP4 (gpt-oss): ``*_blocks`` uint8 holding two 4-bit values per byte, ``*_scales`` uint8 (storage);
* FP8 (DeepSeek-V3, MiniMax): ``weight_scale_inv`` / ``weight_scale`` / ``input_scale`` (storage);
* GPTQ / AWQ: ``qweight`` int32 packing ``32 / bits`` values, ``qzeros``, ``scales``, ``g_idx``;
* compressed-tensors: ``weight_packed`` int32, ``weight_scale``, ``weight_zero_point``, ``weight_shape``;
* bitsandbytes 4-bit: ``weight`` uint8 holding two values per byte plus ``absmax``/``quant_map``/
  ``quant_state`` tensors;
* moetool (``quant_method: "moetool"``): ``qweight`` codes (packed, or an entropy-coded ternary stream
  whose size says nothing about the count) replace ``weight``; the logical shape is the one the config
  implies for that name (``logical_numel``), ``qscale`` and ``qzero`` are storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moetool.io.safetensors_header import TensorInfo

# Last name components that are always quantization bookkeeping, never parameters.
_STORAGE_LAST = frozenset(
    {
        "weight_scale_inv",
        "weight_scale",
        "weight_scale_2",
        "input_scale",
        "weight_zero_point",
        "weight_global_scale",
        "input_global_scale",
        "weight_shape",
        "weight_g_idx",
        "qzeros",
        "g_idx",
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "SCB",
        "weight_format",
    }
)


@dataclass(frozen=True)
class QuantScheme:
    """What a checkpoint's ``quantization_config`` says about packing."""

    method: str | None
    bits: int = 4
    #: moetool's format: logical parameter counts by tensor name, from the config's templates.
    logical_numel: Mapping[str, int] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantScheme:
        """Read ``quantization_config`` (absent: no quantization)."""
        qc = config.get("quantization_config")
        if not isinstance(qc, Mapping):
            return cls(None)
        method = qc.get("quant_method")
        bits = qc.get("bits") or qc.get("w_bit") or qc.get("num_bits")
        groups = qc.get("config_groups")
        if bits is None and isinstance(groups, Mapping):
            for group in groups.values():
                weights = group.get("weights") if isinstance(group, Mapping) else None
                if isinstance(weights, Mapping) and isinstance(weights.get("num_bits"), int):
                    bits = weights["num_bits"]
                    break
        if bits is None and qc.get("load_in_8bit"):
            bits = 8
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32:
            bits = 4
        return cls(str(method) if method is not None else None, bits)


@dataclass(frozen=True)
class LogicalTensor:
    """A stored tensor seen as parameters: its logical name and parameter count (0 for storage)."""

    name: str
    params: int
    storage_only: bool


def logical_tensor(info: TensorInfo, scheme: QuantScheme) -> LogicalTensor:
    """Map one stored tensor to the logical parameters it holds."""
    name = info.name
    head, _, last = name.rpartition(".")
    if scheme.method == "moetool" and last in ("qweight", "qscale", "qzero"):
        logical = f"{head}.weight"
        numel = scheme.logical_numel or {}
        if logical not in numel and head in numel:  # fused tensors named without ".weight"
            logical = head
        if last != "qweight":
            return LogicalTensor(logical, 0, True)
        # Unknown to the config (not expected): count the bytes as 4-bit codes rather than nothing.
        return LogicalTensor(logical, numel.get(logical, info.numel * 2), False)
    if last in _STORAGE_LAST or ".quant_state" in name or last.startswith("quant_state"):
        return LogicalTensor(name, 0, True)
    if last.endswith("_scales") and info.dtype in ("U8", "F8_E8M0"):
        return LogicalTensor(name, 0, True)  # MXFP4 block scales
    if last.endswith("_blocks") and info.dtype == "U8":
        return LogicalTensor(name[: -len("_blocks")], info.numel * 2, False)
    if last == "qweight" and info.dtype == "I32":
        return LogicalTensor(f"{head}.weight", info.numel * (32 // scheme.bits), False)
    if last == "weight_packed":
        per_element = 32 if info.dtype == "I32" else 8
        return LogicalTensor(f"{head}.weight", info.numel * (per_element // scheme.bits), False)
    if last in ("scales", "zeros") and scheme.method is not None:
        return LogicalTensor(name, 0, True)  # GPTQ/AWQ group scales
    if scheme.method == "bitsandbytes" and last == "weight" and info.dtype == "U8" and scheme.bits == 4:
        return LogicalTensor(name, info.numel * 2, False)
    return LogicalTensor(name, info.numel, False)
