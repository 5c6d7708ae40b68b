"""Resolve a family's symbolic dimensions from config.json, validating types as it goes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.spec import FamilySpec, T
from moetool.errors import ConfigError

_MISSING = object()

# Config keys shared by most families; a family's ``fields`` entry replaces the tuple for a symbol.
COMMON_FIELDS: dict[str, tuple[str, ...]] = {
    "L": ("num_hidden_layers",),
    "H": ("hidden_size",),
    "V": ("vocab_size",),
    "NH": ("num_attention_heads",),
    "NKV": ("num_key_value_heads",),
    "HD": ("head_dim",),
    "D": ("intermediate_size",),
    "E": ("num_local_experts", "num_experts", "n_routed_experts"),
    "K": ("num_experts_per_tok",),
    "I": ("moe_intermediate_size",),
    "S": ("shared_expert_intermediate_size",),
}

# transformers renames these between versions (attribute_map): a family's own keys come first, then
# every alias, so a config written by any version resolves.
ALIASES: dict[str, tuple[str, ...]] = {
    "E": ("num_local_experts", "num_experts", "n_routed_experts"),
    "K": ("num_experts_per_tok", "moe_topk", "experts_per_token", "moe_top_k"),
}

# Symbols every family needs; the others only where its templates use them.
REQUIRED = ("L", "H", "V")


def get_path(config: Mapping[str, Any], dotted: str) -> Any:
    """Value of a dotted key (``"ffn_config.moe_top_k"``) in a config, or a sentinel when absent/null."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return _MISSING if node is None else node


def _as_int(value: Any, key: str) -> int:
    # bool is an int subclass in Python: "num_experts": true must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(
            f"config.json field {key!r} must be an integer, got {value!r}",
            hint="fix config.json; it does not match what the model family expects",
        )
    if value < 0:
        raise ConfigError(f"config.json field {key!r} must not be negative, got {value}")
    return value


@dataclass
class Dims:
    """Resolved dimensions of one model: symbol values, flags, and the MoE layer schedule."""

    values: dict[str, Any]
    moe_layers: frozenset[int]
    num_layers: int
    num_mtp: int = 0
    tied: bool = False
    per_layer: dict[int, dict[str, Any]] = field(default_factory=dict)

    def for_layer(self, layer: int) -> dict[str, Any]:
        """Dims as seen by one layer (per-layer overrides applied)."""
        if layer in self.per_layer:
            return {**self.values, **self.per_layer[layer]}
        return self.values

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def lookup(config: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[Any, str | None]:
    """First present value among ``keys`` and the key it came from."""
    for key in keys:
        value = get_path(config, key)
        if value is not _MISSING:
            return value, key
    return _MISSING, None


def _int_field(config: Mapping[str, Any], keys: tuple[str, ...], default: Any = _MISSING) -> Any:
    value, key = lookup(config, keys)
    if value is _MISSING:
        return default
    if isinstance(value, list):  # per-layer lists (Hunyuan) are resolved per layer by the family
        return [_as_int(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _as_int(value, key or "?")


def _schedule(spec: FamilySpec, config: Mapping[str, Any], num_layers: int, num_experts: int) -> frozenset[int]:
    if not spec.is_moe or spec.schedule == "none" or num_experts == 0:
        return frozenset()
    layers = range(num_layers)
    if spec.schedule == "all":
        return frozenset(layers)
    if spec.schedule == "qwen":
        only_dense = get_path(config, "mlp_only_layers")
        only_dense = set() if only_dense is _MISSING else {_as_int(x, "mlp_only_layers[]") for x in only_dense}
        step = _int_field(config, ("decoder_sparse_step",), 1) or 1
        return frozenset(ly for ly in layers if ly not in only_dense and (ly + 1) % step == 0)
    if spec.schedule == "deepseek":
        first_dense = _int_field(config, ("first_k_dense_replace",), 0)
        freq = _int_field(config, ("moe_layer_freq",), 1) or 1
        return frozenset(ly for ly in layers if ly >= first_dense and ly % freq == 0)
    if spec.schedule == "llama4":
        explicit = get_path(config, "moe_layers")
        if explicit is not _MISSING:
            return frozenset(_as_int(x, "moe_layers[]") for x in explicit)
        step = _int_field(config, ("interleave_moe_layer_step",), 1) or 1
        return frozenset(ly for ly in layers if (ly + 1) % step == 0)
    raise ValueError(f"unknown schedule {spec.schedule!r} in family {spec.name}")


def text_config(spec: FamilySpec, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config that describes the language model (the nested text config of wrappers)."""
    if spec.text_config_key:
        nested = get_path(config, spec.text_config_key)
        if isinstance(nested, Mapping):
            return nested
    return config


def resolve_dims(spec: FamilySpec, config: Mapping[str, Any]) -> Dims:
    """Resolve every symbol and flag a family's templates use from its config.

    Raises:
        ConfigError: a required field is missing or has the wrong type.
    """
    cfg = text_config(spec, config)
    fields = {**COMMON_FIELDS, **spec.fields}
    for symbol, aliases in ALIASES.items():
        fields[symbol] = tuple(dict.fromkeys(fields[symbol] + aliases))
    values: dict[str, Any] = {}
    for symbol, keys in fields.items():
        value = _int_field(cfg, keys, spec.defaults.get(symbol, _MISSING))
        if value is not _MISSING:
            values[symbol] = value
    for symbol in REQUIRED:
        if symbol not in values:
            raise ConfigError(
                f"config.json lacks {' or '.join(repr(k) for k in fields[symbol])}, needed for a {spec.name} model",
                hint="is this the config.json of a causal language model?",
            )
    if "NH" in values:
        values.setdefault("NKV", values["NH"])
        if values["NH"]:
            values.setdefault("HD", values["H"] // values["NH"])
    if spec.is_moe:
        for symbol in ("E", "K"):
            if symbol not in values:
                raise ConfigError(
                    f"config.json lacks {' or '.join(repr(k) for k in fields[symbol])}, "
                    f"needed for a {spec.name} MoE model"
                )
        values.setdefault("I", values.get("D"))
    for name, rule in spec.flags.items():
        if callable(rule):
            values[name] = bool(rule(cfg))
        else:
            key, default = rule
            raw = get_path(cfg, key)
            values[name] = default if raw is _MISSING else bool(raw)
    if spec.derive is not None:
        values.update(spec.derive(values))
    num_layers = values["L"]
    num_experts = values.get("E", 0) if spec.is_moe else 0
    if isinstance(num_experts, list):
        raise ConfigError("config.json gives the expert count as a list; moetool expects one number")
    tied_raw = get_path(cfg, "tie_word_embeddings")
    if tied_raw is _MISSING:
        tied_raw = get_path(config, "tie_word_embeddings")
    tied = bool(spec.defaults.get("tie_word_embeddings", False)) if tied_raw is _MISSING else bool(tied_raw)
    values["tied"] = tied
    num_mtp = _int_field(cfg, ("num_nextn_predict_layers",), 0) if spec.mtp else 0
    dims = Dims(
        values=values,
        moe_layers=_schedule(spec, cfg, num_layers, num_experts),
        num_layers=num_layers,
        num_mtp=num_mtp,
        tied=tied,
    )
    if spec.layer_dims is not None:
        for layer in range(num_layers):
            override = spec.layer_dims(cfg, layer, values)
            if override:
                dims.per_layer[layer] = override
    # Per-layer lists (Hunyuan's moe_topk, moe_intermediate_size) must be resolved by layer_dims.
    for symbol, value in values.items():
        if isinstance(value, list) and not all(symbol in d for d in dims.per_layer.values()):
            raise ConfigError(f"config.json gives {symbol} per layer, which this family does not support")
    return dims


def eval_dim(term: str | int, values: Mapping[str, Any]) -> int:
    """Evaluate one shape entry: an int, a symbol, or a sum of products like ``"H+2*NKV*HD"``."""
    if isinstance(term, int):
        return term
    return sum(_eval_product(part, values) for part in term.split("+"))


def _eval_product(term: str, values: Mapping[str, Any]) -> int:
    result = 1
    for factor in term.split("*"):
        factor = factor.strip()
        if factor.isdigit():
            result *= int(factor)
        elif factor in values:
            value = values[factor]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"dimension {factor} resolved to {value!r}, expected an integer")
            result *= value
        else:
            raise ConfigError(f"config.json lacks the field that gives dimension {factor}")
    return result


def template_applies(template: T, values: Mapping[str, Any]) -> bool:
    """Whether a template's ``when`` condition holds for these dims."""
    if template.when is None:
        return True
    negate = template.when.startswith("!")
    flag = bool(values.get(template.when.lstrip("!"), False))
    return flag != negate
