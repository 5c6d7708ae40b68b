"""Total and active-per-token parameter counts, from safetensors headers or from config.json alone.

Both paths classify tensors with the same family templates, but their inputs are independent: the
header path sees what the checkpoint really stores (names, dtypes, shapes from the headers, no tensor
data read), the config path sees what config.json implies (:func:`moetool.arch.plan.planned_tensors`).
Tests hold them equal to each other and to the instantiated transformers model.

Conventions (GUIDE.md section 2):

* total = every stored parameter, counted logically (packed quantized values unpacked; scales are
  storage), except multi-token-prediction modules: like the published DeepSeek-V3 figure (671B of
  684.5B stored) and like the model transformers instantiates, ``total_params`` leaves them out. They
  are the ``mtp`` category, and ``total_params_with_mtp`` is every stored parameter.
* active per token = everything except routed experts, plus top-k / num_experts of each MoE layer's
  routed experts; shared experts and routers always count. MTP modules are not part of the
  per-token forward pass and count 0 (``mtp_active_params`` gives what one MTP step would use).
* ``active_params`` counts the input embedding and lm_head (Mixtral, Qwen, DBRX convention);
  ``active_params_without_embedding`` leaves the input embedding out (DeepSeek, gpt-oss convention).
  With tied embeddings the shared matrix stays in, as the output head.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.dims import Dims, resolve_dims
from moetool.arch.plan import planned_tensors
from moetool.arch.registry import family_for_config
from moetool.arch.spec import CATEGORIES, FamilySpec
from moetool.count.classify import TensorClassifier
from moetool.count.quant import QuantScheme, logical_tensor
from moetool.io.nonfinite import NonfiniteCount
from moetool.validate import Finding, as_error, validate_checkpoint, validate_config

SCHEMA_VERSION = 1

# How many heuristically placed tensor names a report lists (a whole family of misses is one cause).
_MAX_UNMATCHED_WARNINGS = 5


@dataclass
class CategoryCount:
    """Parameters of one category: stored in total, and used per token."""

    total: int = 0
    active: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "active": self.active}


def _empty_categories() -> dict[str, CategoryCount]:
    return {name: CategoryCount() for name in CATEGORIES}


@dataclass
class LayerCount:
    """Counts of one decoder layer (or MTP module)."""

    index: int
    kind: str  # "moe", "dense" or "mtp"
    num_experts: int = 0
    top_k: int = 0
    categories: dict[str, CategoryCount] = field(default_factory=_empty_categories)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.categories.values())

    @property
    def active(self) -> int:
        return sum(c.active for c in self.categories.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.index,
            "kind": self.kind,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "total": self.total,
            "active": self.active,
            "categories": {k: v.to_dict() for k, v in self.categories.items() if v.total},
        }


@dataclass
class ParamReport:
    """The result of counting a model's parameters (what ``moetool inspect`` shows)."""

    model: str
    model_type: str | None
    family: str
    source: str  # "safetensors" (headers) or "config"
    is_moe: bool
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    num_shared_experts: int
    tied_embeddings: bool
    categories: dict[str, CategoryCount]
    layers: list[LayerCount]
    mtp_active_params: int = 0
    routing: str = "none"
    revision: str | None = None
    quantization: str | None = None
    dtype_bytes: dict[str, int] = field(default_factory=dict)
    storage_only_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    #: what :mod:`moetool.validate` found wrong (config types, shapes, missing tensors, top-k).
    findings: list[Finding] = field(default_factory=list)
    #: tensors holding NaN/Inf, when values were scanned (``inspect --scan-nonfinite``).
    nonfinite: list[NonfiniteCount] | None = None

    @property
    def total_params(self) -> int:
        """Every parameter but the MTP modules (the published convention)."""
        return self.total_params_with_mtp - self.categories["mtp"].total

    @property
    def total_params_with_mtp(self) -> int:
        """Every stored parameter."""
        return sum(c.total for c in self.categories.values())

    @property
    def active_params(self) -> int:
        return sum(c.active for c in self.categories.values())

    @property
    def active_params_without_embedding(self) -> int:
        if self.tied_embeddings:
            return self.active_params  # the one matrix is also the output head
        return self.active_params - self.categories["embedding"].active

    @property
    def total_bytes(self) -> int:
        return sum(self.dtype_bytes.values())

    def to_json(self, *, per_layer: bool = False) -> dict[str, Any]:
        """The stable ``--json`` document (``schema_version`` 1)."""
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "revision": self.revision,
            "model_type": self.model_type,
            "family": self.family,
            "source": self.source,
            "is_moe": self.is_moe,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "active_params_without_embedding": self.active_params_without_embedding,
            "total_params_without_mtp": self.total_params,
            "total_params_with_mtp": self.total_params_with_mtp,
            "mtp_params": self.categories["mtp"].total,
            "mtp_active_params": self.mtp_active_params,
            "num_layers": self.num_layers,
            "num_moe_layers": len(self.moe_layers),
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "routing": self.routing,
            "tied_embeddings": self.tied_embeddings,
            "quantization": self.quantization,
            "categories": {k: v.to_dict() for k, v in self.categories.items()},
            "storage": {
                "total_bytes": self.total_bytes,
                "by_dtype": dict(sorted(self.dtype_bytes.items())),
                "quantization_storage_bytes": self.storage_only_bytes,
            },
            "warnings": list(self.warnings),
            "findings": [f.to_json() for f in self.findings],
            "nonfinite": None if self.nonfinite is None else [hit.to_json() for hit in self.nonfinite],
        }
        if per_layer:
            doc["layers"] = [layer.to_dict() for layer in self.layers]
        return doc


@dataclass(frozen=True)
class _Entry:
    """One logical tensor to count."""

    name: str
    params: int


class _Counter:
    """Accumulates entries into categories and layers, then derives active counts."""

    def __init__(self, spec: FamilySpec, dims: Dims) -> None:
        self.spec = spec
        self.dims = dims
        self.classifier = TensorClassifier(spec, dims)
        self.globals = _empty_categories()
        self.layers: dict[int, LayerCount] = {}
        self.experts_seen: dict[int, set[int]] = defaultdict(set)
        self.unmatched: list[str] = []

    def _layer(self, index: int) -> LayerCount:
        if index not in self.layers:
            kind = "mtp" if index >= self.dims.num_layers else "moe" if self.dims.is_moe_layer(index) else "dense"
            values = self.dims.for_layer(min(index, self.dims.num_layers - 1))
            moe = kind == "moe" or (kind == "mtp" and self.spec.is_moe)
            self.layers[index] = LayerCount(
                index, kind, values.get("E", 0) if moe else 0, values.get("K", 0) if moe else 0
            )
        return self.layers[index]

    def add(self, entry: _Entry) -> None:
        placement = self.classifier.classify(entry.name)
        if not placement.matched and len(self.unmatched) < _MAX_UNMATCHED_WARNINGS:
            self.unmatched.append(f"{entry.name} -> {placement.category}")
        if placement.layer is None:
            self.globals[placement.category].total += entry.params
            return
        layer = self._layer(placement.layer)
        layer.categories[placement.category].total += entry.params
        if placement.expert is not None:
            self.experts_seen[placement.layer].add(placement.expert)

    def finish(self, warnings: list[str]) -> tuple[dict[str, CategoryCount], list[LayerCount], int]:
        """Derive active counts; return categories, layers and the MTP per-step active count."""
        categories = _empty_categories()
        for name, count in self.globals.items():
            categories[name].total += count.total
            categories[name].active += count.total
        mtp_active = 0
        for index in sorted(self.layers):
            layer = self.layers[index]
            for name, count in layer.categories.items():
                if name == "routed_experts":
                    count.active = self._routed_active(layer, count.total, warnings)
                else:
                    count.active = count.total
            if layer.kind == "mtp":
                mtp_total = layer.total
                mtp_active += layer.active
                categories["mtp"].total += mtp_total
                continue
            for name, count in layer.categories.items():
                categories[name].total += count.total
                categories[name].active += count.active
        return categories, [self.layers[i] for i in sorted(self.layers)], mtp_active

    def _routed_active(self, layer: LayerCount, total: int, warnings: list[str]) -> int:
        if total == 0:
            return 0
        experts, top_k = layer.num_experts, layer.top_k
        if not experts:
            warnings.append(f"layer {layer.index}: expert tensors in a layer the config marks as dense")
            return total
        seen = self.experts_seen.get(layer.index)
        if seen and len(seen) != experts:
            missing = sorted(set(range(experts)) - seen)[:5]
            warnings.append(
                f"layer {layer.index}: found {len(seen)} experts, config says {experts}"
                + (f" (missing e.g. {missing})" if missing else "")
            )
            experts = len(seen)
        if total % experts:
            warnings.append(f"layer {layer.index}: routed-expert parameters do not split evenly over {experts}")
        return min(total, round(total * min(top_k, experts) / experts))


def _report(
    *,
    name: str,
    config: Mapping[str, Any],
    spec: FamilySpec,
    dims: Dims,
    entries: Iterable[_Entry],
    source: str,
    warnings: list[str],
) -> ParamReport:
    counter = _Counter(spec, dims)
    for entry in entries:
        counter.add(entry)
    categories, layers, mtp_active = counter.finish(warnings)
    if counter.unmatched:
        warnings.append("tensors placed by name heuristics: " + "; ".join(counter.unmatched))
    values = dims.values
    moe_layers = sorted(dims.moe_layers)
    first_moe = dims.for_layer(moe_layers[0]) if moe_layers else values
    return ParamReport(
        model=name,
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        family=spec.name,
        source=source,
        is_moe=spec.is_moe and bool(moe_layers),
        num_layers=dims.num_layers,
        moe_layers=moe_layers,
        num_experts=int(first_moe.get("E", 0)) if moe_layers else 0,
        top_k=int(first_moe.get("K", 0)) if moe_layers else 0,
        num_shared_experts=_num_shared(spec, first_moe) if moe_layers else 0,
        tied_embeddings=dims.tied,
        categories=categories,
        layers=layers,
        mtp_active_params=mtp_active,
        routing=spec.routing.rule.value,
        quantization=QuantScheme.from_config(config).method,
        warnings=warnings,
    )


def _num_shared(spec: FamilySpec, values: Mapping[str, Any]) -> int:
    if not spec.shared_experts:
        return 0
    if "NS" in values:
        return int(values["NS"])
    if values.get("has_shared") is False:
        return 0
    return 1 if values.get("S", 1) else 0


def count_from_config(config: Mapping[str, Any], *, name: str = "") -> ParamReport:
    """Count parameters from config.json alone, through the family's tensor templates.

    Raises:
        UnsupportedArchitectureError: the family is not in the registry.
        ConfigError: a needed field is missing or malformed (or so implausible that counting would not end).
    """
    findings = _refuse_fatal(validate_config(config), name)
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    entries = (_Entry(t.name, _numel(t.shape)) for t in planned_tensors(spec, dims))
    report = _report(name=name, config=config, spec=spec, dims=dims, entries=entries, source="config", warnings=[])
    report.findings = findings
    return report


def _refuse_fatal(findings: list[Finding], name: str) -> list[Finding]:
    """Raise the findings that make counting impossible; return the others (inspect shows them)."""
    error = as_error([f for f in findings if f.level == "fatal"], name)
    if error is not None:
        raise error
    return findings


def count_from_checkpoint(checkpoint: Any) -> ParamReport:
    """Count parameters from a checkpoint's safetensors headers (no tensor data is read).

    Falls back to config-only counting when the checkpoint stores no safetensors weights.

    Args:
        checkpoint: a :class:`moetool.io.checkpoint.Checkpoint`.
    """
    config = checkpoint.config
    if not checkpoint.tensors:
        report = count_from_config(config, name=checkpoint.name)
        report.revision = checkpoint.revision
        report.warnings[:0] = list(checkpoint.warnings)
        return report
    findings = _refuse_fatal(validate_checkpoint(checkpoint), checkpoint.name)
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    scheme = QuantScheme.from_config(config)
    if scheme.method == "moetool":
        # Packed codes do not carry their logical shape; the config's templates do.
        numel = {t.name: _numel(t.shape) for t in planned_tensors(spec, dims)}
        scheme = QuantScheme(scheme.method, scheme.bits, numel)
    dtype_bytes: dict[str, int] = defaultdict(int)
    storage_only = 0
    entries: list[_Entry] = []
    for info in checkpoint.tensors.values():
        dtype_bytes[info.dtype] += info.nbytes
        logical = logical_tensor(info, scheme)
        if logical.storage_only:
            storage_only += info.nbytes
            continue
        entries.append(_Entry(logical.name, logical.params))
    report = _report(
        name=checkpoint.name,
        config=config,
        spec=spec,
        dims=dims,
        entries=entries,
        source="safetensors",
        warnings=list(checkpoint.warnings),
    )
    if dims.num_mtp and not report.categories["mtp"].total:
        report.warnings.append(
            f"config.json declares {dims.num_mtp} MTP module(s) that the checkpoint does not store "
            "(transformers drops them on save); counts describe the stored weights"
        )
    report.revision = checkpoint.revision
    report.dtype_bytes = dict(dtype_bytes)
    report.storage_only_bytes = storage_only
    report.findings = findings
    return report


def _numel(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
