"""Resolve a family's symbolic dimensions from config.json, validating types as it goes."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moetool.arch.layers import select_layers
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


def get_path(config: Mapping[str, Any], dotted: str, root: Mapping[str, Any] | None = None) -> Any:
    """Value of a dotted key (``"ffn_config.moe_top_k"``) in a config, or a sentinel when absent/null.

    Two key forms of the derived registry: ``^vision_config.depth`` is read from ``root`` (the whole
    config.json of a multimodal wrapper, when ``config`` is its text config), and ``len:layer_types``
    is the length of a per-layer list.
    """
    if dotted.startswith("^"):
        return get_path(root if root is not None else config, dotted[1:])
    parent, _, leaf = dotted.rpartition(".")
    if leaf.startswith("each:"):  # a per-layer list of values, resolved layer by layer
        return get_path(config, f"{parent}.{leaf[5:]}" if parent else leaf[5:])
    if leaf.startswith("len:"):
        node = get_path(config, f"{parent}.{leaf[4:]}" if parent else leaf[4:])
        return len(node) if isinstance(node, (list, str)) else _MISSING
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
    #: encoder-decoder families: the first global layer index of each stack, and its layer count.
    stack_starts: tuple[int, ...] = (0,)
    stack_counts: tuple[int, ...] = ()

    def stack_of(self, layer: int) -> tuple[int, int]:
        """(stack index, index within the stack) of a global layer index."""
        for index in range(len(self.stack_starts) - 1, -1, -1):
            if layer >= self.stack_starts[index]:
                return index, layer - self.stack_starts[index]
        return 0, layer

    def for_layer(self, layer: int) -> dict[str, Any]:
        """Dims as seen by one layer (per-layer overrides applied)."""
        if layer in self.per_layer:
            return {**self.values, **self.per_layer[layer]}
        return self.values

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def lookup(
    config: Mapping[str, Any], keys: tuple[str, ...], root: Mapping[str, Any] | None = None
) -> tuple[Any, str | None]:
    """First present value among ``keys`` and the key it came from."""
    for key in keys:
        value = get_path(config, key, root)
        if value is not _MISSING:
            return value, key
    return _MISSING, None


def _int_field(
    config: Mapping[str, Any],
    keys: tuple[str, ...],
    default: Any = _MISSING,
    root: Mapping[str, Any] | None = None,
    *,
    real: bool = False,
) -> Any:
    value, key = lookup(config, keys, root)
    if value is _MISSING:
        return default
    if real and isinstance(value, float) and not isinstance(value, bool):
        # Derived families: a ratio such as a projector's downsample_ratio (0.5) enters an expression;
        # eval_dim requires the dimension, not the field, to be whole.
        if value < 0:
            raise ConfigError(f"config.json field {key!r} must not be negative, got {value}")
        return value
    if isinstance(value, list):  # per-layer lists (Hunyuan) are resolved per layer by the family
        return [_as_int(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _as_int(value, key or "?")


def _schedule(spec: FamilySpec, config: Mapping[str, Any], num_layers: int, num_experts: int) -> frozenset[int]:
    if not spec.is_moe or spec.schedule == "none" or num_experts == 0:
        return frozenset()
    if spec.schedule not in ("all", "qwen", "deepseek", "llama4"):
        # A layer condition of the derived registry (moetool.arch.layers).
        chosen = select_layers(spec.schedule, config, num_layers)
        return frozenset(layer for layer, on in enumerate(chosen) if on)
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
    fields = dict(spec.fields) if spec.derived else {**COMMON_FIELDS, **spec.fields}
    for symbol, aliases in ALIASES.items():
        fields[symbol] = tuple(dict.fromkeys(fields.get(symbol, ()) + aliases))
    values: dict[str, Any] = {}
    for symbol, keys in fields.items():
        value = _int_field(cfg, keys, spec.defaults.get(symbol, _MISSING), config, real=spec.derived)
        if value is not _MISSING:
            values[symbol] = value
    # Defaults that transformers' config class computes from other fields (head_dim = hidden // heads).
    for symbol, expression in spec.default_exprs.items():
        if symbol not in values or (fields.get(symbol) and lookup(cfg, fields[symbol], config)[0] is _MISSING):
            with contextlib.suppress(ConfigError):  # a field it needs is missing: resolved as missing below
                values[symbol] = eval_dim(expression, values)
    for symbol in REQUIRED:
        if symbol not in values:
            raise ConfigError(
                f"config.json lacks {' or '.join(repr(k) for k in fields[symbol])}, needed for a {spec.name} model",
                hint="is this the config.json of a causal language model?",
            )
    if "NH" in values and not spec.derived:
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
        if not spec.derived:
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
    stack_counts: list[int] = []
    if spec.stacks:
        stack_counts = [eval_dim(stack.count, values) for stack in spec.stacks]
        num_layers = sum(stack_counts)
    num_experts = values.get("E", 0) if spec.is_moe else 0
    if isinstance(num_experts, list):
        raise ConfigError("config.json gives the expert count as a list; moetool expects one number")
    tied_raw = get_path(config if spec.tie_from_root else cfg, "tie_word_embeddings")
    if tied_raw is _MISSING:
        tied_raw = get_path(config, "tie_word_embeddings")
    tied = bool(spec.defaults.get("tie_word_embeddings", False)) if tied_raw is _MISSING else bool(tied_raw)
    values["tied"] = tied
    mtp_keys = spec.mtp_fields or (("num_nextn_predict_layers",) if spec.mtp else ())
    num_mtp = _int_field(cfg, mtp_keys, 0) if mtp_keys else 0
    # Conditions of the derived registry: global ones (flags) once, per-layer ones for every layer.
    per_layer_conditions: dict[str, list[bool]] = {}
    flag_cfg = {**cfg, "tie_word_embeddings": tied}
    starts = [sum(stack_counts[:i]) for i in range(len(stack_counts))] or [0]
    for condition in spec.conditions:
        if condition.startswith("at:"):
            values["c:" + condition] = block_condition(spec, condition, cfg, config, values)
        elif spec.global_conditions and condition in spec.global_conditions:
            values["c:" + condition] = select_layers(condition, flag_cfg, 1)[0]
        elif stack_counts:  # each stack numbers its own layers
            per_layer_conditions[condition] = [c for n in stack_counts for c in select_layers(condition, flag_cfg, n)]
        else:
            per_layer_conditions[condition] = select_layers(condition, flag_cfg, max(num_layers, 1))
    if stack_counts:
        moe_layers = frozenset(
            start + local
            for stack, start, count in zip(spec.stacks, starts, stack_counts, strict=True)
            if num_experts
            for local, on in enumerate(select_layers(stack.schedule, cfg, count))
            if on
        )
    else:
        moe_layers = _schedule(spec, cfg, num_layers, num_experts)
    dims = Dims(
        values=values,
        moe_layers=moe_layers,
        num_layers=num_layers,
        num_mtp=num_mtp,
        tied=tied,
        stack_starts=tuple(starts),
        stack_counts=tuple(stack_counts),
    )
    if spec.layer_dims is not None:
        for layer in range(num_layers):
            override = spec.layer_dims(cfg, layer, values)
            if override:
                dims.per_layer[layer] = override
    if per_layer_conditions:
        for layer in range(num_layers):
            flags = {"c:" + cond: chosen[layer] for cond, chosen in per_layer_conditions.items()}
            dims.per_layer[layer] = {**dims.per_layer.get(layer, {}), **flags}
    # Per-layer value lists of the derived registry (``each:KEY``, Laguna's per-layer head counts).
    for symbol, keys in fields.items():
        value = values.get(symbol)
        if spec.derived and keys and keys[0].rsplit(".", 1)[-1].startswith("each:") and isinstance(value, list):
            if len(value) < num_layers:
                raise ConfigError(f"config.json field {keys[0][5:]!r} must give one value per layer ({num_layers})")
            for layer in range(num_layers):
                dims.per_layer[layer] = {**dims.per_layer.get(layer, {}), symbol: value[layer]}
    # Per-layer lists (Hunyuan's moe_topk, moe_intermediate_size) must be resolved by layer_dims.
    for symbol, value in values.items():
        if symbol.startswith("c:at:"):
            continue  # blocks of a tower (block_condition), not layers
        if isinstance(value, list) and not all(symbol in d for d in dims.per_layer.values()):
            raise ConfigError(f"config.json gives {symbol} per layer, which this family does not support")
    return dims


_TOKEN = re.compile(r"\s*(?:(?P<num>\d+)|(?P<name>[A-Za-z_^][A-Za-z0-9_.:^]*)|(?P<op>//|[-+*/()]))")


def eval_dim(term: str | int, values: Mapping[str, Any]) -> int:
    """Evaluate one shape entry: an int, a symbol, or an expression over symbols.

    The expression language: integers, symbols, ``+ - * /`` (exact rational arithmetic; the result
    must be a whole number), ``//`` (floor division), parentheses, ``floor(...)`` / ``ceil(...)`` and
    ``int(...)`` (Python's ``int`` of the float product a config class computes),
    e.g. ``"H+2*NKV*HD"``, ``"hidden_size*num_key_value_heads/num_attention_heads"``, ``"ceil(H/16)"``.

    Raises:
        ConfigError: a symbol is missing or not a number, or the result is not a whole number.
    """
    if isinstance(term, int):
        return term
    if term in values:  # the common case: a bare symbol
        return _number(term, values, whole=True)  # type: ignore[return-value]
    result = _Parser(term, values).parse()
    if result.denominator != 1:
        raise ConfigError(f"dimension {term} is not a whole number ({float(result):g}) for this config")
    return int(result)


def _number(name: str, values: Mapping[str, Any], *, whole: bool = False) -> Fraction | int:
    if name not in values:
        raise ConfigError(f"config.json lacks the field that gives dimension {name}")
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"dimension {name} resolved to {value!r}, expected a number")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"dimension {name} resolved to {value!r}, expected an integer")
        return int(value)
    return Fraction(value)


class _Parser:
    """Recursive descent over :data:`_TOKEN` tokens (expressions are a few tokens long)."""

    def __init__(self, text: str, values: Mapping[str, Any]) -> None:
        self.text = text
        self.values = values
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                raise ValueError(f"bad dimension expression {self.text!r}")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
        self.pos = 0

    def parse(self) -> Fraction:
        value = self._sum()
        if self.pos != len(self.tokens):
            raise ValueError(f"bad dimension expression {self.text!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos][1]
            self.pos += 1
            right = self._product()
            value = value + right if op == "+" else value - right
        return value

    def _product(self) -> Fraction:
        value = self._atom()
        while self._peek() in ("*", "/", "//"):
            op = self.tokens[self.pos][1]
            self.pos += 1
            right = self._atom()
            if op == "*":
                value *= right
            elif right == 0:
                raise ConfigError(f"dimension {self.text} divides by zero for this config")
            else:
                value = value / right if op == "/" else Fraction(math.floor(value / right))
        return value

    def _atom(self) -> Fraction:
        if self.pos >= len(self.tokens):
            raise ValueError(f"bad dimension expression {self.text!r}")
        kind, text = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            return Fraction(int(text))
        if text == "-":
            return -self._atom()
        if text == "(":
            value = self._sum()
            self._expect(")")
            return value
        if kind == "name" and text in ("floor", "ceil", "int") and self._peek() == "(":
            self.pos += 1
            value = self._sum()
            self._expect(")")
            if text == "int":
                # Python's int() of a float product (a config class's int(hidden_size * mlp_ratio)):
                # the exact product rounded to a float first, as the multiplication did.
                return Fraction(math.floor(float(value)))
            return Fraction(math.floor(value) if text == "floor" else math.ceil(value))
        if kind == "name":
            return Fraction(_number(text, self.values))
        raise ValueError(f"bad dimension expression {self.text!r}")

    def _expect(self, token: str) -> None:
        if self._peek() != token:
            raise ValueError(f"bad dimension expression {self.text!r}")
        self.pos += 1


def block_condition(
    spec: FamilySpec, condition: str, cfg: Mapping[str, Any], config: Mapping[str, Any], values: Mapping[str, Any]
) -> list[bool]:
    """Which blocks of a tower a global template's ``at:SYMBOL:CONDITION`` selects: ``CONDITION`` (a
    layer condition, :mod:`moetool.arch.layers`) over the config node that holds the block count
    ``SYMBOL`` (``^vision_config.sam_config.num_hidden_layers`` -> ``vision_config.sam_config``), for
    ``range(SYMBOL)``: a SAM encoder's global-attention blocks ``idx:global_attn_indexes``.

    Raises:
        ConfigError: the block count is missing or a field the condition reads is malformed.
    """
    symbol, _, inner = condition[len("at:") :].partition(":")
    # ``L-1``: a list of one entry per layer but the first; block i is layer i + 1.
    match = re.fullmatch(r"(.+?)([-+]\d+)", symbol)
    symbol, shift = (match.group(1), int(match.group(2))) if match else (symbol, 0)
    count = values.get(symbol)
    if not isinstance(count, int):
        raise ConfigError(f"config.json lacks the field that gives dimension {symbol}")
    key = (spec.fields.get(symbol) or (symbol,))[0]
    root, dotted = (config, key[1:]) if key.startswith("^") else (cfg, key)
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = get_path(root, parent) if parent else root
    if not isinstance(node, Mapping):
        node = {}
    chosen = select_layers(inner, node, count)
    return [0 <= block - shift < count and chosen[block - shift] for block in range(count + shift)]


def template_applies(template: T, values: Mapping[str, Any]) -> bool:
    """Whether a template's ``when`` condition holds for these dims."""
    if template.when is None:
        return True
    negate = template.when.startswith("!")
    flag = bool(values.get(template.when.lstrip("!"), False))
    return flag != negate
