"""Checks on a written quantized checkpoint, and its bits per parameter from the bytes on disk.

Run inside the staging folder, before anything is published; a failed check removes the output:

* ``coverage``: every routed-expert tensor the config implies is stored as packed codes and none in
  full precision: 100% of routed-expert parameters quantized (what bitsandbytes' 4-bit loading misses
  for fused experts).
* ``exact``: each quantized layer, decoded from the files by moetool, equals the weights the quantizer
  computed, bit for bit.
* ``reload``: the output loaded the way users load it (:func:`moetool.load_model`: transformers
  ``from_pretrained`` through the registered ``moetool`` quantizer, or transformers itself) gives the
  same logits as the in-memory quantized model; run when the model is small enough to hold twice (or
  when asked).
* the storage format's own checks (:meth:`~moetool.quantize.formats.base.StorageFormat.verify`):
  compressed-tensors adds the reference library's decompression and stock transformers' load.

Bits per parameter: for each category (routed experts, shared experts, attention, ...), the stored
bytes (codes, scales, zero points, or the unchanged tensors) over the logical parameters they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import MoetoolError

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.formats.base import Stored
    from moetool.quantize.layout import QuantLayout
    from moetool.quantize.storage import QuantFormat

#: Models up to this many bytes of source weights are reloaded in full by default.
FULL_CHECK_BYTES = 4 * 10**9
RELOAD_TOLERANCE = 1e-4


class VerificationError(MoetoolError):
    """The written checkpoint failed a check; nothing was published."""

    default_code = "VERIFY_FAILED"


@dataclass
class Check:
    """One verification step: ``passed`` is ``None`` for a skipped (informational) check."""

    name: str
    passed: bool | None
    detail: str
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "value": self.value}


@dataclass
class CategoryStorage:
    """Stored bytes and logical parameters of one category."""

    params: int = 0
    bytes: int = 0
    quantized_params: int = 0

    @property
    def bits_per_param(self) -> float | None:
        return 8 * self.bytes / self.params if self.params else None

    def to_json(self) -> dict[str, Any]:
        bpp = self.bits_per_param
        return {
            "params": self.params,
            "bytes": self.bytes,
            "quantized_params": self.quantized_params,
            "bits_per_param": None if bpp is None else round(bpp, 4),
        }


@dataclass
class Verification:
    """Checks and storage figures of a written checkpoint."""

    checks: list[Check] = field(default_factory=list)
    storage: dict[str, CategoryStorage] = field(default_factory=dict)

    @property
    def routed_fraction(self) -> float:
        """Share of routed-expert parameters stored quantized."""
        routed = self.storage.get("routed_experts")
        return routed.quantized_params / routed.params if routed and routed.params else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": all(c.passed is not False for c in self.checks),
            "routed_experts_quantized": self.routed_fraction,
            "checks": [c.to_json() for c in self.checks],
        }


def measure_storage(
    output: Checkpoint, source: Checkpoint, layout: QuantLayout, stored: list[Stored]
) -> dict[str, CategoryStorage]:
    """Bytes on disk and logical parameters per category, from the output's headers.

    Stored tensors (``stored``, from the storage format) count toward the category of the tensor they
    replace, with the logical parameters they hold. Returns categories in the registry's order, plus
    ``total``.
    """
    from moetool.arch.spec import CATEGORIES
    from moetool.count.classify import TensorClassifier

    classifier = TensorClassifier(layout.spec, layout.dims)
    by_name = {s.name: s for s in stored}
    out: dict[str, CategoryStorage] = {c: CategoryStorage() for c in CATEGORIES}
    for name, info in output.tensors.items():
        packed = by_name.get(name)
        original = name if packed is None else packed.original
        params = info.numel if packed is None else packed.params
        quantized = packed is not None and packed.params > 0
        entry = out[classifier.classify(original).category]
        entry.bytes += info.nbytes
        entry.params += params
        if quantized:
            entry.quantized_params += params
    total = CategoryStorage()
    for entry in out.values():
        total.params += entry.params
        total.bytes += entry.bytes
        total.quantized_params += entry.quantized_params
    result = {k: v for k, v in out.items() if v.params or v.bytes}
    result["total"] = total
    return result


def check_coverage(output: Checkpoint, source: Checkpoint, layout: QuantLayout, stored: list[Stored]) -> Check:
    """Every routed-expert tensor stored packed (all of ``stored`` that replaces it), none in full precision.

    Raises:
        VerificationError: ``EXPERTS_NOT_QUANTIZED``, naming the first offenders.
    """
    needed: dict[str, list[str]] = {}
    for entry in stored:
        needed.setdefault(entry.original, []).append(entry.name)
    problems: list[str] = []
    total = quantized = 0
    logical = layout.numel()
    for experts in layout.experts.values():
        for name in experts.names():
            numel = logical[name]
            total += numel
            absent = [n for n in needed.get(name, []) if n not in output.tensors]
            if name in output.tensors:
                problems.append(f"{name} stored in full precision")
            elif needed.get(name) and not absent:
                quantized += numel
            else:
                problems.append(f"{absent[0] if absent else name} missing")
    fraction = quantized / total if total else 0.0
    if problems or fraction < 1.0:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise VerificationError(
            f"only {100 * fraction:.2f}% of routed-expert parameters are quantized: {shown}",
            hint="this is a bug in moetool quantize; please report it",
            code="EXPERTS_NOT_QUANTIZED",
        )
    return Check("coverage", True, f"{quantized:,} of {total:,} routed-expert parameters stored quantized", 1.0)


def check_exact(output: Checkpoint, layout: QuantLayout, fmt: QuantFormat, layers: dict[int, Any]) -> Check:
    """Decode every quantized layer from the files and compare with the model's in-memory weights.

    Raises:
        VerificationError: a decoded weight differs.
    """
    import torch

    from moetool.quantize.loader import read_packed_layer
    from moetool.quantize.modules import QuantizedExperts, QuantizedLinear

    compared = 0
    for layer in layout.layers:
        decoded = read_packed_layer(output, layout, fmt, layer)
        module = layers[layer]
        pairs = []
        if "experts" in decoded:
            experts = module.get_submodule(layout.spec.experts_module)
            holder = QuantizedExperts.like(experts, fmt)
            holder.load(*decoded.pop("experts"))
            gate_up, down = holder.dequantize()
            pairs += [("gate_up", gate_up, experts.gate_up_proj), ("down", down, experts.down_proj)]
        for name, weight in decoded.items():
            linear = module.get_submodule(name)
            holder = QuantizedLinear.like(linear, fmt)
            holder.load(weight)
            pairs.append((name, holder.dequantize(), linear.weight))
        for what, stored, live in pairs:
            live_value = live.detach().to("cpu")
            if not torch.equal(stored.to(live_value.dtype), live_value):
                diff = float((stored - live_value.float()).abs().max())
                raise VerificationError(
                    f"layer {layer} {what}: the written codes decode to different weights (max diff {diff:.3g})",
                    hint="this is a bug in moetool quantize; please report it",
                )
            compared += live_value.numel()
    return Check("exact", True, f"{compared:,} weights decoded from the files equal the quantized model's")


def check_reload(folder: Path, model: Any, input_ids: Any) -> Check:
    """Load the output through transformers (the registered quantizer) and compare logits.

    Raises:
        VerificationError: the logits differ beyond :data:`RELOAD_TOLERANCE` (relative to their scale).
    """
    import torch

    from moetool.io.checkpoint import Checkpoint
    from moetool.modeling import loader_for

    checkpoint = Checkpoint.open(folder)
    # Compare in the dtype the quantizer held the model in (its dequantized weights were rounded to it).
    dtype = next(model.parameters()).dtype
    loaded = loader_for(checkpoint.config)(checkpoint, dtype=dtype, device=torch.device("cpu"))
    try:
        with torch.no_grad():
            device = model.get_input_embeddings().weight.device
            want = model(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
            got = loaded(input_ids=input_ids, use_cache=False).logits.float()
    finally:
        del loaded
    diff = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    tolerance = RELOAD_TOLERANCE if dtype == torch.float32 else 5e-2  # half precision: summation order shows
    if not diff <= tolerance * scale:
        raise VerificationError(
            f"the written model, loaded back with transformers, gives different logits (max diff {diff:.3g})",
            hint="this is a bug in moetool quantize; please report it",
        )
    return Check(
        "reload", True, f"moetool.load_model (transformers from_pretrained): logits max abs diff {diff:.2e}", diff
    )
