"""config.json alone: field types with their JSON paths, plausible sizes, top-k, routing groups."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from moetool.arch.dims import ALIASES, COMMON_FIELDS, Dims, lookup, resolve_dims, text_config
from moetool.arch.registry import family_for_config
from moetool.arch.spec import FamilySpec
from moetool.errors import ConfigError, MoetoolError, UnsupportedArchitectureError
from moetool.validate.findings import FATAL, HINT_CONFIG, Finding, fatal_first, is_int, show, type_name

# Beyond these a config is not a model any machine holds, and looping over its layers or experts
# would hang: refuse instead. (DeepSeek-V3: 61 layers x 256 experts; Kimi-K2: 384 experts.)
MAX_LAYERS = 10_000
MAX_EXPERTS = 65_536
MAX_LAYER_EXPERTS = 2**20
MAX_MTP = 64


# Sizes that cannot be 0 (the others, such as a shared expert's width, may be, meaning "none").
_POSITIVE = {
    "L": "layer",
    "H": "hidden unit",
    "V": "token",
    "NH": "attention head",
    "NKV": "key-value head",
    "HD": "unit per head",
    "E": "expert",
}


# Fields every transformers causal-LM config may carry, whatever the family (not family knowledge:
# transformers itself reads them, and a wrong type crashes the model's forward pass, not its load).
_NUMBER_FIELDS = (
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "partial_rotary_factor",
)

_INT_FIELDS = (
    "max_position_embeddings",
    "num_nextn_predict_layers",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "interleave_moe_layer_step",
    "n_group",
    "topk_group",
    "max_window_layers",
)

_INT_LIST_FIELDS = ("mlp_only_layers", "moe_layers")

_BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "use_sliding_window")

_STR_FIELDS = ("hidden_act", "model_type")

_DICT_FIELDS = ("rope_parameters", "rope_scaling", "quantization_config", "auto_map")

_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

_DTYPE_FIELDS = ("dtype", "torch_dtype")

_DTYPES = frozenset({"auto", "float32", "float16", "bfloat16", "float64", "float", "half", "double"})


def _int_problem(path: str, value: Any) -> Finding | None:
    if is_int(value):
        if value < 0:
            return Finding(
                "CONFIG_INVALID", f"config.json field {path} must not be negative, got {value}", HINT_CONFIG, path=path
            )
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return Finding(
            "CONFIG_INVALID",
            f"config.json field {path} must be an integer, got {show(value)}",
            f"write {int(value)}: transformers and the servers refuse a float there",
            path=path,
        )
    return Finding(
        "CONFIG_INVALID",
        f"config.json field {path} must be an integer, got {type_name(value)} ({show(value)})",
        HINT_CONFIG,
        path=path,
    )


def dims_fields(spec: FamilySpec) -> dict[str, tuple[str, ...]]:
    """Config keys per dim symbol, as :func:`moetool.arch.dims.resolve_dims` reads them."""
    fields = {**COMMON_FIELDS, **spec.fields}
    for symbol, aliases in ALIASES.items():
        fields[symbol] = tuple(dict.fromkeys(fields.get(symbol, ()) + aliases))
    return fields


def _check_types(cfg: Mapping[str, Any], prefix: str, spec: FamilySpec | None) -> list[Finding]:
    """Type checks of the registry's dims fields and the common transformers fields."""
    out: list[Finding] = []
    seen: set[str] = set()

    def present(key: str) -> tuple[bool, Any]:
        return _get(cfg, key)

    def check_int(key: str, *, lists: bool) -> None:
        if key in seen:
            return
        seen.add(key)
        ok, value = present(key)
        if not ok:
            return
        if isinstance(value, list) and lists:
            for index, item in enumerate(value):
                problem = _int_problem(f"{prefix}{key}[{index}]", item)
                if problem:
                    out.append(problem)
                    return
            return
        problem = _int_problem(prefix + key, value)
        if problem:
            out.append(problem)

    if spec is not None:
        for keys in dims_fields(spec).values():
            for key in keys:
                check_int(key, lists=True)  # per-layer lists (Hunyuan) are checked element by element
        for rule in spec.flags.values():
            if not callable(rule):
                _check_kind(cfg, prefix, rule[0], bool, "a boolean (true or false)", out)
        if spec.routing.renormalize_key:
            # A flag in most families, a p-norm (1.0) in DBRX: a boolean or a number.
            ok, value = _get(cfg, spec.routing.renormalize_key)
            if ok and not isinstance(value, bool):
                _check_number(cfg, prefix, spec.routing.renormalize_key, out)
        if spec.routing.scaling_key:
            _check_number(cfg, prefix, spec.routing.scaling_key, out)
    for key in _INT_FIELDS:
        check_int(key, lists=False)
    for key in _INT_LIST_FIELDS:
        ok, value = present(key)
        if ok and not isinstance(value, list):
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} must be a list of layer indices, got {type_name(value)}",
                    HINT_CONFIG,
                    path=prefix + key,
                )
            )
        elif ok:
            check_int(key, lists=True)
    for key in _NUMBER_FIELDS:
        _check_number(cfg, prefix, key, out)
    for key in _BOOL_FIELDS:
        _check_kind(cfg, prefix, key, bool, "a boolean (true or false)", out)
    for key in _STR_FIELDS:
        _check_kind(cfg, prefix, key, str, "a string", out)
    for key in _DICT_FIELDS:
        _check_kind(cfg, prefix, key, dict, "an object", out)
    for key in _TOKEN_FIELDS:
        ok, value = present(key)
        if not ok:
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(is_int(v) and v >= 0 for v in items):
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} must be a token id (or a list of them), got {show(value)}",
                    HINT_CONFIG,
                    path=prefix + key,
                )
            )
    for key in _NUMBER_FIELDS:
        ok, value = _get(cfg, key)
        number = ok and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if number and key.endswith("dropout") and not 0 <= value <= 1:
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} is {value}: a dropout probability lies in 0..1",
                    HINT_CONFIG,
                    path=prefix + key,
                )
            )
    ok, pad = _get(cfg, "pad_token_id")
    vocab_keys = dims_fields(spec)["V"] if spec is not None else COMMON_FIELDS["V"]
    vocab = lookup(cfg, vocab_keys)[0]
    if ok and is_int(pad) and is_int(vocab) and pad >= vocab > 0:
        out.append(
            Finding(
                "CONFIG_INVALID",
                f"config.json field {prefix}pad_token_id is {pad}, outside the vocabulary of {vocab} tokens",
                "set pad_token_id to a token of the vocabulary, or null",
                path=prefix + "pad_token_id",
            )
        )
    for key in _DTYPE_FIELDS:
        ok, value = present(key)
        if ok and (not isinstance(value, str) or value.removeprefix("torch.") not in _DTYPES):
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} names no dtype transformers knows: {show(value)}",
                    "use float32, float16 or bfloat16",
                    path=prefix + key,
                )
            )
    ok, layer_types = _get(cfg, "layer_types")
    if ok and (not isinstance(layer_types, list) or not all(isinstance(v, str) for v in layer_types)):
        out.append(
            Finding(
                "CONFIG_INVALID",
                f"config.json field {prefix}layer_types must be a list of strings",
                HINT_CONFIG,
                path=prefix + "layer_types",
            )
        )
    return out


def _get(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted key; null counts as absent, as in :func:`resolve_dims`."""
    value, found = lookup(cfg, (key,))
    return found is not None, value


def _check_kind(cfg: Mapping[str, Any], prefix: str, key: str, kind: type, what: str, out: list[Finding]) -> None:
    ok, value = _get(cfg, key)
    if not ok:
        return
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        out.append(
            Finding(
                "CONFIG_INVALID",
                f"config.json field {prefix}{key} must be {what}, got {type_name(value)} ({show(value)})",
                HINT_CONFIG,
                path=prefix + key,
            )
        )


def _check_number(cfg: Mapping[str, Any], prefix: str, key: str, out: list[Finding]) -> None:
    ok, value = _get(cfg, key)
    if not ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        out.append(
            Finding(
                "CONFIG_INVALID",
                f"config.json field {prefix}{key} must be a finite number, got {type_name(value)} ({show(value)})",
                HINT_CONFIG,
                path=prefix + key,
            )
        )


def _family(config: Mapping[str, Any]) -> FamilySpec | None:
    try:
        return family_for_config(config)
    except UnsupportedArchitectureError:
        return None
    except ConfigError:
        return None  # the type checks below name the field


def config_prefix(spec: FamilySpec | None, config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if spec is not None and spec.text_config_key:
        nested = text_config(spec, config)
        if nested is not config:
            return nested, spec.text_config_key + "."
    return config, ""


def _sizes(spec: FamilySpec, cfg: Mapping[str, Any], prefix: str) -> list[Finding]:
    """Sizes that would make counting loop for ever (fatal), checked before dims are resolved."""
    fields = dims_fields(spec)

    def value(symbol: str) -> tuple[Any, str | None]:
        return lookup(cfg, fields.get(symbol, ()))

    out: list[Finding] = []
    layers, layers_key = value("L")
    experts, experts_key = value("E") if spec.is_moe else (None, None)
    _, mtp = _get(cfg, "num_nextn_predict_layers")

    def fatal(key: str | None, got: int, limit: int, what: str) -> Finding:
        return Finding(
            "CONFIG_INVALID",
            f"config.json field {prefix}{key} is {got:,}: {what} (moetool's limit: {limit:,})",
            HINT_CONFIG,
            FATAL,
        )

    if is_int(layers) and layers > MAX_LAYERS:
        out.append(fatal(layers_key, layers, MAX_LAYERS, "no model has that many layers"))
    if is_int(experts) and experts > MAX_EXPERTS:
        out.append(fatal(experts_key, experts, MAX_EXPERTS, "no model has that many experts per layer"))
    if is_int(layers) and is_int(experts) and not out and layers * experts > MAX_LAYER_EXPERTS:
        out.append(fatal(experts_key, experts, MAX_LAYER_EXPERTS // max(layers, 1), f"too many for {layers} layers"))
    if is_int(mtp) and mtp > MAX_MTP:
        out.append(fatal("num_nextn_predict_layers", mtp, MAX_MTP, "implausibly many MTP modules"))
    for symbol, what in _POSITIVE.items():
        if symbol == "E" and not spec.is_moe:
            continue
        # A derived family's templates name config fields themselves: a generic head field they do not
        # use may be 0 (GLM-5-Next's head_dim is its RoPE width, 0 without RoPE).
        if spec.derived and symbol not in spec.fields:
            continue
        got, key = value(symbol)
        if is_int(got) and got == 0:
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} is 0: a model needs at least one {what}",
                    HINT_CONFIG,
                    FATAL,
                    path=prefix + (key or ""),
                )
            )
    return out


def _routing(spec: FamilySpec, dims: Dims, cfg: Mapping[str, Any], prefix: str) -> list[Finding]:
    """Top-k in 1..experts on every MoE layer, and group-limited routing that can pick k experts."""
    if not spec.is_moe or not dims.moe_layers:
        return []
    fields = dims_fields(spec)
    _, k_key = lookup(cfg, fields["K"])
    _, e_key = lookup(cfg, fields["E"])
    k_key = prefix + (k_key or "num_experts_per_tok")
    e_key = prefix + (e_key or "num_experts")
    out: list[Finding] = []
    for layer in sorted(dims.moe_layers):
        values = dims.for_layer(layer)
        k, e = values.get("K"), values.get("E")
        if not is_int(k) or not is_int(e) or e == 0:
            continue
        if not 1 <= k <= e:
            out.append(
                Finding(
                    "TOPK_INVALID",
                    f"config.json field {k_key} is {k}, but the model has {e} experts per MoE layer "
                    f"({e_key}): top-k must lie in 1..{e}",
                    f"set {k_key} to the number of experts each token uses (at most {e})",
                )
            )
            break
    groups = _groups(spec)
    if groups is not None and not out:
        n_key, tg_key = groups
        n_group, topk_group = _get(cfg, n_key)[1], _get(cfg, tg_key)[1]
        values = dims.values
        e, k = values.get("E"), values.get("K")
        if is_int(n_group) and is_int(e) and is_int(k):
            tg = topk_group if is_int(topk_group) else n_group
            if n_group < 1 or e % n_group:
                out.append(
                    Finding(
                        "CONFIG_INVALID",
                        f"config.json field {prefix}{n_key} is {n_group}: it must divide the {e} experts",
                        HINT_CONFIG,
                    )
                )
            elif not 1 <= tg <= n_group:
                out.append(
                    Finding(
                        "CONFIG_INVALID",
                        f"config.json field {prefix}{tg_key} is {tg}: it must lie in 1..{n_key} ({n_group})",
                        HINT_CONFIG,
                    )
                )
            elif k > tg * (e // n_group):
                out.append(
                    Finding(
                        "TOPK_INVALID",
                        f"config.json asks for top-{k} from {tg} group(s) of {e // n_group} experts "
                        f"({prefix}{tg_key} x experts per group < top-k)",
                        HINT_CONFIG,
                    )
                )
    return out


def _groups(spec: FamilySpec) -> tuple[str, str] | None:
    """The group-routing config keys of a family (the registry's merge traits)."""
    rule = spec.merge.groups
    return (rule.n_group_key, rule.topk_group_key) if rule is not None else None


def _resolve(spec: FamilySpec, config: Mapping[str, Any]) -> tuple[Dims | None, list[Finding]]:
    """Resolve dims (and the family's other config readers), turning any failure into a finding."""
    try:
        dims = resolve_dims(spec, config)
        if spec.windows is not None:
            spec.windows.read(text_config(spec, config), dims.num_layers)
    except MoetoolError as exc:
        return None, [Finding(exc.code if exc.code != "ERROR" else "CONFIG_INVALID", exc.message, exc.hint, FATAL)]
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        # The registry reads configs the way transformers writes them; a value of another shape
        # (a string where a list belongs, ...) ends here instead of in a traceback.
        return None, [
            Finding(
                "CONFIG_INVALID",
                f"config.json cannot be read as a {spec.name} config ({type(exc).__name__}: {exc})",
                HINT_CONFIG,
                FATAL,
            )
        ]
    return dims, []


def validate_config(config: Mapping[str, Any]) -> list[Finding]:
    """Check config.json alone: field types (with their JSON path), plausible sizes, top-k, groups.

    An unknown family gets only the checks of the fields every transformers config shares.

    Args:
        config: the parsed config.json.

    Returns:
        The findings, fatal ones first.
    """
    findings, _spec, _dims = config_findings(config)
    return findings


def config_findings(config: Mapping[str, Any]) -> tuple[list[Finding], FamilySpec | None, Dims | None]:
    spec = _family(config)
    cfg, prefix = config_prefix(spec, config)
    findings = _check_types(cfg, prefix, spec)
    if spec is None:
        return findings, None, None
    fatal = _sizes(spec, cfg, prefix)
    if fatal:
        return [*fatal, *findings], spec, None
    dims, problems = _resolve(spec, config)
    if dims is None:
        keys = {prefix + key for keys in dims_fields(spec).values() for key in keys}
        for index, finding in enumerate(findings):
            if finding.path is not None and re.sub(r"\[\d+\]$", "", finding.path) in keys:
                # The type check names the field and its JSON path; resolving only says it failed.
                promoted = Finding(finding.code, finding.message, finding.hint, FATAL, finding.path)
                return [promoted, *findings[:index], *findings[index + 1 :]], spec, None
        return [*problems, *findings], spec, None
    findings += _routing(spec, dims, cfg, prefix)
    return fatal_first(findings), spec, dims
