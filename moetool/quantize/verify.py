"""Checks on a written quantized checkpoint, and its bits per parameter from the bytes on disk.

Run inside the staging folder, before anything is published; a failed check removes the output:

* ``coverage``: every routed-expert tensor the config implies is stored as packed codes and none in
  full precision: 100% of routed-expert parameters quantized (what bitsandbytes' 4-bit loading misses
  for fused experts).
* ``exact``: each quantized layer, decoded from the files one layer at a time, equals the weights the
  quantizer computed, bit for bit (compared through fingerprints, so no layer stays in memory);
* ``logits``: the original and the quantized model, both run by the layer-streamed pass on a probe
  window, give finite logits; their KL and top-1 agreement are reported;
* ``reload``: the output loaded the way users load it (transformers ``from_pretrained`` through the
  registered ``moetool`` quantizer) gives the probe window the same logits as the quantized model of
  the pass; run when the model is small enough to load whole (or when asked).
* the storage format's own checks (:meth:`~moetool.quantize.formats.base.StorageFormat.verify`):
  compressed-tensors adds the reference library's decompression and stock transformers' load.

Bits per parameter: for each category (routed experts, shared experts, attention, ...), the stored
bytes (codes, scales, zero points, or the unchanged tensors) over the logical parameters they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import VerificationError

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.formats.base import Stored
    from moetool.quantize.layout import QuantLayout
    from moetool.quantize.storage import QuantFormat

RELOAD_TOLERANCE = 1e-4


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
    for name in layout.routed_names():
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


def check_decoded(
    output: Checkpoint, layout: QuantLayout, fmt: QuantFormat, digests: dict[int, dict[str, str]], dtype: Any
) -> Check:
    """Decode every quantized layer from the files, one layer at a time, and compare it bit for bit with
    the weights the quantizer computed (kept as fingerprints, so no layer stays in memory).

    Raises:
        VerificationError: a decoded weight differs, or a layer the quantizer wrote is missing.
    """
    import hashlib

    from torch import nn

    from moetool.quantize.loader import read_packed_layer
    from moetool.quantize.modules import QuantizedExperts, QuantizedLinear

    compared = 0
    for layer in layout.layers:
        expected = digests.get(layer)
        if expected is None:
            raise VerificationError(f"layer {layer} was not quantized", hint="this is a bug in moetool quantize")
        decoded = read_packed_layer(output, layout, fmt, layer)
        got: dict[str, str] = {}
        if "experts" in decoded:
            info = layout.experts[layer]
            experts = QuantizedExperts(info.num_experts, info.hidden, info.intermediate, nn.Identity(), fmt)
            experts.load(*decoded.pop("experts"))
            # One expert decoded at a time: the layer's full-precision weights never exist at once.
            for what in ("gate_up", "down"):
                hasher = hashlib.sha256()
                for expert in range(info.num_experts):
                    weight = experts._weight(what, expert).to(dtype)
                    tensor_digest(weight, hasher)
                    compared += weight.numel()
                got[what] = hasher.hexdigest()
            del experts
        shapes = {linear.module: linear.shape for linear in layout.linears.get(layer, [])}
        for name, weight in decoded.items():
            out_features, in_features = shapes[name]
            linear = QuantizedLinear(in_features, out_features, False, fmt)
            linear.load(weight)
            dequantized = linear.dequantize().to(dtype)
            got[name] = tensor_digest(dequantized)
            compared += dequantized.numel()
        for what, digest in expected.items():
            if got.get(what) != digest:
                raise VerificationError(
                    f"layer {layer} {what}: the written codes decode to different weights than the quantizer's",
                    hint="this is a bug in moetool quantize; please report it",
                )
    return Check("exact", True, f"{compared:,} weights decoded from the files equal the quantized model's")


def check_probe_logits(original: Any, quantized: Any) -> Check:
    """Compare the original and the quantized model's logits on the probe window (both computed by the
    layer-streamed pass): the quantized model must give finite logits; KL and top-1 agreement are reported.

    Raises:
        VerificationError: the quantized model's logits are NaN or infinite.
    """
    import torch

    if original is None or quantized is None:
        return Check("logits", None, "skipped: no probe logits")
    if not bool(torch.isfinite(quantized).all()):
        raise VerificationError(
            "the quantized model gives NaN or infinite logits on the probe tokens",
            hint="try more bits, a smaller --group-size, or --dtype float32",
            code="NON_FINITE",
        )
    log_p = torch.log_softmax(original.float(), dim=-1)
    log_q = torch.log_softmax(quantized.float(), dim=-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agree = float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean())
    tokens = int(original.shape[-2]) if original.dim() > 1 else 1
    return Check(
        "logits",
        True,
        f"original vs quantized on {tokens} probe tokens: KL {kl:.5f}, top-1 agreement {100 * agree:.1f}%",
        kl,
    )


def probe_inputs(model: Any, input_ids: Any) -> dict[str, Any]:
    """The forward arguments of the probe window: an encoder-decoder's decoder reads the same tokens
    (teacher forcing, as the streamed runner feeds it)."""
    ids = input_ids.reshape(1, -1)
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def check_reload(folder: Path, want: Any, input_ids: Any, dtype: Any) -> Check:
    """Load the output the way users do (transformers, through the registered quantizer) and compare its
    logits on the probe tokens with the quantized model's from the streamed pass.

    Raises:
        VerificationError: the logits differ beyond :data:`RELOAD_TOLERANCE` (relative to their scale).
    """
    import torch

    from moetool.io.checkpoint import Checkpoint
    from moetool.modeling import loader_for

    checkpoint = Checkpoint.open(folder)
    # Compare in the dtype the quantizer held the model in (its dequantized weights were rounded to it).
    loaded = loader_for(checkpoint.config)(checkpoint, dtype=dtype, device=torch.device("cpu"))
    try:
        with torch.no_grad():
            got = loaded(**probe_inputs(loaded, input_ids), use_cache=False).logits.float()
    finally:
        del loaded
    want = want.float().reshape(got.shape)
    # Non-finite logits (an input let through with --allow-nonfinite) must sit in the same places.
    finite = want.isfinite()
    same_places = torch.equal(finite, got.isfinite())
    diff = float((want - got)[finite].abs().max()) if finite.any() else 0.0
    if not same_places:
        diff = float("inf")
    scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
    tolerance = RELOAD_TOLERANCE if dtype == torch.float32 else 5e-2  # half precision: summation order shows
    if not same_places or not diff <= tolerance * scale:
        raise VerificationError(
            f"the written model, loaded back with transformers, gives different logits (max diff {diff:.3g})",
            hint="this is a bug in moetool quantize; please report it",
        )
    return Check(
        "reload", True, f"moetool.load_model (transformers from_pretrained): logits max abs diff {diff:.2e}", diff
    )


def tensor_digest(tensor: Any, hasher: Any = None) -> str:
    """A fingerprint of a tensor's exact bytes (what the decode-back check compares); ``hasher`` continues
    one started on earlier parts (the experts of a stack, one at a time, give the stack's fingerprint)."""
    import hashlib

    import torch

    hasher = hasher or hashlib.sha256()
    for part in tensor.detach().reshape(-1, *tensor.shape[-2:]) if tensor.dim() > 2 else [tensor.detach()]:
        if part.is_floating_point():
            part = part + 0.0  # -0.0 becomes 0.0: the same value, whichever way the decoder computed it
        data = part.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        hasher.update(memoryview(data.numpy()))
    return hasher.hexdigest()
