"""The one quantize request: every setting of a ``moetool quantize`` run, typed and checked once.

The CLI builds a :class:`QuantizeOptions` from its flags; constructing it checks every value (bad ones
raise :class:`~moetool.errors.UsageError` right there). The library derives what it needs from it: the
method (:mod:`moetool.quantize.methods`), the scheme (:mod:`moetool.quantize.schemes`) and the settings a
checkpoint records (:meth:`QuantizeOptions.format`). Values that depend on the machine or the model
(GPTQ's expert batch, the expert layout) are computed by the run from it, never stored back into a
second options object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moetool.errors import UsageError
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.quantize.calibrate import CoverageOptions
from moetool.quantize.storage import QuantFormat


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how (checked when constructed).

    Attributes:
        bits: bits per code (2, 3, 4 or 8); ignored with ``ternary``; must be 4 for ``nf4``; ``None``:
            the scheme's default (4).
        ternary: codes -1/0/+1 per group scale, entropy coded on disk (QMoE-style).
        method: a name in :data:`moetool.quantize.methods.METHODS`: ``gptq`` (needs calibration data),
            ``rtn`` or ``nf4``.
        group_size: input columns per scale; 0 for one scale per row. A last, shorter group is
            allowed when it does not divide a row.
        act_order: GPTQ: columns in order of decreasing Hessian diagonal.
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        clip_search: uniform grids: search a shrunken range per group (GPTQ's ``mse`` option).
        ternary_bits: ternary: the bits per expert parameter (coded codes plus scales) to stay under.
            Each expert's scale is the smallest multiple of its rows' absmax whose codes are estimated
            to fit (a larger scale leaves more codes at 0); 0 turns this off and uses ``ternary_scale``.
        ternary_scale: ternary without a bit target: the scale as a multiple of each row's (or group's)
            absmax.
        attention / shared_experts: quantize those projections too.
        coverage: how calibration tokens reach experts.
        expert_batch: experts GPTQ quantizes together (0: as many as fit the memory budget of
            :func:`~moetool.quantize.api.auto_expert_batch`; more is faster, fewer holds less).
        device: where calibration and GPTQ run (``auto``: CUDA when available); one decoder layer at a
            time is read from the checkpoint onto it.
        dtype: the compute dtype (``auto``: float32 on the CPU, the checkpoint's dtype on a GPU).
        max_shard_size: largest output weight file, in bytes.
        whole_model: load the whole model first instead of streaming it layer by layer (for comparison).
        offload_activations: keep the calibration activations in CPU memory between layers.
        output_format: ``auto`` (compressed-tensors when the settings fit what servers read, else
            moetool's format), ``compressed-tensors`` or ``moetool`` (see :mod:`moetool.quantize.formats`).
        symmetric: uniform codes without a zero point; ``None``: symmetric in compressed-tensors,
            asymmetric in moetool's format.

    Raises:
        UsageError: an unknown method, bits outside {2, 3, 4, 8}, nf4 with other than 4 bits or with
            ``ternary``, a negative group size, a dampening outside (0, 1], a bad coverage option, ...
    """

    bits: int | None = None
    ternary: bool = False
    method: str = "gptq"
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    clip_search: bool = False
    ternary_bits: float = 1.0
    ternary_scale: float = 1.0
    attention: bool = False
    shared_experts: bool = False
    coverage: CoverageOptions = field(default_factory=CoverageOptions)
    expert_batch: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    whole_model: bool = False
    offload_activations: bool = False
    output_format: str = "auto"
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        # Frozen: the derived settings are cached once, when the request is checked.
        object.__setattr__(self, "_format", self._check())

    @property
    def categories(self) -> tuple[str, ...]:
        return (
            ("routed_experts",)
            + (("shared_experts",) if self.shared_experts else ())
            + (("attention",) if self.attention else ())
        )

    @property
    def needs_data(self) -> bool:
        """Whether the method calibrates on text (GPTQ)."""
        from moetool.quantize.methods import method_named

        return method_named(self.method).needs_data

    def format(self) -> QuantFormat:
        """The settings a checkpoint of this request records (before the storage format completes them:
        see :func:`moetool.quantize.formats.resolve`)."""
        return self._format  # type: ignore[attr-defined]

    def _check(self) -> QuantFormat:
        from moetool.quantize.methods import method_named
        from moetool.quantize.schemes import scheme_named

        method = method_named(self.method)
        scheme = scheme_named(method.scheme_for(self))
        bits = scheme.request_bits(self.bits, method.name)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise UsageError(f"--group-size must be 0 (one per row) or positive, not {self.group_size}")
        if not 0 < self.damp <= 1:
            raise UsageError(f"--damp must be in (0, 1], not {self.damp}")
        if not 0 < self.ternary_scale <= 4:
            raise UsageError(f"--ternary-scale must be in (0, 4], not {self.ternary_scale}")
        if self.ternary_bits < 0 or 0 < self.ternary_bits < 0.3:
            raise UsageError(
                f"--ternary-bits must be 0 (off) or at least 0.3, not {self.ternary_bits}",
                hint="ternary codes cannot be coded much below 0.3 bit with their scales",
            )
        if self.expert_batch < 0:
            raise UsageError("--expert-batch must be 0 (all experts) or positive")
        from moetool.quantize.formats import AUTO, format_named

        if self.output_format != AUTO:
            format_named(self.output_format)
        if self.symmetric is not None and not scheme.symmetry_choice:
            raise UsageError(f"--sym/--asym apply to uniform codes, not to {scheme.name}", code="SYMMETRY_INVALID")
        self.coverage.validate()
        details: dict[str, Any] = {**method.details(self), **scheme.details(self)}
        return QuantFormat(scheme.name, bits, self.group_size, self.categories, method.name, details)
