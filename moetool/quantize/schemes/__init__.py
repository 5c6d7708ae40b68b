"""Quantization schemes: a registry of :class:`~moetool.quantize.schemes.base.Scheme` objects.

* ``uniform`` (:mod:`~moetool.quantize.schemes.uniform`): 2/3/4/8-bit integers, asymmetric or symmetric;
* ``nf4`` (:mod:`~moetool.quantize.schemes.nf4`): bitsandbytes' NormalFloat-4 code book;
* ``ternary`` (:mod:`~moetool.quantize.schemes.ternary`): -1/0/+1, entropy coded on disk;
* ``fp4`` (:mod:`~moetool.quantize.schemes.fp4`): E2M1 floating-point codes (MXFP4/NVFP4's elements).

:class:`~moetool.quantize.storage.QuantFormat` names its scheme; :func:`scheme_named` gives the object
that owns its behaviour. No torch at import.
"""

from __future__ import annotations

from moetool.errors import UsageError
from moetool.quantize.schemes.base import Scheme
from moetool.quantize.schemes.fp4 import FP4Scheme
from moetool.quantize.schemes.nf4 import NF4Scheme
from moetool.quantize.schemes.ternary import TernaryScheme
from moetool.quantize.schemes.uniform import UniformScheme

__all__ = ["SCHEMES", "Scheme", "scheme_named"]

#: The schemes by ``quantization_config.scheme`` name.
SCHEMES: dict[str, Scheme] = {s.name: s for s in (UniformScheme(), NF4Scheme(), TernaryScheme(), FP4Scheme())}


def scheme_named(name: str) -> Scheme:
    """The scheme called ``name``.

    Raises:
        UsageError: an unknown scheme (checkpoints with one are refused earlier, by
            :meth:`~moetool.quantize.storage.QuantFormat.from_config`).
    """
    if name not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {name!r}", hint=f"use {', '.join(SCHEMES)}")
    return SCHEMES[name]
