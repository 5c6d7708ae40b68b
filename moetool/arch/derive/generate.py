"""Derive the table of MoE families from the installed transformers and write it as JSON.

For each MoE model type (:func:`moetool.arch.derive.enumerate.moe_model_types`) that no hand-written
registry entry covers:

1. analyse it on the meta device (:mod:`moetool.arch.derive.analyze`): templates, shapes as
   expressions over config fields, per-layer conditions, the MoE schedule;
2. probe structural switches (tied embeddings) and the defaults transformers computes from other
   fields (``head_dim``);
3. shrink the config to a tiny one that still builds (for the tests), build it for real, run it once,
   and find where it routes tokens (:mod:`moetool.arch.derive.routing`);
4. check the entry the way moetool will use it: the tensors :func:`moetool.arch.plan.planned_tensors`
   predicts from the entry must equal, name for name and shape for shape, the ones
   ``save_pretrained`` writes, for the tiny config and for the class's full-size defaults.

A model type that fails a step is listed in ``refused`` with the reason. Nothing is guessed: an entry
is written only when the checks pass.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moetool.arch.derive.analyze import (
    EXPERT_FIELDS,
    LAYER_FIELDS,
    Analysis,
    analyze,
    apply_change,
    get_path,
    split_offset,
)
from moetool.arch.derive.categories import category
from moetool.arch.derive.probe import (
    config_class,
    make_config,
    model_class,
    model_class_name,
    numeric_fields,
    probe,
    quiet,
)

#: Layers of the base probe and of the tiny test models.
BASE_LAYERS = 6
#: Layers of the second analysis, for layouts six layers do not show (see :func:`derive`).
RETRY_LAYERS = 24
#: The tiny config stops shrinking below this many stored parameters.
TINY_PARAMS = 400_000
#: Config keys that give top-k, in order of preference.
TOP_K_FIELDS = (
    "num_experts_per_tok",
    "moe_topk",
    "moe_k",
    "top_k_experts",
    "num_experts_per_token",
    "experts_per_token",
    "moe_top_k",
    "top_k",
    "router_topk",
    "n_activated_experts",
)
#: Config keys giving the number of multi-token-prediction modules (stored, but not built by transformers).
MTP_FIELDS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers", "mtp_num_layers")
#: Hidden-size and vocabulary keys, renamed to the registry's symbols H and V.
HIDDEN_FIELDS = ("hidden_size", "d_model", "n_embd", "dim")

_QWEN4_INDEXER = {
    "indexer_n_heads": 8,
    "indexer_kv_heads": 1,
    # At least the rotary width (head_dim 256), which transformers' config check requires.
    "indexer_head_dim": 256,
    "indexer_budget": 2048,
    "indexer_compress_ratio": 4,
}

#: Hand-written data: config arguments a model type needs for a useful base probe (MoE switched on).
OVERRIDES: dict[str, dict[str, Any]] = {
    "doge": {"is_moe": True, "num_experts": 64, "num_experts_per_tok": 4},
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2},
    # LFM2-MoE needs its per-layer mixer list (short convolutions and attention), as its configs give it.
    "lfm2_moe": {
        "num_hidden_layers": 6,
        "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention"],
    },
    # Gemma-4's MoE block is a config switch (its dense checkpoints leave it off).
    "gemma4": {
        "text_config": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 256}
    },
    "gemma4_text": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 256},
    # Qwen4-Exp's sparse-attention indexer has no defaults; any consistent values build it.
    "qwen4_exp_text": _QWEN4_INDEXER,
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    # GLM-4.5V's class defaults leave head_dim to hidden_size // heads (42), which its rotary sections
    # (summing to half of 128) do not fit: its checkpoints set 128.
    "glm4v_moe": {"text_config": {"head_dim": 128}},
    # Granite-4 hybrid's class default is all Mamba; its checkpoints mix in attention layers.
    "granitemoehybrid": {
        "num_hidden_layers": 6,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"] * 2,
    },
    # Qwen3-Omni's thinker: hidden_size // heads is 73, an odd rotary width; its checkpoints set 128.
    # Its rotary index reads vision_start_token_id, which the thinker's config class lacks (the
    # wrapper's checkpoints set it; 151652 as Qwen3-Omni's), whenever an attention mask is given.
    "qwen3_omni_moe_thinker": {"text_config": {"head_dim": 128}, "vision_start_token_id": 151652},
    # Step-3.7's model builds a sliding-window mask on every forward pass, which a window of None (the
    # class default) fails; any window runs it (it sizes no tensor).
    "step3p7": {"text_config": {"sliding_window": 512}},
    # DeepSeek-OCR-2's language model needs its per-layer dense/sparse list.
    "deepseek_ocr2": {
        "text_config": {"num_hidden_layers": 6, "mlp_layer_types": ["dense"] + ["sparse"] * 5, "num_experts_per_tok": 6}
    },
}


def _text_prefix(default: Mapping[str, Any]) -> str:
    text = default.get("text_config")
    if isinstance(text, Mapping) and any(k in text for k in (*EXPERT_FIELDS, "enable_moe_block")):
        return "text_config."
    return ""


def _layer_override(default: Mapping[str, Any], prefix: str, layers: int = BASE_LAYERS) -> dict[str, Any]:
    node = get_path(default, prefix.rstrip(".")) if prefix else default
    return {prefix + key: layers for key in LAYER_FIELDS if isinstance(node.get(key), int) and key != "depth"}


def _default_layers(model_type: str) -> int:
    """The layer count of the class's default config (of its language model, for wrappers)."""
    with quiet():
        default = config_class(model_type)(**_nested_overrides(model_type)).to_dict()
    prefix = _text_prefix(default)
    node = get_path(default, prefix.rstrip(".")) if prefix else default
    return max((v for k, v in node.items() if k in LAYER_FIELDS and isinstance(v, int)), default=0)


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Refused(Exception):
    """A model type the generator cannot describe; the message is the reason."""


# ----------------------------------------------------------------------------- symbols


class Symbols:
    """Config field (dotted, as probed) -> registry symbol, and the symbol -> config keys table."""

    def __init__(self, analysis: Analysis, text_prefix: str, top_k_field: str | None) -> None:
        self.text_prefix = text_prefix
        self.names: dict[str, str] = {}
        fixed = {stack.field: stack.symbol for stack in analysis.stacks}
        if analysis.expert_field:
            fixed[analysis.expert_field] = "E"
        if top_k_field:
            fixed[top_k_field] = "K"
        for key in HIDDEN_FIELDS:
            if text_prefix + key in analysis.prober.base.fields:
                fixed.setdefault(text_prefix + key, "H")
                break
        if text_prefix + "vocab_size" in analysis.prober.base.fields:
            fixed.setdefault(text_prefix + "vocab_size", "V")
        if text_prefix + "n_shared_experts" in analysis.prober.base.fields:
            fixed.setdefault(text_prefix + "n_shared_experts", "NS")
        self.fixed = fixed

    def __call__(self, field: str) -> str:
        if field in self.fixed:
            return self.fixed[field]
        if self.text_prefix and field.startswith(self.text_prefix):
            return field[len(self.text_prefix) :]
        return "^" + field if self.text_prefix else field

    def key(self, field: str) -> str:
        """The config key (relative to the text config; ``^`` for the wrapper's root)."""
        if self.text_prefix:
            return field[len(self.text_prefix) :] if field.startswith(self.text_prefix) else "^" + field
        return field


def _aliases(model_type: str, text_prefix: str) -> dict[str, list[str]]:
    """canonical key -> alias keys, from the config class's attribute_map."""
    cls = config_class(model_type)
    if text_prefix:
        sub = getattr(cls, "sub_configs", {}).get("text_config")
        cls = sub if sub is not None else cls
    out: dict[str, list[str]] = {}
    for alias, canonical in (getattr(cls, "attribute_map", {}) or {}).items():
        out.setdefault(canonical, []).append(alias)
    return out


# ----------------------------------------------------------------------------- the entry


def _entry(
    analysis: Analysis,
    symbols: Symbols,
    model_type: str,
    text_prefix: str,
    tied_lm_head: set[str],
    routing: dict[str, Any],
) -> dict[str, Any]:
    used: set[str] = set()
    layers, globals_ = [], []
    text_root = _text_root(analysis, text_prefix)
    for variant in analysis.variants:
        assert variant.exprs is not None
        shape = [e.render(symbols) for e in variant.exprs]
        for e in variant.exprs:
            used |= e.fields
        cat = category(variant.name, shape, per_layer=variant.per_layer, text_prefix=text_root)
        name = variant.name
        stack_symbols = {stack.symbol for stack in analysis.stacks}
        for site_symbol, field in analysis.placeholder_fields.items():
            if site_symbol not in stack_symbols and site_symbol != "E":
                base_field, offset = split_offset(field)
                rendered = symbols(base_field) + (f"{offset:+d}" if offset else "")
                name = name.replace("{" + site_symbol + "}", "{" + rendered + "}")
                used.add(base_field)
        if not variant.per_layer and "{L}" in name:
            used.add(analysis.layer_field)
        if "{E}" in name:
            used.add(analysis.expert_field or "")
        when = variant.when if variant.per_layer else ("!tied" if name in tied_lm_head else "all")
        if variant.tower is not None and variant.when != "all":
            tower, shift = split_offset(variant.tower)
            rendered = symbols(tower) + (f"{shift:+d}" if shift else "")
            when = f"at:{rendered}:{variant.when}"  # blocks of a tower, by its own config
        item = [name, shape, cat, when]
        if variant.per_layer and len(analysis.stacks) > 1:
            item.append(variant.stack)
        (layers if variant.per_layer else globals_).append(item)
    used.discard("")
    used |= set(symbols.fixed)
    aliases = _aliases(model_type, text_prefix)
    fields: dict[str, list[str]] = {}
    for field in sorted(used):
        key = symbols.key(field)
        leaf = key.rsplit(".", 1)[-1]
        # attribute_map aliases: config.json files written by other versions use the other name.
        fields[symbols(field)] = [key] + ([] if "." in key else aliases.get(leaf, []))
    return {
        "model_type": model_type,
        "model_class": model_class_name(model_type),
        "architectures": [model_class_name(model_type)],
        "text_config_key": text_prefix.rstrip(".") or None,
        "layer_prefix": analysis.stack_prefix,
        "fields": fields,
        "schedule": analysis.moe_condition or "all",
        "globals": globals_,
        "layers": layers,
        "routing": routing,
        "expert_layout": "per_expert" if any("{E}" in item[0] for item in layers) else "fused",
    }


def _text_root(analysis: Analysis, text_prefix: str) -> str:
    """For wrappers: the prefix of the language model's own global tensors (``model.language_model.``)."""
    if not text_prefix:
        return ""
    prefix = analysis.stack_prefix.split("{L}")[0]
    parts = prefix.rstrip(".").split(".")
    return ".".join(parts[:-1]) + "." if len(parts) > 1 else ""


def _defaults(entry: dict[str, Any], model_type: str, text_prefix: str, materialized: Mapping[str, str]) -> None:
    """Class defaults for every symbol (what transformers uses when config.json omits the key), and
    expressions for the ones the config class computes from other fields (``materialized``: keys the
    base probe set although the class leaves them unset, with the expression the model falls back to)."""
    from moetool.arch.derive import fit

    cls = config_class(model_type)
    with quiet():
        default = cls().to_dict()
    text_default = get_path(default, text_prefix.rstrip(".")) if text_prefix else default
    defaults: dict[str, Any] = {}
    exprs: dict[str, str] = {}
    base_fields = numeric_fields(default)
    for symbol, keys in list(entry["fields"].items()):
        if not keys:
            continue
        key = keys[0]
        if key.rsplit(".", 1)[-1].startswith("each:"):
            fallback = _list_default(cls, default, (key[1:] if key.startswith("^") else text_prefix + key))
            if fallback is not None:
                exprs[symbol] = _symbol_for(entry, fallback, text_prefix)
            continue
        node, dotted = (default, key[1:]) if key.startswith("^") else (text_default, key)
        value = get_path(node, dotted) if "len:" not in dotted else None
        full = (dotted if key.startswith("^") else text_prefix + dotted) if "len:" not in dotted else None
        if full is None:
            continue
        # Does the class compute this default from other fields? Leave the key out of the default
        # config (as a config.json may) and change each other field of the same (sub-)config alone.
        points = []
        support = []
        scope = full.rsplit(".", 1)[0] + "." if "." in full else ""
        without = _without(default, full)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                with quiet():
                    value = get_path(cls.from_dict(without).to_dict(), full)
            except Exception:
                value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for other, other_value in base_fields.items():
                in_scope = other.startswith(scope) and "." not in other[len(scope) :]
                if other == full or not in_scope or "len:" in other or not isinstance(other_value, int):
                    continue
                if other_value < 2:
                    continue
                try:
                    with quiet():
                        changed = cls.from_dict(apply_change(without, other, other_value * 2)).to_dict()
                except Exception:
                    continue
                new = get_path(changed, full)
                if new != value and isinstance(new, (int, float)):
                    support.append(other)
                    points.append((numeric_fields(changed), new))
        if support:
            expr = fit.fit_rounded(support, [(base_fields, value), *points], base_fields)
            if expr is None:
                expr = _linear_default(support, value, points, base_fields)
            if expr is None:
                # No default then: a config.json without this key is refused by inspect (it says which
                # key it lacks) rather than counted with a guess.
                entry.setdefault("required", []).append(key)
                continue
            for field in sorted(support, key=len, reverse=True):
                expr = re.sub(rf"(?<![\w.^]){re.escape(field)}(?![\w.])", _symbol_for(entry, field, text_prefix), expr)
            exprs[symbol] = expr
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[symbol] = value
        elif dotted in materialized:
            expr = materialized[dotted]
            for field in sorted(set(expr.replace("//", " ").split()), key=len, reverse=True):
                expr = expr.replace(field, _symbol_for(entry, field, text_prefix))
            exprs[symbol] = expr
    entry["defaults"] = defaults
    entry["default_exprs"] = exprs


def _list_default(cls: Any, default: Mapping[str, Any], full: str) -> str | None:
    """The field a config class fills a per-layer value list with when config.json leaves it out
    (``num_attention_heads_per_layer`` from ``num_attention_heads``), or None."""
    parent, _, leaf = full.rpartition(".")
    list_key = (parent + "." if parent else "") + leaf[len("each:") :]
    without = _without(default, list_key)

    def uniform(tree: Mapping[str, Any]) -> Any:
        seq = get_path(tree, list_key)
        return seq[0] if isinstance(seq, list) and seq and len(set(seq)) == 1 else None

    try:
        with quiet():
            value = uniform(cls.from_dict(without).to_dict())
    except Exception:
        return None
    node = get_path(without, parent) if parent else without
    if value is None or not isinstance(node, Mapping):
        return None
    for other, other_value in node.items():
        if other_value != value or isinstance(other_value, bool) or not isinstance(other_value, int):
            continue
        field = (parent + "." if parent else "") + other
        try:
            with quiet():
                changed = uniform(cls.from_dict(apply_change(without, field, value * 2)).to_dict())
        except Exception:
            continue
        if changed == value * 2:
            return field
    return None


def _without(tree: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of a nested dict without one (dotted) key."""
    head, _, rest = dotted.partition(".")
    out = dict(tree)
    if rest and isinstance(out.get(head), Mapping):
        out[head] = _without(out[head], rest)
    elif not rest:
        out.pop(head, None)
    return out


def _linear_default(
    support: list[str], value: float, points: list[tuple[dict[str, float], Any]], base: Mapping[str, float]
) -> str | None:
    """``a*f + b*g + c`` through every point (``qk_head_dim = qk_nope_head_dim + qk_rope_head_dim``)."""
    from fractions import Fraction

    coefficients = {}
    for name in support:
        point = next(((f, v) for f, v in points if f[name] != base[name]), None)
        if point is None:
            return None
        coefficients[name] = Fraction(point[1] - value) / Fraction(point[0][name] - base[name])
    constant = Fraction(value) - sum(c * Fraction(base[n]) for n, c in coefficients.items())
    for fields, got in points:
        if constant + sum(c * Fraction(fields[n]) for n, c in coefficients.items()) != got:
            return None
    if any(c.denominator != 1 for c in coefficients.values()) or constant.denominator != 1:
        return None
    parts = [f"{c}*{n}" if c != 1 else n for n, c in coefficients.items() if c]
    if constant:
        parts.append(str(constant))
    return "+".join(parts).replace("+-", "-")


def _symbol_for(entry: dict[str, Any], field: str, text_prefix: str) -> str:
    key = (
        field[len(text_prefix) :]
        if text_prefix and field.startswith(text_prefix)
        else ("^" + field if text_prefix else field)
    )
    for symbol, keys in entry["fields"].items():
        if keys[0] == key:
            return symbol
    entry["fields"][key] = [key]
    return key


# ----------------------------------------------------------------------------- derived per-layer lists


def _list_fallbacks(entry: dict[str, Any], analysis: Analysis, text_prefix: str) -> None:
    """Give every condition on a per-layer list the rule the config class fills that list with when
    config.json leaves it out (``layer_types`` from ``full_attention_interval``): ``in:F:v??RULE``."""
    from moetool.arch.derive.conditions import find_condition

    model_type = analysis.prober.model_type
    base = analysis.prober.base_kwargs
    text = get_path(base, text_prefix.rstrip(".")) if text_prefix else base
    layer_key = analysis.layer_field[len(text_prefix) :]
    cache: dict[str, str | None] = {}

    def rule_for(atom: str) -> str | None:
        if atom in cache:
            return cache[atom]
        kind, _, rest = atom.partition(":")
        key, _, values = rest.partition(":")
        wanted = set(values.split("|"))
        without = {k: v for k, v in text.items() if k != key}
        changes: list[tuple[str, Any]] = [("", None)]
        for name, value in text.items():
            if isinstance(value, int) and not isinstance(value, bool) and value > 0 and name != key:
                changes.append((name, value * 2))
        targets, configs, counts = {}, {}, {}
        for name, value in changes:
            trial = dict(without)
            if name:
                trial[name] = value
            kwargs = _merge(base, {text_prefix.rstrip("."): trial}) if text_prefix else trial
            if text_prefix:
                kwargs[text_prefix.rstrip(".")] = trial
            try:
                with quiet():
                    built = make_config(model_type, kwargs).to_dict()
            except Exception:
                continue
            node = get_path(built, text_prefix.rstrip(".")) if text_prefix else built
            seq = node.get(key)
            n = node.get(layer_key)
            if not isinstance(seq, (list, str)) or not isinstance(n, int):
                if not name:
                    cache[atom] = None
                    return None
                continue
            if kind == "in":
                chosen = {i for i in range(min(n, len(seq))) if str(seq[i]) in wanted}
            else:
                chosen = {i for i in seq if isinstance(i, int)}
            probe_key = frozenset([name]) if name else frozenset()
            targets[probe_key] = chosen
            configs[probe_key] = {k: v for k, v in node.items() if k != key}
            counts[probe_key] = n
        rule = find_condition(targets, configs, counts) if frozenset() in targets else None
        cache[atom] = rule if rule and "&" not in rule else None
        return cache[atom]

    def rewrite(condition: str) -> str:
        parts = []
        for part in condition.split("&"):
            negate = part.startswith("!")
            atom = part.lstrip("!")
            if atom.startswith(("in:", "idx:")) and "??" not in atom:
                rule = rule_for(atom)
                if rule:
                    atom = f"{atom}??{rule}"
            parts.append(("!" if negate else "") + atom)
        return "&".join(parts)

    entry["schedule"] = rewrite(entry["schedule"])
    for item in entry["layers"]:
        item[3] = rewrite(item[3])
    for stack in entry.get("stacks", []):
        stack[2] = rewrite(stack[2])


def _drop_fallbacks(entry: dict[str, Any]) -> None:
    def strip(condition: str) -> str:
        return "&".join(part.split("??")[0] for part in condition.split("&"))

    entry["schedule"] = strip(entry["schedule"])
    for item in entry["layers"]:
        item[3] = strip(item[3])
    for stack in entry.get("stacks", []):
        stack[2] = strip(stack[2])


# ----------------------------------------------------------------------------- tiny config


def _saved_numel(model_type: str, kwargs: Mapping[str, Any]) -> int | None:
    try:
        _, saved = probe(model_type, kwargs)
    except Exception:
        return None
    return sum(math.prod(s.shape) for s in saved.values())


_LAST_RUN_ERROR: list[str] = [""]


def _runs(model_type: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether the model of this config builds for real and runs a forward pass."""
    import torch

    try:
        with quiet():
            config = make_config(model_type, kwargs)
            model = model_class(model_type)._from_config(config).eval()
            vocab = getattr(config.get_text_config(), "vocab_size", 128) or 128
            with torch.no_grad():
                model(input_ids=torch.randint(0, min(vocab, 128), (1, 5)), **_decoder_inputs(model))
    except Exception as exc:
        _LAST_RUN_ERROR[0] = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
        )
        return False
    return True


def _decoder_inputs(model: Any) -> dict[str, Any]:
    import torch

    if getattr(model.config, "is_encoder_decoder", False):
        return {"decoder_input_ids": torch.zeros(1, 3, dtype=torch.long)}
    return {"use_cache": False}


def _predicted_numel(entry: Mapping[str, Any], kwargs: Mapping[str, Any]) -> int | None:
    """Stored parameters of a config as the entry predicts them (no model built)."""
    from moetool.arch.derived import family_from_entry
    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import planned_tensors

    try:
        spec = family_from_entry(entry)
        return sum(math.prod(t.shape) for t in planned_tensors(spec, resolve_dims(spec, kwargs)))
    except Exception:
        return None


def _divisibility(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(width, count)`` pairs of one (sub-)config where a head or group count divides another field
    in the base config (``hidden_size % num_attention_heads``, ``num_attention_heads %
    num_key_value_heads``): relations every real config keeps and some models need (a vision tower
    whose attention width is ``heads * (hidden_size // heads)``, grouped-query attention)."""
    out = []
    for count, divisor in fields.items():
        leaf = count.rsplit(".", 1)[-1]
        if not isinstance(divisor, int) or divisor < 2 or not ("heads" in leaf or "groups" in leaf):
            continue
        scope = count.rsplit(".", 1)[0] if "." in count else ""
        for width, value in fields.items():
            same_scope = (width.rsplit(".", 1)[0] if "." in width else "") == scope
            wide = width.rsplit(".", 1)[-1]
            is_width = wide in HIDDEN_FIELDS or "hidden_size" in wide or "embed_dim" in wide or "heads" in wide
            if width == count or not same_scope or not is_width or not isinstance(value, int):
                continue
            if value >= divisor and value % divisor == 0:
                out.append((width, count))
    return out


def _cuts_stage_list(kwargs: Mapping[str, Any], name: str, value: int) -> bool:
    """Whether shrinking the layer count ``name`` would cut a list of per-stage values that differ
    (MuSE-Spark's audio ``hidden_sizes`` [256, 512, 1024, 2048]): the tower's widths would no longer
    be the ones the probes saw, so the tiny retry keeps such counts."""
    if name.rsplit(".", 1)[-1] not in LAYER_FIELDS:
        return False
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    node = get_path(kwargs, parent) if parent else kwargs
    if not isinstance(node, Mapping):
        return False
    return any(
        isinstance(seq, list) and len(seq) == value and len({json.dumps(v) for v in seq}) > 1
        for key, seq in node.items()
        if key != name.rsplit(".", 1)[-1]
    )


def _tiny_kwargs(
    analysis: Analysis,
    text_prefix: str,
    top_k: int,
    entry: Mapping[str, Any],
    *,
    keep_divisible: bool = False,
    materialized: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Shrink the base config until its checkpoint is tiny: halve, one at a time, the field whose
    halving removes the most parameters, keeping every change under which the model still builds
    (and, once it is small enough to build for real, still runs a forward pass).

    ``keep_divisible`` also keeps every divisibility of a width by a head or group count that the
    base config has (:func:`_divisibility`): the retry for models whose tiny config otherwise does
    not run or is not predicted (their shapes assume those relations, as real configs keep them).
    The retry also leaves out the keys the generator set for probing only (``materialized``:
    ``head_dim``) where no shape reads them, so the model computes them from the shrunk widths as
    it does for a config.json without them (Ergo's rotary width).
    """
    prober = analysis.prober
    pairs = _divisibility(numeric_fields(prober.base_kwargs)) if keep_divisible else []

    base_values = numeric_fields(prober.base_kwargs)
    # A head keeps at least min(8, its base width) values (rotary halves need two or more).
    least = {(w, c): 1 if "heads" in w else min(8, base_values[w] // base_values[c]) for w, c in pairs}

    def holds(values: Mapping[str, Any], w: str, c: str) -> bool:
        both = isinstance(values.get(w), int) and isinstance(values.get(c), int) and values[c] > 0
        return both and values[w] % values[c] == 0 and values[w] // values[c] >= least[(w, c)]

    def divisible(trial: Mapping[str, Any]) -> bool:
        values = numeric_fields(trial)
        return all(holds(values, w, c) for w, c in pairs)

    def with_counts(trial: dict[str, Any]) -> dict[str, Any] | None:
        """Halve the head and group counts a width no longer divides (and the counts those divide):
        Ergo's 64 heads over a shrinking hidden size, keeping head widths whole."""
        halved: set[str] = set()
        for _ in range(8):
            values = numeric_fields(trial)
            broken = [c for w, c in pairs if not holds(values, w, c)]
            if not broken:
                return trial
            for count in broken:
                if count in halved or values[count] % 2:
                    return None
                halved.add(count)
                trial = apply_change(trial, count, values[count] // 2)
        return None

    model_type = prober.model_type
    kwargs = dict(prober.base_kwargs)
    text = get_path(kwargs, text_prefix.rstrip(".")) if text_prefix else kwargs
    # Token ids above a small vocabulary would break embeddings with a padding index.
    small_ids = {}
    for key, value in text.items():
        if key.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= 64:
            small_ids[text_prefix + key] = 1 + len(small_ids)
    for key, value in small_ids.items():
        kwargs = apply_change(kwargs, key, value)
    shape_fields: set[str] = set()
    for variant in analysis.variants:
        for expr in variant.exprs or []:
            shape_fields |= expr.fields
    shape_fields |= set(analysis.placeholder_fields.values())
    shape_fields -= {stack.field for stack in analysis.stacks}
    if keep_divisible:
        for key in materialized or {}:
            if text_prefix + key not in shape_fields:
                node = get_path(kwargs, text_prefix.rstrip(".")) if text_prefix else kwargs
                if isinstance(node, dict) and key in node:
                    node = {k: v for k, v in node.items() if k != key}
                    kwargs = {**kwargs, text_prefix.rstrip("."): node} if text_prefix else node
    floors = {text_prefix + "vocab_size": 128, **{text_prefix + h: 32 for h in HIDDEN_FIELDS}}
    if analysis.expert_field:
        floors[analysis.expert_field] = max(4, 2 * top_k)
    frozen: set[str] = set()
    current = _saved_numel(model_type, kwargs)
    if current is None:
        raise Refused("the base config stops building when its token ids are made small")

    check_runs = False

    def acceptable(trial: Mapping[str, Any]) -> bool:
        if _saved_numel(model_type, trial) is None:
            return False
        return not check_runs or _runs(model_type, trial)

    def estimate(trial: Mapping[str, Any]) -> int | None:
        return _predicted_numel(entry, trial)

    # Few experts first (routing tests want several tokens per expert), then the greedy halving.
    if analysis.expert_field:
        value = numeric_fields(kwargs).get(analysis.expert_field)
        while isinstance(value, int) and value % 2 == 0 and value // 2 >= floors[analysis.expert_field]:
            trial = apply_change(kwargs, analysis.expert_field, value // 2)
            if not divisible(trial):
                break
            numel = estimate(trial)
            if numel is None or not acceptable(trial):
                break
            kwargs, current, value = trial, numel, value // 2

    def shrink(kwargs: dict[str, Any], current: int, history: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        for _ in range(80):
            if current <= TINY_PARAMS:
                break
            options = []
            fields_now = numeric_fields(kwargs)
            for name in sorted(shape_fields - frozen):
                value = fields_now.get(name)
                leaf = name.rsplit(".", 1)[-1]
                is_count = leaf.startswith(("num_", "n_")) or "heads" in leaf or "group" in leaf
                if isinstance(value, int) and value % 2 and keep_divisible and not is_count and value > 8:
                    # An odd width (DeepSeek-OCR-2's moe_intermediate_size 1407) never halves, and
                    # grouped matrix products refuse its unaligned strides: the retry rounds it down
                    # to a power of two.
                    target = 1 << (value.bit_length() - 1)
                else:
                    target = value // 2 if isinstance(value, int) and not value % 2 else 0
                if not isinstance(value, int) or not target or target < floors.get(name, 2):
                    continue
                # Widths stay multiples of 4 values (16 bytes: grouped matrix products need aligned
                # strides); counts (heads, groups) may go lower.
                if target % 4 and not is_count:
                    continue
                if keep_divisible and _cuts_stage_list(kwargs, name, value):
                    continue
                trial = apply_change(kwargs, name, target)
                if name in prober.coupled:  # a field the class requires equal to this one
                    trial = apply_change(trial, prober.coupled[name], target)
                if not divisible(trial):
                    adjusted = with_counts(trial)
                    if adjusted is None:
                        continue  # may hold again once the count is halved too
                    trial = adjusted
                numel = estimate(trial)
                if numel is None:
                    frozen.add(name)
                    continue
                if numel < current:
                    options.append((numel, name, trial))
            chosen = None
            for numel, name, trial in sorted(options, key=lambda o: o[0]):
                if acceptable(trial):
                    chosen = (numel, name, trial)
                    break
                frozen.add(name)
            if chosen is None:
                break
            current, name, kwargs = chosen
            history.append((name, kwargs))
        return kwargs

    # Shrink on meta-device builds alone (fast); if the result does not run, step back to the last
    # config that does, freeze the field changed next, and go on checking every step by running it.
    history: list[tuple[str, dict[str, Any]]] = [("", kwargs)]
    kwargs = shrink(kwargs, current, history)
    if not _runs(model_type, kwargs):
        for index in range(len(history) - 2, -1, -1):
            size = estimate(history[index][1]) or 0
            if size > 100 * TINY_PARAMS:
                break  # too big to build for real: give up rather than allocate gigabytes
            if _runs(model_type, history[index][1]):
                frozen.add(history[index + 1][0])
                kwargs = history[index][1]
                break
        else:
            # The culprit was halved while the model was still big (a width another setting must
            # match, such as a rotary section list): give each shrunk field back its base value alone.
            base_fields = numeric_fields(prober.base_kwargs)
            for name in dict.fromkeys(name for name, _ in history[1:]):
                trial = apply_change(kwargs, name, base_fields[name])
                if (estimate(trial) or 0) <= 100 * TINY_PARAMS and _runs(model_type, trial):
                    frozen.add(name)
                    kwargs = trial
                    break
            else:
                raise Refused(f"no small config of it runs a forward pass ({_LAST_RUN_ERROR[0]})")
        check_runs = True
        kwargs = shrink(kwargs, estimate(kwargs) or current, [])
    if not _runs(model_type, kwargs):
        raise Refused(f"no small config of it runs a forward pass ({_LAST_RUN_ERROR[0]})")
    return kwargs


def _diff(full: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in full.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            inner = _diff(value, base[key])
            if inner:
                out[key] = inner
        elif base.get(key, object()) != value:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- checks


def check_prediction(entry: dict[str, Any], model_type: str, config_dict: Mapping[str, Any], what: str) -> None:
    """The tensors the entry predicts for ``config_dict`` must be exactly those transformers writes."""
    from moetool.arch.derived import family_from_entry
    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import planned_tensors

    spec = family_from_entry(entry)
    _, saved = probe(model_type, config_dict)
    try:
        dims = resolve_dims(spec, config_dict)
        predicted = {t.name: t.shape for t in planned_tensors(spec, dims)}
    except Exception as exc:
        raise Refused(f"{what}: the entry does not evaluate ({type(exc).__name__}: {exc})") from None
    actual = {name: s.shape for name, s in saved.items()}
    missing = sorted(set(actual) - set(predicted))
    extra = sorted(set(predicted) - set(actual))
    wrong = sorted(n for n in set(actual) & set(predicted) if actual[n] != predicted[n])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} not predicted (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} predicted but not stored (e.g. {extra[0]})")
        if wrong:
            parts.append(
                f"{len(wrong)} with the wrong shape (e.g. {wrong[0]} {predicted[wrong[0]]} vs {actual[wrong[0]]})"
            )
        raise Refused(f"{what}: the derived layout disagrees with transformers: {'; '.join(parts)}")


#: Families whose experts modules receive capacity-limited masks instead of top-k indices: the
#: registry's router output protocol (moetool.arch.spec.RouterOutput) for them.
MASK_ROUTERS = {"switch_transformers": "switch_mask", "nllb-moe": "nllb_mask"}
#: Families whose top-k is fixed by their router class rather than a config field.
FIXED_TOP_K = {"switch_transformers": 1, "nllb-moe": 2}


def _match_stacks(analysis: Analysis, info: Any) -> list[Any]:
    """The discovered in-memory stacks, in the order of the analysis's on-disk stacks."""
    out = []
    for stack in analysis.stacks:
        disk = stack.prefix.split("{")[0].rstrip(".")
        match = [r for r in info.stacks if r.layers_module == disk or disk.endswith(r.layers_module)]
        if len(match) != 1 and len(info.stacks) == 1 and len(analysis.stacks) == 1:
            match = info.stacks
        if len(match) != 1:
            raise Refused(f"cannot match the layer stack {stack.prefix} with the model's modules")
        out.append(match[0])
    return out


def _tiny_run(model_type: str, kwargs: Mapping[str, Any], num_experts: int, protocol: str | None = None) -> Any:
    """Build the tiny model for real and find its routing."""
    import torch

    from moetool.arch.derive.routing import discover

    with quiet():
        config = make_config(model_type, kwargs)
        torch.manual_seed(0)
        model = model_class(model_type)._from_config(config).eval()
        vocab = getattr(config.get_text_config(), "vocab_size", 128) or 128
        input_ids = torch.randint(0, min(vocab, 128), (2, 7))
        try:
            extra = {"decoder_input_ids": input_ids} if config.is_encoder_decoder else {"use_cache": False}
            info = discover(model, input_ids, num_experts, protocol=protocol, **extra)
        except Exception as exc:
            raise Refused(f"a forward pass of the tiny model fails: {type(exc).__name__}: {str(exc)[:160]}") from None
    return info


# ----------------------------------------------------------------------------- one model type


def derive(model_type: str, log: Any = None) -> dict[str, Any]:
    """The registry entry of one model type.

    The base probe has :data:`BASE_LAYERS` layers. A per-layer layout that shows only in deeper
    stacks (Kolibri-1.1 shares key-value projections between indexed-attention layers every fifth
    layer) makes the check against the class's full-size defaults fail: the analysis is then
    repeated once with :data:`RETRY_LAYERS` layers (or the default's count, if fewer).

    Raises:
        Refused: the model type cannot be described; the message says why.
    """
    log = log or (lambda *_: None)
    try:
        return _derive(model_type, log, BASE_LAYERS)
    except Refused as exc:
        if not str(exc).startswith("the class's default config"):
            raise
        layers = min(_default_layers(model_type), RETRY_LAYERS)
        if layers <= BASE_LAYERS:
            raise
        log(f"  retrying with {layers} layers: {exc}")
        try:
            return _derive(model_type, log, layers)
        except Refused as again:
            raise Refused(f"{exc} (and with {layers} layers: {again})") from None


def _derive(model_type: str, log: Any, layers: int) -> dict[str, Any]:
    if model_class_name(model_type) is None:
        raise Refused("not a checkpoint type: transformers has no generative model class for it (a sub-configuration)")
    cls = config_class(model_type)
    with quiet():
        default = cls(**_nested_overrides(model_type)).to_dict()
    text_prefix = _text_prefix(default)
    overrides = _merge(_nested_overrides(model_type), _nested(_layer_override(default, text_prefix, layers)))
    text_default = get_path(default, text_prefix.rstrip(".")) if text_prefix else default
    # transformers computes head_dim from hidden_size and the head count when config.json leaves it
    # out; probe with it set, so real configs that set it are counted right.
    materialized: dict[str, str] = {}
    if text_default.get("head_dim") is None and isinstance(text_default.get("hidden_size"), int):
        heads = text_default.get("num_attention_heads")
        if isinstance(heads, int) and heads:
            overrides = _merge(overrides, _nested({text_prefix + "head_dim": text_default["hidden_size"] // heads}))
            materialized["head_dim"] = f"{text_prefix}hidden_size//{text_prefix}num_attention_heads"
    # Tied embeddings are probed from the untied base (the lm_head template is then described).
    if text_default.get("tie_word_embeddings") or default.get("tie_word_embeddings"):
        overrides = _merge(overrides, {"tie_word_embeddings": False})
        if text_prefix:
            overrides = _merge(overrides, _nested({text_prefix + "tie_word_embeddings": False}))
    try:
        analysis = analyze(model_type, overrides, text_prefix=text_prefix)
    except RuntimeError as exc:
        raise Refused(str(exc).split(": ", 1)[-1]) from None
    log(f"  analysed: {len(analysis.variants)} templates, {len(analysis.prober._cache)} probes")
    if analysis.expert_field is None:
        raise Refused("found no routed-expert count in its config")
    if analysis.problems:
        raise Refused("; ".join(analysis.problems[:3]))
    if analysis.moe_condition is None:
        raise Refused("found no routed-expert tensors in its decoder layers")

    top_k_field = _top_k_field(analysis, text_prefix)
    symbols = Symbols(analysis, text_prefix, top_k_field)
    tied_lm_head, tie_source = _tied_lm_head(analysis, model_type, text_prefix, symbols)
    entry = _entry(analysis, symbols, model_type, text_prefix, tied_lm_head, {})
    _check_hidden_size_varies(entry, text_default)
    if top_k_field is None and model_type not in FIXED_TOP_K:
        raise Refused("found no top-k field in its config")
    if "E" not in entry["fields"]:
        entry["fields"]["E"] = [symbols.key(analysis.expert_field)]
    if top_k_field is not None:
        entry["fields"]["K"] = [symbols.key(top_k_field)] + [
            k for k in _aliases(model_type, text_prefix).get(symbols.key(top_k_field), [])
        ]
    else:
        entry["fields"]["K"] = []
    mtp = [symbols.key(text_prefix + k) for k in MTP_FIELDS if text_prefix + k in analysis.prober.base.fields]
    if mtp:
        entry["mtp_fields"] = mtp
        # Hub checkpoints store the MTP modules either as extra decoder layers (DeepSeek, GLM) or
        # under their own prefix (Qwen3-Next, Qwen3.5): both count as "mtp", outside total_params.
        entry["mtp_prefixes"] = ["mtp.", "model.mtp.", "model.language_model.mtp."]
    if len(analysis.stacks) > 1:
        entry["stacks"] = [
            [
                stack.prefix.replace("{" + stack.symbol + "}", "{L}"),
                stack.symbol,
                stack.moe_condition or "none",
                "",
                "",
                "",
            ]
            for stack in analysis.stacks
        ]
    _defaults(entry, model_type, text_prefix, materialized)
    if text_prefix and tie_source == "root":
        entry["tie_from_root"] = True
    with quiet():
        class_default = cls().to_dict()
    tie_node = class_default if tie_source == "root" or not text_prefix else get_path(class_default, text_prefix[:-1])
    entry["defaults"]["tie_word_embeddings"] = bool(tie_node.get("tie_word_embeddings", False))
    _list_fallbacks(entry, analysis, text_prefix)
    if top_k_field is None:
        entry["defaults"]["K"] = FIXED_TOP_K[model_type]

    top_k = int(analysis.prober.base.fields[top_k_field]) if top_k_field else FIXED_TOP_K[model_type]
    try:
        tiny = _tiny_kwargs(analysis, text_prefix, top_k, entry)
        check_prediction(entry, model_type, tiny, "tiny config")
    except Refused as exc:
        # Shrinking a width below what a head count divides breaks some models (or their layout
        # formulas, which hold for the configs real checkpoints have): retry keeping those relations.
        log(f"  retrying the tiny config, keeping widths divisible by head counts: {exc}")
        tiny = _tiny_kwargs(analysis, text_prefix, top_k, entry, keep_divisible=True, materialized=materialized)
        check_prediction(entry, model_type, tiny, "tiny config")
    tiny_fields = numeric_fields(tiny)
    num_experts = int(tiny_fields[analysis.expert_field])
    log(f"  tiny: {_saved_numel(model_type, tiny)} parameters, {num_experts} experts")
    with quiet():
        full_default = cls(**_nested_overrides(model_type)).to_dict()
    check_prediction(entry, model_type, full_default, "the class's default config")
    # Hub configs may leave out the per-layer lists the config class fills in: check the fallbacks.
    listed = {c.split(":")[1] for item in entry["layers"] for c in item[3].split("&") if "??" in c}
    listed |= {c.split(":")[1] for c in entry["schedule"].split("&") if "??" in c}
    if listed:
        node = get_path(full_default, text_prefix.rstrip(".")) if text_prefix else full_default
        stripped_text = {k: v for k, v in node.items() if k.lstrip("!") not in listed}
        stripped = {**full_default, text_prefix.rstrip("."): stripped_text} if text_prefix else stripped_text
        try:
            check_prediction(entry, model_type, stripped, "the class's default config without per-layer lists")
        except Refused as exc:
            # The fallback rules do not reproduce the class: require the lists in config.json instead.
            log(f"  dropping per-layer list fallbacks: {exc}")
            _drop_fallbacks(entry)

    protocol = MASK_ROUTERS.get(model_type)
    info = _tiny_run(model_type, tiny, num_experts, protocol)
    if info is None:
        raise Refused("no module receives top-k expert indices in a forward pass (routing moetool cannot observe)")
    if any(stack.router_module is None for stack in info.stacks):
        raise Refused("found no router module whose output holds the expert logits")
    if top_k_field is not None and info.top_k != int(tiny_fields[top_k_field]) and protocol is None:
        said = tiny_fields[top_k_field]
        raise Refused(f"the experts module receives top-{info.top_k} indices, config {top_k_field} says {said}")
    routing_stacks = _match_stacks(analysis, info)
    entry["routing"] = {
        "rule": _routing_rule(text_default),
        "output": info.protocol,
        "layers_module": routing_stacks[0].layers_module,
        "router_module": routing_stacks[0].router_module,
        "experts_module": routing_stacks[0].experts_module,
        "num_choices": "E" if info.num_choices == num_experts else f"E+{info.num_choices - num_experts}",
    }
    if len(analysis.stacks) > 1:
        for item, r in zip(entry["stacks"], routing_stacks, strict=True):
            item[3:] = [r.layers_module, r.router_module, r.experts_module]
    entry["tiny"] = _diff(tiny, cls().to_dict())
    entry["capabilities"] = _capabilities(entry)
    return entry


def _check_hidden_size_varies(entry: Mapping[str, Any], text_default: Mapping[str, Any]) -> None:
    """Refuse an entry whose tensor widths hold the hidden size as a fixed number: no probe could change
    ``hidden_size`` alone (transformers rejects the config, or derives other fields from it, e.g.
    Granite-4 hybrid's ``mamba_d_head``), so a real config with another width would be mis-counted."""
    hidden = next((text_default[k] for k in HIDDEN_FIELDS if isinstance(text_default.get(k), int)), None)
    if not hidden or hidden < 64:
        return
    fixed = sorted(
        {item[0] for item in [*entry["globals"], *entry["layers"]] for dim in item[1] if str(dim) == str(hidden)}
    )
    if fixed:
        raise Refused(
            f"no probe could change the hidden size alone, so {len(fixed)} tensor widths would stay fixed at "
            f"{hidden} (e.g. {fixed[0]})"
        )


def _nested_overrides(model_type: str) -> dict[str, Any]:
    return dict(OVERRIDES.get(model_type, {}))


def _top_k_field(analysis: Analysis, text_prefix: str) -> str | None:
    for key in TOP_K_FIELDS:
        value = analysis.prober.base.fields.get(text_prefix + key)
        if isinstance(value, int) and value >= 1:
            return text_prefix + key
    return None


def _tied_lm_head(analysis: Analysis, model_type: str, text_prefix: str, symbols: Symbols) -> tuple[set[str], str]:
    """The global templates that disappear when the embeddings are tied (the head, and the per-stack
    embedding copies of encoder-decoder models), and which flag ties them: the wrapper's own
    ``tie_word_embeddings`` (``"root"``) or its text config's (``"text"``)."""
    keys = ["tie_word_embeddings"] + ([text_prefix + "tie_word_embeddings"] if text_prefix else [])
    for key in keys:
        kwargs = apply_change(analysis.prober.base_kwargs, key, True)
        try:
            _, saved = probe(model_type, kwargs)
        except Exception:
            continue
        gone = set(analysis.prober.base.saved) - set(saved)
        if gone:
            return gone, "root" if key == "tie_word_embeddings" else "text"
    return set(), "text"


def _routing_rule(text_config: Mapping[str, Any]) -> str:
    scoring = str(text_config.get("scoring_func") or text_config.get("router_score_function") or "").lower()
    if "sigmoid" in scoring or text_config.get("n_group") or text_config.get("topk_method") == "noaux_tc":
        return "sigmoid_grouped_topk" if "softmax" not in scoring else "softmax_topk"
    return "softmax_topk"


#: Hand-written data: why the weight-rewriting commands refuse a model type, where it is more specific
#: than the general reason.
_SURGERY_REASONS = {
    "switch_transformers": "an encoder-decoder whose experts are two-matrix ReLU MLPs (wi/wo); moetool's expert "
    "rewriting reads gated gate/up/down experts of decoder-only models",
    "nllb-moe": "an encoder-decoder whose experts are two-matrix ReLU MLPs (fc1/fc2); moetool's expert "
    "rewriting reads gated gate/up/down experts of decoder-only models",
}


def _capabilities(entry: Mapping[str, Any]) -> dict[str, str | None]:
    reason = _SURGERY_REASONS.get(
        entry["model_type"],
        "derived from transformers; the command's weight surgery is only checked on hand-written families",
    )
    return {"merge": reason, "quantize": reason, "upcycle": reason, "distill": reason}


# ----------------------------------------------------------------------------- main


def generate(model_types: list[str] | None = None, *, out: Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Derive every MoE model type (or those given) and write the table."""
    import transformers

    from moetool.arch.derive.enumerate import moe_model_types
    from moetool.arch.families import FAMILIES

    hand_written = {mt for spec in FAMILIES for mt in spec.model_types}
    all_types = moe_model_types()
    targets = model_types or [mt for mt in all_types if mt not in hand_written]
    families, refused = [], {}
    for model_type in targets:
        start = time.time()
        log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else None
        try:
            entry = derive(model_type, log)
            families.append(entry)
            status = "ok"
        except Refused as exc:
            refused[model_type] = str(exc)
            status = f"refused: {exc}"
        except Exception as exc:  # a generator bug must not hide the other model types
            refused[model_type] = f"the generator failed: {type(exc).__name__}: {str(exc)[:200]}"
            status = refused[model_type]
            if verbose:
                traceback.print_exc()
        if verbose:
            print(f"{model_type}: {status} ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
    if model_types and out is not None and out.exists():
        # A partial run updates those model types in the existing table; the others stay.
        previous = json.loads(out.read_text(encoding="utf-8"))
        done = set(model_types)
        families += [e for e in previous["families"] if e["model_type"] not in done]
        refused.update({t: r for t, r in previous["refused"].items() if t not in done})
    table = {
        "transformers": transformers.__version__,
        "families": sorted(families, key=lambda e: e["model_type"]),
        "refused": dict(sorted(refused.items())),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    from moetool.arch.derived import TABLE

    parser = argparse.ArgumentParser(prog="python -m moetool.arch.derive", description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="only these model types (default: every MoE model type)")
    parser.add_argument("--out", type=Path, default=TABLE, help=f"where to write the table (default: {TABLE})")
    parser.add_argument("--dry-run", action="store_true", help="derive and report, write nothing")
    args = parser.parse_args(argv)
    table = generate(args.model_types or None, out=None if args.dry_run else args.out)
    print(f"{len(table['families'])} families derived, {len(table['refused'])} refused", file=sys.stderr)
    return 0
