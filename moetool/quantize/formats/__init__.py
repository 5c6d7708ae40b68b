"""Quantized storage formats: a registry of :class:`~moetool.quantize.formats.base.StorageFormat` objects.

* ``compressed-tensors`` (:mod:`~moetool.quantize.formats.compressed_tensors`): what vLLM, SGLang and
  transformers read; symmetric int4 / int8 codes with groups of 32, 64, 128 or one scale per row;
* ``moetool`` (:mod:`~moetool.quantize.formats.moetool_format`): everything else moetool quantizes to.

``--format auto`` (the default) picks compressed-tensors whenever the settings allow it and the
servers' kernels take them, moetool's format otherwise; :func:`resolve` says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moetool.errors import UsageError
from moetool.quantize.formats.base import StorageFormat, Stored, VerifyContext
from moetool.quantize.formats.compressed_tensors import CompressedTensorsFormat
from moetool.quantize.formats.moetool_format import MoetoolFormat

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.layout import QuantLayout
    from moetool.quantize.storage import QuantFormat

__all__ = [
    "AUTO",
    "FORMATS",
    "Choice",
    "StorageFormat",
    "Stored",
    "VerifyContext",
    "format_named",
    "resolve",
    "storage_for",
]

AUTO = "auto"
#: The formats by ``--format`` name, the preferred one first.
FORMATS: dict[str, StorageFormat] = {f.name: f for f in (CompressedTensorsFormat(), MoetoolFormat())}
#: ``--format`` values.
CHOICES = (AUTO, *FORMATS)


def format_named(name: str) -> StorageFormat:
    """The format a ``--format`` value names (not ``auto``).

    Raises:
        UsageError: an unknown name.
    """
    if name not in FORMATS:
        raise UsageError(f"unknown --format {name!r}", hint=f"use {', '.join(CHOICES)}", code="FORMAT_INVALID")
    return FORMATS[name]


def storage_for(quant_method: str | None) -> StorageFormat | None:
    """The format that reads checkpoints whose ``quantization_config.quant_method`` is this."""
    return next((f for f in FORMATS.values() if f.quant_method == quant_method), None)


@dataclass(frozen=True)
class Choice:
    """The storage format a run writes, the settings it stores, why, and a warning for the user."""

    storage: StorageFormat
    fmt: QuantFormat
    reason: str
    warning: str | None = None


def resolve(
    requested: str, symmetric: bool | None, fmt: QuantFormat, layout: QuantLayout, checkpoint: Checkpoint
) -> Choice:
    """Choose the storage format and complete the settings for it.

    Args:
        requested: ``auto``, ``compressed-tensors`` or ``moetool``.
        symmetric: ``--sym`` / ``--asym``; ``None`` lets the format decide (compressed-tensors:
            symmetric; moetool: asymmetric, with a zero point per group).
        fmt: the settings from the options (scheme, bits, group size, ...).
        layout / checkpoint: what is quantized, for divisibility and the scale dtype.

    Returns:
        The format, the settings it stores (symmetry, scale dtype), why it was chosen, and a warning
        when compressed-tensors was asked for with settings the servers' kernels may refuse.

    Raises:
        UsageError: ``FORMAT_UNFIT``: compressed-tensors asked for with settings it cannot hold;
            ``--sym``/``--asym`` with codes that have no zero point to choose.
    """
    from dataclasses import replace

    from moetool.quantize.formats.compressed_tensors import checkpoint_dtype

    if symmetric is not None and not fmt.spec.symmetry_choice:
        raise UsageError(
            f"--sym/--asym apply to uniform codes, not to {fmt.scheme}",
            hint="drop --sym/--asym",
            code="SYMMETRY_INVALID",
        )
    ct = FORMATS["compressed-tensors"]
    assert isinstance(ct, CompressedTensorsFormat)
    as_ct = replace(
        fmt,
        symmetric=True if symmetric is None else symmetric,
        storage=ct.name,
        scale_dtype=checkpoint_dtype(checkpoint, layout),
    )
    as_ct = replace(as_ct, value_dtype=as_ct.scale_dtype)
    unfit = ct.unfit_reason(as_ct, layout)
    if requested == ct.name:
        if unfit:
            raise UsageError(
                f"--format compressed-tensors cannot store these settings: {unfit}",
                hint="use 4 or 8 bits and a group size that divides every row (or 0), or --format moetool",
                code="FORMAT_UNFIT",
            )
        kernels = ct.kernel_reason(as_ct)
        warning = f"vLLM or SGLang may refuse this compressed-tensors output: {kernels}" if kernels else None
        return Choice(ct, as_ct, "asked for", warning)
    own = format_named("moetool") if requested == AUTO else format_named(requested)
    as_own = replace(fmt, symmetric=bool(symmetric), storage=own.name)
    if requested != AUTO:
        return Choice(own, as_own, "asked for")
    reason = unfit or ct.kernel_reason(as_ct)
    if reason is None:
        return Choice(ct, as_ct, "the settings fit what servers read")
    return Choice(own, as_own, f"compressed-tensors does not fit: {reason}")


def storage_of_config(config: dict[str, Any]) -> StorageFormat:
    """The format a written checkpoint's config.json names.

    Raises:
        ConfigError: ``QUANT_CONFIG_INVALID`` for a quant method no moetool format reads.
    """
    from moetool.errors import ConfigError
    from moetool.modeling import quant_method_of

    method = quant_method_of(config)
    found = storage_for(method)
    if found is None:
        raise ConfigError(
            f"quantization_config.quant_method {method!r} is not a format moetool decodes",
            hint=f"moetool reads {', '.join(FORMATS)}",
            code="QUANT_CONFIG_INVALID",
        )
    return found
