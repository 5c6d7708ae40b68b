"""Quantizing the routed experts of MoE checkpoints (``moetool quantize``), and loading the result.

Modules, one job each: :mod:`~moetool.quantize.pack` (bit packing), :mod:`~moetool.quantize.codec`
(entropy-coded ternary streams), :mod:`~moetool.quantize.grids` (uniform, NF4 and ternary grids),
:mod:`~moetool.quantize.rtn` and :mod:`~moetool.quantize.nf4` (round to nearest),
:mod:`~moetool.quantize.gptq` (GPTQ batched over experts), :mod:`~moetool.quantize.calibrate`
(per-expert Hessians with coverage, layer by layer), :mod:`~moetool.quantize.engine` (one layer),
:mod:`~moetool.quantize.layout` (what to rewrite, from the registry), :mod:`~moetool.quantize.storage`
(tensor names, packed layouts, ``quantization_config``), :mod:`~moetool.quantize.modules` and
:mod:`~moetool.quantize.loader` (dequantize-on-the-fly modules, transformers integration),
:mod:`~moetool.quantize.formats` (the storage formats: compressed-tensors, moetool's own),
:mod:`~moetool.quantize.export` (moetool's format to compressed-tensors), :mod:`~moetool.quantize.bnb`
(bitsandbytes' NF4 kernel), :mod:`~moetool.quantize.verify` and :mod:`~moetool.quantize.api`
(:func:`quantize`).

Importing this package registers the ``moetool`` quant method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` loads moetool-quantized checkpoints (that registration imports
transformers and torch; the ``moetool`` command line imports this package only when it quantizes).
"""

import contextlib

from moetool.quantize.api import CalibrationData, QuantizeOptions, QuantizeResult, quantize
from moetool.quantize.calibrate import CoverageOptions
from moetool.quantize.storage import QuantFormat
from moetool.quantize.verify import VerificationError

__all__ = [
    "CalibrationData",
    "CoverageOptions",
    "QuantFormat",
    "QuantizeOptions",
    "QuantizeResult",
    "VerificationError",
    "quantize",
    "register_with_transformers",
]


def register_with_transformers() -> None:
    """Teach transformers' ``from_pretrained`` to load moetool-quantized checkpoints (idempotent)."""
    from moetool.quantize.loader import register_with_transformers as register

    register()


# A library user's from_pretrained then just works (moetool's own loader registers before loading anyway).
with contextlib.suppress(ImportError):  # transformers is a dependency; this only guards a broken install
    register_with_transformers()
