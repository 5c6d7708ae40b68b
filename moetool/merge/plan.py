"""What a merge writes, known before any tensor is read: the output config and every output tensor.

From the source checkpoint's headers and config alone:

* :func:`merge_traits` gives the registry's merge traits of an MoE family (refusals are its ``capabilities``);
* :func:`reduced_config` / :func:`dense_config` give the output config.json (expert count, top-k and
  DeepSeek's groups adjusted; or the dense counterpart's config), with every change listed;
* :func:`output_tensors` lists each output tensor (name, shape, dtype, and where it comes from) in
  write order, so the output size is predicted exactly and every tensor the merge produces is checked
  against the prediction as it is written;
* :func:`check_against_registry` compares that list with the tensors the registry says a checkpoint of
  the output config holds, so a config edit that transformers would read differently is caught before
  anything is written.

:class:`LayerDecision` records what happened to each MoE layer (kept, dropped, merged into which).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.dims import ALIASES, COMMON_FIELDS, Dims, get_path, lookup, resolve_dims
from moetool.arch.plan import planned_tensors
from moetool.arch.spec import FamilySpec, GroupRule, MergeTraits
from moetool.count.classify import TensorClassifier
from moetool.errors import ConfigError, UnsupportedArchitectureError, UsageError
from moetool.io.safetensors_header import DTYPE_BITS
from moetool.merge.layout import LayerTensors, template_shape


def merge_traits(spec: FamilySpec) -> MergeTraits:
    """The registry's merge traits of a family (a family merge refuses says so in its ``capabilities``,
    checked first: :func:`moetool.arch.registry.require_capability`).

    Raises:
        UnsupportedArchitectureError: ``NOT_MOE`` for a dense family.
    """
    if not spec.is_moe:
        raise UnsupportedArchitectureError(
            f"{spec.name} is a dense model family: there are no experts to merge",
            hint="merge takes a Mixture-of-Experts checkpoint (Mixtral, Qwen-MoE, DeepSeek, ...)",
            code="NOT_MOE",
        )
    return spec.merge


def supported_families() -> list[str]:
    """The registry names of the families merge handles, sorted."""
    from moetool.arch.registry import ALL_FAMILIES, capability

    return sorted(spec.name for spec in ALL_FAMILIES if spec.is_moe and capability(spec, "merge") is None)


def _value(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of a dotted key, or None when absent or null."""
    value, found = lookup(config, (dotted,))
    return value if found is not None else None


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output.

    Attributes:
        name: its name in the output.
        shape: its shape.
        dtype: safetensors dtype string.
        kind: ``copy`` (unchanged from ``source``), ``router``, ``experts``, ``dense_mlp`` (built), or
            ``zeros`` (a tensor the output architecture has and the source lacks, such as an attention
            bias that was switched off).
        layer: the decoder layer, or None for global tensors.
        source: the source tensor name for ``copy``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    layer: int | None = None
    source: str | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_BITS[self.dtype] // 8

    @property
    def numel(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel


@dataclass
class LayerDecision:
    """What happened to one MoE layer.

    Attributes:
        layer: the decoder layer index.
        groups: for each output expert (in order), the source experts it is made of; a pruned layer
            has one-member groups, a dense layer one group.
        weights: the averaging weights within each group (or the output scales for ``concat``).
        dropped: source experts that contribute nothing to the output.
        scores: the per-expert importance the method ranked by.
        notes: anything worth telling (router refit losses, alignment, shared expert folding).
    """

    layer: int
    groups: list[list[int]]
    weights: list[list[float]]
    dropped: list[int]
    scores: list[float]
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "experts": [
                {"index": j, "from": members, "weights": [round(w, 6) for w in weights]}
                for j, (members, weights) in enumerate(zip(self.groups, self.weights, strict=True))
            ],
            "dropped": self.dropped,
            "scores": [round(float(s), 6) for s in self.scores],
            **self.notes,
        }


# ----------------------------------------------------------------------------- config edits


def _set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _keys(spec: FamilySpec, symbol: str, extra: Sequence[str] = ()) -> list[str]:
    own = tuple(spec.fields.get(symbol, COMMON_FIELDS.get(symbol, ())))
    return list(dict.fromkeys((*own, *ALIASES.get(symbol, ()), *extra)))


def text_config_of(spec: FamilySpec, config: dict[str, Any]) -> dict[str, Any]:
    """The (mutable) dict that describes the language model: a nested text config or the config itself."""
    if spec.text_config_key:
        nested = get_path(config, spec.text_config_key)
        if isinstance(nested, dict):
            return nested
    return config


def _present(config: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if _value(config, k) is not None]


#: The group-count keys of the group-limited routers transformers ships (DeepSeek-V3's and Ling's).
_DERIVED_GROUP_KEYS = ("n_group", "num_expert_group")


def reduced_config(
    config: dict[str, Any], spec: FamilySpec, traits: MergeTraits, dims: Dims, m: int
) -> tuple[dict[str, Any], dict[str, list[Any]], list[str]]:
    """The config of the same family with ``m`` routed experts.

    Sets every config key that holds the expert count (the family's own and transformers' aliases that
    the file has), lowers top-k to at most ``m``, and for group-limited routing makes ``n_group``
    divide ``m`` (with enough experts per group) and ``topk_group <= n_group``. A multi-token-prediction
    module (DeepSeek-V3) is dropped: its experts are not run by transformers, so calibration cannot see
    them.

    Returns:
        ``(new_config, changes, notes)``: ``changes`` maps each changed key to ``[old, new]``.

    Raises:
        UsageError: ``M_TOO_SMALL`` when the family's routing cannot work with ``m`` experts.
    """
    new = copy.deepcopy(config)
    cfg = text_config_of(spec, new)
    changes: dict[str, list[Any]] = {}
    notes: list[str] = []

    def change(key: str, value: Any) -> None:
        old = _value(cfg, key)
        if old != value:
            changes[key] = [old, value]
        _set_path(cfg, key, value)

    e_keys = _keys(spec, "E", traits.extra_expert_keys)
    for key in _present(cfg, e_keys) or e_keys[:1]:
        change(key, m)

    top_k = dims.values["K"]
    if isinstance(top_k, list):
        top_k = max(top_k)
    # No top-k key: the model's code fixes it (Switch routes to 1 expert, NLLB-MoE to 2).
    fixed_k = spec.fields.get("K") == ()
    if fixed_k and m < top_k:
        raise UsageError(
            f"{spec.name} routes every token to {top_k} experts (fixed by its code); --num-experts {m} is too few",
            hint=f"ask for at least {top_k} experts",
            code="M_TOO_SMALL",
        )
    new_k = min(top_k, m)
    groups = traits.groups
    group_key = next((key for key in _DERIVED_GROUP_KEYS if _value(cfg, key) is not None), None)
    if groups is None and spec.derived and group_key is not None:
        # Families derived from transformers carry no merge traits; their group-limited routers are
        # DeepSeek-V3's (a group scored by its two best experts), the strictest rule.
        groups = GroupRule(n_group_key=group_key, min_per_group=2)
    if groups is not None:
        rule = groups
        n_group = int(_value(cfg, rule.n_group_key) or 1)
        topk_group = int(_value(cfg, rule.topk_group_key) or 1)
        if m < rule.min_per_group:
            raise UsageError(
                f"{spec.name} routing needs at least {rule.min_per_group} experts per group, so at least "
                f"{rule.min_per_group} experts; --num-experts {m} is too few",
                hint="ask for more experts, or use --to-dense",
                code="M_TOO_SMALL",
            )
        new_group = max(d for d in range(1, min(n_group, m) + 1) if m % d == 0 and m // d >= rule.min_per_group)
        new_topk_group = min(topk_group, new_group)
        if new_group != n_group:
            notes.append(
                f"{rule.n_group_key} {n_group} -> {new_group} (groups must divide {m} experts, "
                f"at least {rule.min_per_group} per group)"
            )
        if new_topk_group != topk_group:
            notes.append(f"{rule.topk_group_key} {topk_group} -> {new_topk_group} (at most {rule.n_group_key})")
        change(rule.n_group_key, new_group)
        change(rule.topk_group_key, new_topk_group)
        new_k = min(new_k, new_topk_group * (m // new_group))
    if new_k != top_k:
        notes.append(f"top-k {top_k} -> {new_k} (at most the {m} experts left)")
    for key in [] if fixed_k else _present(cfg, _keys(spec, "K")) or _keys(spec, "K")[:1]:
        value = _value(cfg, key)
        if isinstance(value, list):
            change(key, [min(int(v), new_k) for v in value])
        else:
            change(key, new_k)
    if spec.router_output.capacity_limited:
        n = int(dims.values["E"])
        for key in _present(cfg, traits.capacity_keys):
            value = _value(cfg, key)
            if isinstance(value, int) and not isinstance(value, bool):
                change(key, math.ceil(value * n / m))
                notes.append(
                    f"{key} {value} -> {_value(cfg, key)} (x {n}/{m}: each expert takes the tokens of "
                    f"{n / m:g} before, the capacity factor is kept)"
                )
    if dims.num_mtp:
        change("num_nextn_predict_layers", 0)
        notes.append("multi-token-prediction module dropped (transformers does not run it, so it was not calibrated)")
    return new, changes, notes


def dense_config(
    config: dict[str, Any], spec: FamilySpec, dense_spec: FamilySpec, width: int
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The dense counterpart's config (``intermediate_size`` = ``width``), built by transformers' config class.

    Every key the dense config class knows is taken from the MoE config when present there (attention,
    RoPE, vocabulary, norms, dtype, special tokens); the others get the class's defaults, derived
    fields (``layer_types``) are recomputed. MoE-only keys are dropped.

    Returns:
        ``(new_config, changes)`` for the keys whose value changed or appeared.
    """
    from transformers import AutoConfig

    dense_type = dense_spec.model_types[0]
    source = text_config_of(spec, copy.deepcopy(config))
    defaults = AutoConfig.for_model(dense_type).to_dict()
    skip = {"model_type", "architectures", "transformers_version", "layer_types", "intermediate_size"}
    kwargs = {k: source[k] for k in defaults if k in source and k not in skip}
    kwargs["intermediate_size"] = width
    kwargs.update(_dense_windows(spec, dense_spec, source, kwargs))
    new = AutoConfig.for_model(dense_type, **kwargs).to_dict()
    new["architectures"] = [dense_spec.architectures[0]]
    new["model_type"] = dense_type
    if "transformers_version" in config:
        new["transformers_version"] = config["transformers_version"]
    changes = {
        key: [source.get(key), value]
        for key, value in new.items()
        if key not in ("transformers_version",) and source.get(key) != value
    }
    for key in source:
        if key not in new:
            changes[key] = [source[key], None]
    return new, changes


def _dense_windows(
    spec: FamilySpec, dense_spec: FamilySpec, source: dict[str, Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Sliding-window keys for the dense config, translated through the registry's window rules.

    Families spell sliding windows differently (Qwen2-MoE's default pattern is not Qwen2's), so the keys
    are never copied: the source rule reads a window per layer, the target rule writes it.

    Raises:
        UnsupportedArchitectureError: ``WINDOWS_UNSUPPORTED`` when the dense family cannot express the
            source's pattern.
    """
    read_rule = getattr(spec, "windows", None)
    write_rule = getattr(dense_spec, "windows", None)
    if read_rule is None:
        return {}
    for key in (*read_rule.keys, *(write_rule.keys if write_rule else ())):
        kwargs.pop(key, None)
    num_layers = int(source.get("num_hidden_layers") or 0)
    windows = read_rule.read(source, num_layers)
    if write_rule is not None and write_rule.write is not None:
        written = write_rule.write(windows)
        if written is not None:
            return written
    elif all(w is None for w in windows):
        return {"use_sliding_window": False} if write_rule and "use_sliding_window" in write_rule.keys else {}
    raise UnsupportedArchitectureError(
        f"--to-dense: {dense_spec.name} cannot express the sliding-window pattern of this {spec.name} model "
        f"({windows})",
        hint="only full attention, or one window on every layer, carries over",
        code="WINDOWS_UNSUPPORTED",
    )


# ----------------------------------------------------------------------------- output tensors


def moe_width(dims: Dims, layer: int) -> int:
    """The routed-expert width ``I`` of a layer."""
    return int(dims.for_layer(layer)["I"])


def output_tensors(
    checkpoint: Any,
    spec: FamilySpec,
    dims: Dims,
    layout: LayerTensors,
    *,
    m: int | None,
    dense_spec: FamilySpec | None = None,
    dense_width: int | None = None,
    expert_dtype: str,
) -> tuple[list[OutputTensor], dict[int | None, list[str]], list[str]]:
    """Every output tensor, in write order, with the source tensors each layer reads.

    Args:
        checkpoint: the source (headers only are used).
        spec / dims / layout: the source family, its dims and tensor layout.
        m: the output expert count (``None`` with ``dense_spec``).
        dense_spec: the dense counterpart, for ``--to-dense``.
        dense_width: the dense FFN width.
        expert_dtype: dtype of the routed experts (the dtype merged and dense FFN tensors are written in).

    Returns:
        ``(tensors, sources, dropped)``: the output tensors; the source tensor names per layer (None for
        global tensors), which is also the write order; and the source tensors left out (MTP module).
    """
    classifier = TensorClassifier(spec, dims)
    by_layer: dict[int | None, list[str]] = {}
    dropped: list[str] = []
    for name in checkpoint.tensors:
        placement = classifier.classify(name)
        if placement.category == "mtp":  # only what the registry calls MTP (DeepSeek's layer 61)
            dropped.append(name)
            continue
        layer = placement.layer
        if layer is not None and layer >= dims.num_layers:
            layer = None  # not a decoder layer of a family without MTP: passed through unchanged
        by_layer.setdefault(layer, []).append(name)
    order: list[int | None] = [None, *sorted(k for k in by_layer if k is not None)]
    sources = {k: by_layer[k] for k in order if k in by_layer}

    out: list[OutputTensor] = []
    for layer, names in sources.items():
        if layer is None or (not dims.is_moe_layer(layer) and dense_spec is None):
            out += [_copy(checkpoint, n, layer) for n in names]
            continue
        if not dims.is_moe_layer(layer):  # a dense layer of the MoE, written with the dense target's names
            mlp = set(_dense_mlp_names(spec, layout, layer))
            out += [_copy(checkpoint, n, layer) for n in names if n not in mlp]
            out += _dense_mlp(dense_spec, layout, layer, dense_width, expert_dtype)
            continue
        router = layout.router_names(layer)
        experts = set(layout.expert_names(layer, dims.values["E"]))
        shared = set(layout.shared_names(layer))
        gate = layout.shared_gate_name(layer)
        consumed = set(router) | experts
        if dense_spec is not None:
            consumed |= shared | ({gate} if gate else set())
        out += [_copy(checkpoint, n, layer) for n in names if n not in consumed]
        if dense_spec is not None:
            out += _dense_mlp(dense_spec, layout, layer, dense_width, expert_dtype)
            continue
        for name in router:
            info = checkpoint.tensors[name]
            out.append(OutputTensor(name, (m, *info.shape[1:]), info.dtype, "router", layer))
        for name, shape in layout.expert_shapes(layer, m, layout.width(layer)):
            out.append(OutputTensor(name, shape, expert_dtype, "experts", layer))
    return out, sources, dropped


def _copy(checkpoint: Any, name: str, layer: int | None) -> OutputTensor:
    info = checkpoint.tensors[name]
    return OutputTensor(name, tuple(info.shape), info.dtype, "copy", layer, name)


def _dense_mlp_names(spec: FamilySpec, layout: LayerTensors, layer: int) -> list[str]:
    base = layout.layer_prefix(layer)
    return [base + t.name for t in spec.dense_mlp[:3]]


def _dense_mlp(
    dense_spec: FamilySpec | None, layout: LayerTensors, layer: int, width: int | None, dtype: str
) -> list[OutputTensor]:
    assert dense_spec is not None and width is not None
    base = layout.prefix + dense_spec.layer_prefix.format(L=layer)
    values = {**layout.dims.for_layer(layer), "D": width}
    return [
        OutputTensor(base + t.name, template_shape(t, values), dtype, "dense_mlp", layer)
        for t in dense_spec.dense_mlp[:3]
    ]


def check_against_registry(
    tensors: list[OutputTensor], spec: FamilySpec, config: dict[str, Any], *, prefix: str = ""
) -> tuple[list[OutputTensor], list[str]]:
    """Compare the output tensors with what the registry says a checkpoint of ``config`` holds.

    Returns:
        ``(zeros, extra)``: tensors the output architecture expects but the plan lacks, to be written
        as zeros (only biases qualify: a zero bias is exact), and names the plan writes that the
        architecture does not know (passed through, reported).

    Raises:
        ConfigError: ``MERGE_PLAN_MISMATCH`` when shapes disagree or a non-bias tensor is missing: the
            output config would not describe the output weights.
    """
    try:
        dims = resolve_dims(spec, config)
    except ConfigError as exc:
        raise ConfigError(f"the output config is not valid for {spec.name}: {exc.message}") from None
    expected = {prefix + t.name: t.shape for t in planned_tensors(spec, dims)}
    planned = {t.name: t for t in tensors}
    problems = []
    zeros = []
    dtype = tensors[0].dtype if tensors else "F32"
    for name, shape in expected.items():
        have = planned.get(name)
        if have is None:
            if name.endswith(".bias"):
                zeros.append(OutputTensor(name, shape, dtype, "zeros", None))
            else:
                problems.append(f"{name} missing")
        elif tuple(have.shape) != tuple(shape):
            problems.append(f"{name} is {have.shape}, the config implies {shape}")
    if problems:
        raise ConfigError(
            f"internal check failed: the output config and tensors disagree ({'; '.join(problems[:3])})",
            hint="this is a bug in moetool merge; please report it with the model's config.json",
            code="MERGE_PLAN_MISMATCH",
        )
    extra = [name for name in planned if name not in expected]
    return zeros, extra


def dense_target(spec: FamilySpec) -> FamilySpec:
    """The dense family ``--to-dense`` writes (the registry's ``dense_counterpart``).

    Raises:
        UnsupportedArchitectureError: ``NO_DENSE_COUNTERPART``.
    """
    from moetool.arch.registry import get_family

    if not spec.dense_counterpart and spec.stacks:
        raise UnsupportedArchitectureError(
            f"--to-dense: {spec.name} is an encoder-decoder, and moetool writes dense counterparts of "
            "decoder-only families only",
            hint="use --num-experts M (M >= the experts each token is routed to) to keep the architecture",
            code="NO_DENSE_COUNTERPART",
        )
    if not spec.dense_counterpart:
        raise UnsupportedArchitectureError(
            f"--to-dense: the registry names no dense architecture for {spec.name}",
            hint="--to-dense supports families with a dense counterpart (Mixtral -> Mistral, Qwen2-MoE -> "
            "Qwen2, Qwen3-MoE -> Qwen3); use --num-experts 1 to keep the architecture",
            code="NO_DENSE_COUNTERPART",
        )
    return get_family(spec.dense_counterpart)
