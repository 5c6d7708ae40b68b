"""Code-book schemes: 4-bit codes that index a fixed table of values, times an absmax scale per group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from moetool.errors import UsageError
from moetool.quantize.schemes.base import Scheme


class CodebookScheme(Scheme):
    """A scheme whose codes have a fixed width (:attr:`bits`) and no zero point; subclasses give the grid."""

    bits: ClassVar[int] = 4

    def request_bits(self, bits: int | None, method: str) -> int | None:
        if bits not in (None, self.bits):
            raise UsageError(
                f"--method {method} has {self.bits}-bit codes, not {bits}",
                hint=f"drop --bits or pass --bits {self.bits}",
            )
        return self.bits

    def config_error(self, qc: Mapping[str, Any]) -> str | None:
        bits = qc.get("bits")
        return None if bits == self.bits else f"bits {bits!r} ({self.name} codes have {self.bits} bits)"
