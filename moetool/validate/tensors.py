"""The tensors against the config: names and shapes the family's templates imply, float storage."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moetool.arch.dims import Dims, lookup
from moetool.arch.plan import planned_tensors
from moetool.arch.spec import FamilySpec, T, is_index_table
from moetool.errors import MoetoolError
from moetool.io.dtypes import FLOAT_DTYPES
from moetool.validate.config import config_findings, config_prefix, dims_fields
from moetool.validate.findings import (
    FATAL,
    HINT_CONFIG,
    HINT_MISSING,
    HINT_QUANTIZED,
    HINT_SHAPES,
    SHOWN,
    WARNING,
    Finding,
    fatal_first,
    show,
    summary,
)

_DTYPE_NAMES = {
    "F8_E4M3": "FP8",
    "F8_E5M2": "FP8",
    "F8_E4M3FNUZ": "FP8",
    "F8_E5M2FNUZ": "FP8",
    "F8_E8M0": "FP8 scales",
    "F4": "FP4",
    "F6_E2M3": "FP6",
    "F6_E3M2": "FP6",
    "U8": "packed 8-bit integers",
    "I8": "8-bit integers",
    "I32": "packed 32-bit integers",
}


def _template_table(spec: FamilySpec) -> dict[str, T]:
    table = {t.name: t for templates in spec.globals_.values() for t in templates}
    for templates in spec.layer_templates().values():
        table.update({t.name: t for t in templates})
    table.update({t.name: t for t in spec.mtp})
    return table


_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def _explain(spec: FamilySpec, cfg: Mapping[str, Any], template: T | None) -> str:
    """``num_local_experts x hidden_size`` for a router template: which config fields give the shape."""
    if template is None:
        return ""
    fields = dims_fields(spec)

    def term(t: str | int) -> str:
        if isinstance(t, int):
            return str(t)
        out = t
        for symbol in sorted(re.findall(r"[A-Za-z_]+", t), key=len, reverse=True):
            keys = fields.get(symbol, ())
            _, key = lookup(cfg, keys)
            # A derived size (head_dim from hidden_size / heads) is named by its usual field.
            out = re.sub(rf"\b{symbol}\b", key or (keys[0] if keys else symbol), out)
        return out

    return " x ".join(term(t) for t in template.shape)


@dataclass
class _Stored:
    info: Any
    comparable: bool  # stored unpacked: its shape is the logical shape


def _stored_tensors(checkpoint: Any, spec: FamilySpec, dims: Dims) -> dict[str, _Stored]:
    """Stored tensors by logical name (wrapper prefixes stripped, packed quantized storage unpacked)."""
    from moetool.count.classify import TensorClassifier
    from moetool.count.quant import QuantScheme, logical_tensor

    strip = TensorClassifier(spec, dims).strip_prefix if spec.name_prefixes else None
    scheme = QuantScheme.from_config(checkpoint.config)
    plain = scheme.method is None
    out: dict[str, _Stored] = {}
    for info in checkpoint.tensors.values():
        if plain and info.dtype in FLOAT_DTYPES:
            name, comparable = info.name, True  # the common case, without the packing rules
        else:
            logical = logical_tensor(info, scheme)
            if logical.storage_only:
                continue
            name, comparable = logical.name, logical.name == info.name and logical.params == info.numel
        out[strip(name) if strip else name] = _Stored(info, comparable)
    return out


def _shape_findings(checkpoint: Any, spec: FamilySpec, dims: Dims) -> list[Finding]:
    from moetool.count.classify import TensorClassifier

    classifier = TensorClassifier(spec, dims)
    stored = _stored_tensors(checkpoint, spec, dims)
    cfg, _ = config_prefix(spec, checkpoint.config)
    table = _template_table(spec)
    # A plain regex for the layer index: classifying every name is the slow part on 10^5 tensors.
    layer_re = re.compile(re.escape(spec.layer_prefix).replace(re.escape("{L}"), r"(?P<L>\d+)") + r"(?P<rest>.+)\Z")

    def layer_of(name: str) -> int | None:
        match = layer_re.match(name)
        return int(match["L"]) if match else None

    # One pass over the stored names: layers present, and names past the decoder layers.
    beyond: list[str] = []
    stored_layers: set[int] = set()
    for name in stored:
        match = layer_re.match(name)
        if match:
            layer = int(match["L"])
            stored_layers.add(layer)
            if layer >= dims.num_layers:
                beyond.append(name)

    def template_of(name: str) -> T | None:
        match = layer_re.match(name)
        rest = match["rest"] if match else name
        if rest in table:
            return table[rest]
        found = _INDEX.search(rest)
        if found:
            return table.get(rest[: found.start(1)] + "{E}" + rest[found.end(1) :])
        return None

    mismatched: list[str] = []
    missing_experts: list[str] = []
    missing_other: list[str] = []
    for planned in planned_tensors(spec, dims):
        entry = stored.get(planned.name)
        if entry is None:
            layer = layer_of(planned.name)
            if layer is not None and layer >= dims.num_layers and layer not in stored_layers:
                continue  # an MTP module the config declares but transformers did not save (inspect says so)
            placement = classifier.classify(planned.name)
            if placement.category == "routed_experts":
                expert = f" expert {placement.expert}" if placement.expert is not None else ""
                missing_experts.append(f"layer {placement.layer}{expert} lacks {planned.name}")
            else:
                missing_other.append(planned.name)
            continue
        if not entry.comparable or tuple(entry.info.shape) == planned.shape:
            continue
        found = list(entry.info.shape)
        transposed = sorted(found) == sorted(planned.shape) and len(found) > 1
        why = _explain(spec, cfg, template_of(planned.name))
        mismatched.append(
            f"{planned.name} has shape {found}, config.json implies {list(planned.shape)}"
            + (f" ({why})" if why else "")
            + (" (transposed?)" if transposed else "")
        )
    out: list[Finding] = []
    if mismatched:
        out.append(Finding("SHAPE_MISMATCH", summary(mismatched, "tensor(s) disagree with config.json"), HINT_SHAPES))
    if missing_experts:
        out.append(
            Finding("EXPERT_MISSING", summary(missing_experts, "routed-expert tensor(s) are missing"), HINT_MISSING)
        )
    if missing_other:
        what = "tensor(s) that config.json implies are missing"
        message = f"{missing_other[0]} is missing, though config.json implies it" if len(missing_other) == 1 else ""
        out.append(Finding("TENSOR_MISSING", message or summary(missing_other, what), HINT_MISSING))
    extra = sorted({p.layer for p in map(classifier.classify, beyond) if p.layer is not None and p.category != "mtp"})
    if extra:
        out.append(
            Finding(
                "EXTRA_TENSORS",
                f"tensors of layer(s) {', '.join(map(str, extra[:SHOWN]))} lie beyond num_hidden_layers "
                f"({dims.num_layers}) and the {spec.name} family has no multi-token-prediction module: "
                "commands pass them through unchanged",
                None,
                WARNING,
            )
        )
    return out


def _float_findings(checkpoint: Any, spec: FamilySpec, dims: Dims) -> list[Finding]:
    """Quantized storage named clearly, for commands that read float weights."""
    qc = checkpoint.config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else None
        return [
            Finding(
                "QUANTIZED_INPUT",
                f"{checkpoint.name} is quantized (quantization_config: {show(method) if method else 'present'}); "
                "this command reads float weights",
                HINT_QUANTIZED,
            )
        ]
    from moetool.count.classify import TensorClassifier

    classifier = TensorClassifier(spec, dims)
    bad: list[Any] = []
    for info in checkpoint.tensors.values():
        if info.dtype in FLOAT_DTYPES or is_index_table(info.name):
            continue
        placement = classifier.classify(info.name)
        if placement.category in ("routed_experts", "shared_experts", "attention", "dense_mlp", "router"):
            bad.append(info)
    if not bad:
        return []
    first = bad[0]
    kind = _DTYPE_NAMES.get(first.dtype, first.dtype)
    return [
        Finding(
            "QUANTIZED_INPUT",
            f"{len(bad)} weight tensor(s) of {checkpoint.name} are stored as {first.dtype} ({kind}), e.g. "
            f"{first.name}; this command reads float16, bfloat16 or float32 weights",
            HINT_QUANTIZED,
        )
    ]


# Integer storage is a quantized format's: without a quantization_config nothing can decode it, and
# transformers would load the integers as if they were the weights.
_INTEGER_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL"})
_WEIGHT_CATEGORIES = frozenset(
    {"routed_experts", "shared_experts", "attention", "dense_mlp", "router", "embedding", "lm_head", "norms"}
)


def _integer_findings(checkpoint: Any, spec: FamilySpec, dims: Dims) -> list[Finding]:
    """Weights stored as integers by a checkpoint that says it is not quantized."""
    if checkpoint.config.get("quantization_config") is not None:
        return []
    from moetool.count.classify import TensorClassifier

    classifier = TensorClassifier(spec, dims)
    bad = [
        info
        for info in checkpoint.tensors.values()
        if info.dtype in _INTEGER_DTYPES
        and classifier.classify(info.name).category in _WEIGHT_CATEGORIES
        and not is_index_table(info.name)  # hash-routing tables are integers by nature
    ]
    if not bad:
        return []
    return [
        Finding(
            "DTYPE_INVALID",
            f"{len(bad)} weight tensor(s) are stored as integers ({bad[0].dtype}), e.g. {bad[0].name}, but "
            "config.json has no quantization_config that says how to decode them",
            "re-download the checkpoint, or add the quantization_config it was written with",
        )
    ]


def validate_checkpoint(checkpoint: Any, *, float_weights: bool = False) -> list[Finding]:
    """Check a checkpoint's config and tensor headers against each other and the family registry.

    No tensor data is read. Unknown families get the config checks only.

    Args:
        checkpoint: an opened :class:`~moetool.io.checkpoint.Checkpoint` (local or headers-only).
        float_weights: also refuse quantized storage (FP8, packed integers, ``quantization_config``):
            for commands that rewrite weights.

    Returns:
        The findings, fatal ones first.
    """
    findings, spec, dims = config_findings(checkpoint.config)
    if spec is None or dims is None:
        return findings
    if checkpoint.tensors:
        try:
            findings += _shape_findings(checkpoint, spec, dims)
        except MoetoolError as exc:  # a dimension the templates need is missing or not a number
            findings.append(Finding(exc.code, exc.message, exc.hint or HINT_CONFIG, FATAL))
            return fatal_first(findings)
        findings += _integer_findings(checkpoint, spec, dims)
        if float_weights and not any(f.code == "DTYPE_INVALID" for f in findings):
            findings += _float_findings(checkpoint, spec, dims)
    return fatal_first(findings)
