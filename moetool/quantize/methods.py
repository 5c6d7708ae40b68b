"""Quantization methods: how codes are chosen, as a registry of :class:`Method` objects.

* ``gptq``: GPTQ on each expert's routed calibration tokens (needs calibration text);
* ``rtn``: round to nearest, from the weights alone;
* ``nf4``: round to nearest on bitsandbytes' NF4 code book (the method fixes the ``nf4`` scheme);
* ``fp4``: round to nearest on the E2M1 values (the ``fp4`` scheme).

A method owns whether it needs data, which scheme a request gets under it, what it records in
``quantization_config`` and the model card, and how it quantizes one decoder layer (the algorithms are
in :mod:`moetool.quantize.engine`, :mod:`moetool.quantize.gptq` and :mod:`moetool.quantize.rtn`).
Adding one is a :class:`Method` subclass (or instance) plus its entry in :data:`METHODS`. No torch at
import.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from moetool.errors import UsageError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from moetool.quantize.engine import LayerJob
    from moetool.quantize.request import QuantizeOptions


class Method:
    """A quantization method (see the module docstring): round to nearest on the request's scheme."""

    #: the ``--method`` value, recorded as ``method`` in ``quantization_config``.
    name: ClassVar[str] = "rtn"
    #: whether it calibrates on text (``--dataset``).
    needs_data: ClassVar[bool] = False

    def __init__(self, scheme: str | None = None) -> None:
        #: the scheme the method always uses (code books), or ``None``: uniform, or ternary with ``--ternary``.
        self.scheme = scheme

    def scheme_for(self, request: QuantizeOptions) -> str:
        """The scheme a request gets under this method.

        Raises:
            UsageError: ``--ternary`` with a method that fixes another scheme.
        """
        if self.scheme is None:
            return "ternary" if request.ternary else "uniform"
        if request.ternary:
            raise UsageError(f"--ternary and --method {self.name} exclude each other", hint="use --method gptq or rtn")
        return self.scheme

    def details(self, request: QuantizeOptions) -> dict[str, Any]:
        """Informative settings the method records in ``quantization_config``."""
        return {}

    def card_options(self, request: QuantizeOptions, calibration: dict[str, Any] | None) -> dict[str, Any]:
        """The method's settings in the model card's option table."""
        return {}

    def memory_note(self, expert_batch: int) -> str:
        """What the method adds to the memory status line."""
        return ""

    def fixed_threads(self, device: Any) -> AbstractContextManager[Any]:
        """The thread setting every layer run of the pass uses (GPTQ: a fixed count, for reproducibility)."""
        return contextlib.nullcontext()

    def quantize_layer(self, job: LayerJob) -> None:
        """Quantize one decoder layer in place, filling ``job.result``."""
        from moetool.quantize.engine import rtn_layer

        rtn_layer(job)


class CodebookRTN(Method):
    """Round to nearest on a code-book scheme that the method names (``--method nf4``)."""

    def __init__(self, name: str) -> None:
        super().__init__(scheme=name)
        self.name = name  # type: ignore[misc]  # an instance per code book


class GPTQ(Method):
    """GPTQ, layer by layer and batched over experts, on the tokens the model routes to each expert."""

    name = "gptq"
    needs_data = True

    def details(self, request: QuantizeOptions) -> dict[str, Any]:
        return {"act_order": request.act_order, "damp": request.damp}

    def card_options(self, request: QuantizeOptions, calibration: dict[str, Any] | None) -> dict[str, Any]:
        # Key names avoid "token" followed by a word character, which the card masks as a secret.
        coverage = request.coverage
        return {
            "act order": request.act_order,
            "dampening": request.damp,
            "calibration": calibration["dataset"] if calibration else None,
            "calibrate all experts": coverage.all_experts,
            "min tokens per expert": coverage.min_tokens_per_expert,
            "max tokens per expert": coverage.max_tokens_per_expert or "no cap",
            "fallback": coverage.fallback,
        }

    def memory_note(self, expert_batch: int) -> str:
        return f"GPTQ {expert_batch} experts at a time, "

    def fixed_threads(self, device: Any) -> AbstractContextManager[Any]:
        from moetool.quantize.gptq import reproducible_threads

        return reproducible_threads(device)

    def quantize_layer(self, job: LayerJob) -> None:
        from moetool.quantize.engine import gptq_layer

        gptq_layer(job)


#: The methods by ``--method`` name.
METHODS: dict[str, Method] = {m.name: m for m in (GPTQ(), Method(), CodebookRTN("nf4"), CodebookRTN("fp4"))}


def _or_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def method_named(name: str) -> Method:
    """The method a ``--method`` value names.

    Raises:
        UsageError: an unknown method.
    """
    if name not in METHODS:
        raise UsageError(f"unknown --method {name!r}", hint=f"use {_or_list(list(METHODS))}")
    return METHODS[name]
