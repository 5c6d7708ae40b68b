"""The one table between safetensors dtype strings (``"BF16"``) and torch dtypes (``torch.bfloat16``).

Every module that writes tensors, plans them or checks a stored dtype reads it here. torch is imported
only inside :func:`torch_dtype`, so the table itself is free to import anywhere (``--help``, inspect).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moetool.errors import MoetoolError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = ["FLOAT_DTYPES", "TORCH_NAMES", "dtype_name", "torch_dtype"]

#: safetensors dtype string -> torch dtype attribute name, for every dtype moetool writes.
TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_ST_NAMES = {torch_name: st for st, torch_name in TORCH_NAMES.items()}

#: The floating-point dtypes moetool computes with (merge, upcycle, distill read and write these).
FLOAT_DTYPES: dict[str, str] = {k: TORCH_NAMES[k] for k in ("F32", "F16", "BF16", "F64")}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype (``torch.bfloat16`` -> ``"BF16"``).

    Raises:
        MoetoolError: ``UNSUPPORTED_DTYPE``, a dtype safetensors cannot store.
    """
    key = str(dtype).removeprefix("torch.")
    if key not in _ST_NAMES:
        raise MoetoolError(f"moetool cannot write tensors of dtype {dtype}", code="UNSUPPORTED_DTYPE")
    return _ST_NAMES[key]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``).

    Raises:
        MoetoolError: ``UNSUPPORTED_DTYPE``, a dtype moetool does not write.
    """
    import torch

    if name not in TORCH_NAMES:
        raise MoetoolError(f"moetool cannot write tensors of dtype {name}", code="UNSUPPORTED_DTYPE")
    return getattr(torch, TORCH_NAMES[name])
