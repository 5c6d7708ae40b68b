"""Which decoder layers a per-layer rule selects, from config.json (no torch).

A *condition* is a small text expression the registry stores, for the MoE schedule of a family
("which layers route to experts") and for per-layer tensors ("this layer has a Mamba mixer"):

* ``all`` / ``none``;
* ``in:FIELD:a|b`` -- the per-layer list (or string) ``FIELD`` has ``a`` or ``b`` at the layer
  (``layer_types``, ``mlp_layer_types``, a hybrid pattern string such as ``"MEM*EM"``);
* ``idx:FIELD`` -- the layer's index is in the list of integers ``FIELD`` (``mlp_only_layers``);
* ``rule:NAME`` -- a named rule over scalar fields (:data:`RULES`), e.g. ``rule:deepseek``
  (``first_k_dense_replace`` and ``moe_layer_freq``);
* ``every:FIELD`` -- every FIELD-th layer, the last of each group: ``(layer + 1) % FIELD == 0``
  (NLLB-MoE's ``encoder_sparse_step``); ``every1:FIELD`` -- ``layer % FIELD == 1``, or every layer
  when FIELD is 1 (Switch Transformers' ``encoder_sparse_step``); a FIELD of 0 selects no layer;
* ``first`` -- the first layer only (T5-style relative position biases);
* ``!C`` negates, ``C&D`` requires both;
* ``in:FIELD:a??F`` (and ``idx:FIELD??F``) falls back to the condition ``F`` when config.json has no
  ``FIELD``: transformers' config classes fill such per-layer lists from scalar fields
  (``layer_types`` from ``full_attention_interval``), and the fallback is that rule.

Unknown fields take the defaults the rules document (the defaults of the transformers configs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from moetool.errors import ConfigError


def _int(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json field {key!r} must be an integer, got {value!r}")
    return value


def _int_list(cfg: Mapping[str, Any], key: str) -> list[int]:
    value = cfg.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"config.json field {key!r} must be a list of layer indices, got {value!r}")
    return value


def _deepseek(cfg: Mapping[str, Any], layer: int) -> bool:
    first = _int(cfg, "first_k_dense_replace", 0)
    freq = _int(cfg, "moe_layer_freq", 1) or 1
    return layer >= first and layer % freq == 0


def _qwen(cfg: Mapping[str, Any], layer: int) -> bool:
    step = _int(cfg, "decoder_sparse_step", 1) or 1
    return layer not in _int_list(cfg, "mlp_only_layers") and (layer + 1) % step == 0


def _llama4(cfg: Mapping[str, Any], layer: int) -> bool:
    explicit = cfg.get("moe_layers")
    if explicit is not None:
        return layer in _int_list(cfg, "moe_layers")
    step = _int(cfg, "interleave_moe_layer_step", 1) or 1
    return (layer + 1) % step == 0


def _ernie(cfg: Mapping[str, Any], layer: int) -> bool:
    start = _int(cfg, "moe_layer_start_index", 0)
    end = cfg.get("moe_layer_end_index")
    end = -1 if end is None else end
    interval = _int(cfg, "moe_layer_interval", 1) or 1
    if isinstance(start, list) or isinstance(end, list):  # the VL model gives (text, vision) pairs
        start, end = (start[0] if isinstance(start, list) else start), (end[0] if isinstance(end, list) else end)
    last = end if end is not None and end >= 0 else 1 << 30
    return start <= layer <= last and (layer - start) % interval == 0


def _period(period_key: str, offset_key: str, period: int, offset: int) -> Callable[[Mapping[str, Any], int], bool]:
    def rule(cfg: Mapping[str, Any], layer: int) -> bool:
        p = _int(cfg, period_key, period) or 1
        return layer % p == _int(cfg, offset_key, offset)

    return rule


def _first_dense(key: str) -> Callable[[Mapping[str, Any], int], bool]:
    def rule(cfg: Mapping[str, Any], layer: int) -> bool:
        return layer >= _int(cfg, key, 0)

    return rule


def _interval(key: str, default: int) -> Callable[[Mapping[str, Any], int], bool]:
    def rule(cfg: Mapping[str, Any], layer: int) -> bool:
        return (layer + 1) % (_int(cfg, key, default) or 1) == 0

    return rule


#: Named rules over scalar config fields, ``(cfg, layer) -> bool``.
RULES: dict[str, Callable[[Mapping[str, Any], int], bool]] = {
    "deepseek": _deepseek,
    "qwen": _qwen,
    "llama4": _llama4,
    "ernie": _ernie,
    "jamba_experts": _period("expert_layer_period", "expert_layer_offset", 2, 1),
    "jamba_attention": _period("attn_layer_period", "attn_layer_offset", 8, 4),
    "num_dense_layers": _first_dense("num_dense_layers"),
    "first_k_dense": _first_dense("first_k_dense"),
    "full_attention_interval": _interval("full_attention_interval", 4),
}


#: Older names of ``layer_types`` values that transformers' configs rename on load (so the registry's
#: conditions, fitted on what transformers holds, see the new names), and the older key of the list.
_LEGACY_LAYER_TYPES = {
    "mamba": "linear_attention",
    "attention": "full_attention",
    "deepseek_sparse_attention": "indexed_attention",
    "qwen_sparse_attention": "indexed_attention",
}
_LAYER_TYPES_KEYS = {"layer_types": ("layer_types", "layers_block_type")}


def _layer_list(cfg: Mapping[str, Any], key: str) -> Any:
    for name in _LAYER_TYPES_KEYS.get(key, (key,)):
        seq = cfg.get(name)
        if seq is not None:
            if key in ("layer_types", "mtp_layer_types") and isinstance(seq, list):
                return [_LEGACY_LAYER_TYPES.get(v, v) if isinstance(v, str) else v for v in seq]
            return seq
    return None


def _atom(atom: str, cfg: Mapping[str, Any], num_layers: int) -> list[bool]:
    if atom == "all":
        return [True] * num_layers
    if atom == "none":
        return [False] * num_layers
    if atom == "first":
        return [layer == 0 for layer in range(num_layers)]
    kind, _, rest = atom.partition(":")
    if kind == "rule":
        rule = RULES.get(rest)
        if rule is None:
            raise ValueError(f"unknown layer rule {rest!r}")
        return [rule(cfg, layer) for layer in range(num_layers)]
    if kind in ("every", "every1"):
        step = _int(cfg, rest, 0)
        if step <= 0:
            return [False] * num_layers
        if kind == "every":
            return [(layer + 1) % step == 0 for layer in range(num_layers)]
        return [step == 1 or layer % step == 1 for layer in range(num_layers)]
    if kind == "idx":
        chosen = set(_int_list(cfg, rest))
        return [layer in chosen for layer in range(num_layers)]
    if kind == "in":
        key, _, values = rest.partition(":")
        wanted = set(values.split("|"))
        seq = _layer_list(cfg, key)
        if seq is None:
            raise ConfigError(
                f"config.json lacks {key!r}, the per-layer list that says which layers have which tensors",
                hint=f"add {key!r} (one entry per layer), as transformers writes it",
            )
        if not isinstance(seq, (list, str)) or len(seq) < num_layers:
            raise ConfigError(
                f"config.json field {key!r} must give one entry per layer ({num_layers}), got {seq!r}"[:300]
            )
        return [str(seq[layer]) in wanted for layer in range(num_layers)]
    raise ValueError(f"unknown layer condition {atom!r}")


def select_layers(condition: str, cfg: Mapping[str, Any], num_layers: int) -> list[bool]:
    """Evaluate a condition for every layer.

    Raises:
        ConfigError: a field the condition reads has the wrong type or length.
    """
    result = [True] * num_layers
    for part in condition.split("&"):
        part = part.strip()
        negate = part.startswith("!")
        atom, _, fallback = part.lstrip("!").partition("??")
        if fallback and _layer_list(cfg, atom.split(":")[1].split("??")[0]) is None:
            atom = fallback.lstrip("!")
            negate = negate != fallback.startswith("!")
        values = _atom(atom, cfg, num_layers)
        result = [r and (v != negate) for r, v in zip(result, values, strict=True)]
    return result
