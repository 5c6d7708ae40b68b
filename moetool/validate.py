"""Check a checkpoint before any work: config types and values, tensors against the family registry.

Every command runs the same checks before it computes anything (and before ``quantize`` imports
torch), so a bad input costs a fraction of a second and one line, never a crash half-way or an
output that transformers refuses:

* **config.json types and values**: the integer fields of the family's dims are integers (``160.0``
  and ``"8"`` are refused, with the JSON path), sizes are plausible, top-k lies in 1..experts,
  DeepSeek-style groups divide the experts, and the common transformers fields have their types;
* **tensors against the config**: every tensor the registry's templates imply
  (:func:`moetool.arch.plan.planned_tensors`) is stored, with the shape the config implies (router
  rows = experts, expert shapes, fused layouts, hidden size); a missing single expert tensor is named
  with its layer and expert;
* **float weights**, for commands that rewrite them: FP8, packed or otherwise quantized inputs are
  named as such;
* **values** (:func:`check_input`, opt-in because it reads every byte): NaN and Inf.

:func:`validate_checkpoint` returns :class:`Finding` objects (``inspect`` shows them as warnings);
:func:`check_input` and :func:`preflight` raise the first error as a typed
:class:`~moetool.errors.MoetoolError`. Nothing here imports torch; numpy only for the value scan.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.dims import ALIASES, COMMON_FIELDS, Dims, lookup, resolve_dims, text_config
from moetool.arch.plan import planned_tensors
from moetool.arch.registry import family_for_config
from moetool.arch.spec import FamilySpec, T
from moetool.errors import (
    CheckpointError,
    ConfigError,
    MoetoolError,
    MoetoolWarning,
    NonfiniteError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)

#: Levels of a finding. ``fatal``: the config cannot even be counted (inspect fails too); ``error``:
#: commands refuse (inspect warns, or fails with ``--strict``); ``warning``: reported, never refused.
FATAL, ERROR, WARNING = "fatal", "error", "warning"

# Beyond these a config is not a model any machine holds, and looping over its layers or experts
# would hang: refuse instead. (DeepSeek-V3: 61 layers x 256 experts; Kimi-K2: 384 experts.)
MAX_LAYERS = 10_000
MAX_EXPERTS = 65_536
MAX_LAYER_EXPERTS = 2**20
MAX_MTP = 64

# How many problems a one-line message names before it gives a count.
_SHOWN = 3

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
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

HINT_CONFIG = "fix config.json (it must describe the weights stored beside it), or re-download the checkpoint"
HINT_SHAPES = "config.json and the weights belong to different models: re-download the checkpoint or fix config.json"
HINT_MISSING = "the checkpoint is incomplete: re-download it (hf download REPO), or re-save it with transformers"
HINT_QUANTIZED = "pass the original float16/bfloat16/float32 checkpoint, or dequantize this one first"


@dataclass(frozen=True)
class Finding:
    """One problem of a checkpoint.

    Attributes:
        code: stable identifier (``CONFIG_INVALID``, ``SHAPE_MISMATCH``, ``EXPERT_MISSING``, ...).
        message: one line naming the field or tensor, what was found and what was expected.
        hint: what to do about it.
        level: :data:`FATAL`, :data:`ERROR` or :data:`WARNING`.
        path: the JSON path of the config.json field it is about, when it is about one.
    """

    code: str
    message: str
    hint: str | None = None
    level: str = ERROR
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"code": self.code, "level": self.level, "message": self.message, "hint": self.hint}
        if self.path is not None:
            doc["path"] = self.path
        return doc


@dataclass
class Validation:
    """What :func:`check_input` found (it raises on errors, so what is left is for the record).

    Attributes:
        findings: warnings (and, with ``raise_errors=False``, errors).
        nonfinite: the tensors holding NaN/Inf, ``None`` when values were not scanned.
    """

    findings: list[Finding] = field(default_factory=list)
    nonfinite: list[Any] | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level in (FATAL, ERROR)]


# ----------------------------------------------------------------------------- config.json


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    from moetool.io.safetensors_header import short_repr

    return short_repr(value, 60)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_problem(path: str, value: Any) -> Finding | None:
    if _is_int(value):
        if value < 0:
            return Finding(
                "CONFIG_INVALID", f"config.json field {path} must not be negative, got {value}", HINT_CONFIG, path=path
            )
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return Finding(
            "CONFIG_INVALID",
            f"config.json field {path} must be an integer, got {_show(value)}",
            f"write {int(value)} (transformers and the servers refuse a float there)",
            path=path,
        )
    return Finding(
        "CONFIG_INVALID",
        f"config.json field {path} must be an integer, got {_type_name(value)} ({_show(value)})",
        HINT_CONFIG,
        path=path,
    )


def _dims_fields(spec: FamilySpec) -> dict[str, tuple[str, ...]]:
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
        for keys in _dims_fields(spec).values():
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
                    f"config.json field {prefix}{key} must be a list of layer indices, got {_type_name(value)}",
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
        if not items or not all(_is_int(v) and v >= 0 for v in items):
            out.append(
                Finding(
                    "CONFIG_INVALID",
                    f"config.json field {prefix}{key} must be a token id (or a list of them), got {_show(value)}",
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
    vocab_keys = _dims_fields(spec)["V"] if spec is not None else COMMON_FIELDS["V"]
    vocab = lookup(cfg, vocab_keys)[0]
    if ok and _is_int(pad) and _is_int(vocab) and pad >= vocab > 0:
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
                    f"config.json field {prefix}{key} names no dtype transformers knows: {_show(value)}",
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
                f"config.json field {prefix}{key} must be {what}, got {_type_name(value)} ({_show(value)})",
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
                f"config.json field {prefix}{key} must be a finite number, got {_type_name(value)} ({_show(value)})",
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


def _prefix(spec: FamilySpec | None, config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if spec is not None and spec.text_config_key:
        nested = text_config(spec, config)
        if nested is not config:
            return nested, spec.text_config_key + "."
    return config, ""


def _sizes(spec: FamilySpec, cfg: Mapping[str, Any], prefix: str) -> list[Finding]:
    """Sizes that would make counting loop for ever (fatal), checked before dims are resolved."""
    fields = _dims_fields(spec)

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

    if _is_int(layers) and layers > MAX_LAYERS:
        out.append(fatal(layers_key, layers, MAX_LAYERS, "no model has that many layers"))
    if _is_int(experts) and experts > MAX_EXPERTS:
        out.append(fatal(experts_key, experts, MAX_EXPERTS, "no model has that many experts per layer"))
    if _is_int(layers) and _is_int(experts) and not out and layers * experts > MAX_LAYER_EXPERTS:
        out.append(fatal(experts_key, experts, MAX_LAYER_EXPERTS // max(layers, 1), f"too many for {layers} layers"))
    if _is_int(mtp) and mtp > MAX_MTP:
        out.append(fatal("num_nextn_predict_layers", mtp, MAX_MTP, "implausibly many MTP modules"))
    if _is_int(layers) and layers == 0:
        out.append(
            Finding(
                "CONFIG_INVALID", f"config.json field {prefix}{layers_key} is 0: a model needs a layer", HINT_CONFIG
            )
        )
    return out


def _routing(spec: FamilySpec, dims: Dims, cfg: Mapping[str, Any], prefix: str) -> list[Finding]:
    """Top-k in 1..experts on every MoE layer, and group-limited routing that can pick k experts."""
    if not spec.is_moe or not dims.moe_layers:
        return []
    fields = _dims_fields(spec)
    _, k_key = lookup(cfg, fields["K"])
    _, e_key = lookup(cfg, fields["E"])
    k_key = prefix + (k_key or "num_experts_per_tok")
    e_key = prefix + (e_key or "num_experts")
    out: list[Finding] = []
    for layer in sorted(dims.moe_layers):
        values = dims.for_layer(layer)
        k, e = values.get("K"), values.get("E")
        if not _is_int(k) or not _is_int(e) or e == 0:
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
        if _is_int(n_group) and _is_int(e) and _is_int(k):
            tg = topk_group if _is_int(topk_group) else n_group
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
    """The group-routing config keys of a family (kept with merge's family traits)."""
    try:
        from moetool.merge.traits import TRAITS
    except ImportError:  # pragma: no cover - part of moetool
        return None
    traits = TRAITS.get(spec.name)
    rule = getattr(traits, "groups", None)
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
    findings, _spec, _dims = _config_findings(config)
    return findings


def _config_findings(config: Mapping[str, Any]) -> tuple[list[Finding], FamilySpec | None, Dims | None]:
    spec = _family(config)
    cfg, prefix = _prefix(spec, config)
    findings = _check_types(cfg, prefix, spec)
    if spec is None:
        return findings, None, None
    fatal = _sizes(spec, cfg, prefix)
    if fatal:
        return [*fatal, *findings], spec, None
    dims, problems = _resolve(spec, config)
    if dims is None:
        keys = {prefix + key for keys in _dims_fields(spec).values() for key in keys}
        for index, finding in enumerate(findings):
            if finding.path is not None and re.sub(r"\[\d+\]$", "", finding.path) in keys:
                # The type check names the field and its JSON path; resolving only says it failed.
                promoted = Finding(finding.code, finding.message, finding.hint, FATAL, finding.path)
                return [promoted, *findings[:index], *findings[index + 1 :]], spec, None
        return [*problems, *findings], spec, None
    findings += _routing(spec, dims, cfg, prefix)
    return _fatal_first(findings), spec, dims


def _fatal_first(findings: list[Finding]) -> list[Finding]:
    order = {FATAL: 0, ERROR: 1, WARNING: 2}
    return sorted(findings, key=lambda f: order.get(f.level, 1))


# ----------------------------------------------------------------------------- transformers' own config class

# JSON of the configs transformers accepted already (a command checks the same config several times).
_ACCEPTED: set[str] = set()


def transformers_config_findings(config: Mapping[str, Any]) -> list[Finding]:
    """Build the config the way transformers will (``CONFIG_MAPPING[model_type].from_dict``).

    transformers 5 configs are strict dataclasses: a field of another type (``1`` where a float belongs,
    ``"8"`` where a bool belongs) is refused when the model or its tokenizer is loaded. Checking it
    here turns that into a finding naming the field. Imports transformers (and torch with it): for
    commands that load the model anyway, never for ``inspect``.

    Args:
        config: the parsed config.json.

    Returns:
        One finding when transformers refuses the config; none for a model_type it does not know
        (the commands refuse those on their own).
    """
    import json

    try:
        key = json.dumps(config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _ACCEPTED:
        return []
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return []
    config_class = CONFIG_MAPPING[model_type]
    from moetool.modeling import quiet_transformers

    try:
        with quiet_transformers():
            config_class.from_dict(dict(config))
    except Exception as exc:  # any refusal of hostile input becomes a finding, whatever its class
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        return [
            Finding(
                "CONFIG_INVALID",
                f"transformers' {config_class.__name__} refuses config.json: {detail}",
                HINT_CONFIG,
            )
        ]
    if key is not None:
        _ACCEPTED.add(key)
    return []


def check_transformers_config(checkpoint: Any) -> None:
    """Raise :func:`transformers_config_findings` as a ``CONFIG_INVALID`` error (before a model load).

    Raises:
        ConfigError: transformers refuses the checkpoint's config.json.
    """
    error = as_error(transformers_config_findings(checkpoint.config), checkpoint.name)
    if error is not None:
        raise error


# ----------------------------------------------------------------------------- tensors


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
    fields = _dims_fields(spec)

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
        if plain and info.dtype in _FLOAT_DTYPES:
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
    cfg, _ = _prefix(spec, checkpoint.config)
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
        out.append(Finding("SHAPE_MISMATCH", _summary(mismatched, "tensor(s) disagree with config.json"), HINT_SHAPES))
    if missing_experts:
        out.append(
            Finding("EXPERT_MISSING", _summary(missing_experts, "routed-expert tensor(s) are missing"), HINT_MISSING)
        )
    if missing_other:
        out.append(
            Finding(
                "TENSOR_MISSING",
                _summary(missing_other, "tensor(s) that config.json implies are missing"),
                HINT_MISSING,
            )
        )
    extra = sorted({p.layer for p in map(classifier.classify, beyond) if p.layer is not None and p.category != "mtp"})
    if extra:
        out.append(
            Finding(
                "EXTRA_TENSORS",
                f"tensors of layer(s) {', '.join(map(str, extra[:_SHOWN]))} lie beyond num_hidden_layers "
                f"({dims.num_layers}) and the {spec.name} family has no multi-token-prediction module: "
                "commands pass them through unchanged",
                None,
                WARNING,
            )
        )
    return out


def _summary(items: list[str], what: str) -> str:
    if len(items) == 1:
        return items[0]
    more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {what}: {'; '.join(items[:_SHOWN])}{more}"


def _float_findings(checkpoint: Any, spec: FamilySpec, dims: Dims) -> list[Finding]:
    """Quantized storage named clearly, for commands that read float weights."""
    qc = checkpoint.config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else None
        return [
            Finding(
                "QUANTIZED_INPUT",
                f"{checkpoint.name} is quantized (quantization_config: {_show(method) if method else 'present'}); "
                "this command reads float weights",
                HINT_QUANTIZED,
            )
        ]
    from moetool.count.classify import TensorClassifier

    classifier = TensorClassifier(spec, dims)
    bad: list[Any] = []
    for info in checkpoint.tensors.values():
        if info.dtype in _FLOAT_DTYPES:
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
    findings, spec, dims = _config_findings(checkpoint.config)
    if spec is None or dims is None:
        return findings
    if checkpoint.tensors:
        findings += _shape_findings(checkpoint, spec, dims)
        if float_weights:
            findings += _float_findings(checkpoint, spec, dims)
    return _fatal_first(findings)


# ----------------------------------------------------------------------------- refusing


_ERROR_CLASSES: dict[str, type[MoetoolError]] = {
    "SHAPE_MISMATCH": ShapeMismatchError,
    "EXPERT_MISSING": CheckpointError,
    "TENSOR_MISSING": CheckpointError,
    "QUANTIZED_INPUT": CheckpointError,
}


def as_error(findings: list[Finding], name: str) -> MoetoolError | None:
    """The typed error a command raises for these findings (``None`` when none is an error).

    The message is the first error's; when there are more, it says how many and the hint points at
    ``moetool inspect``, which lists them all.
    """
    errors = [f for f in findings if f.level in (FATAL, ERROR)]
    if not errors:
        return None
    first = errors[0]
    message = f"{name}: {first.message}"
    hint = first.hint
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
        hint = (hint + "; " if hint else "") + f"`moetool inspect {name}` lists them all"
    cls = _ERROR_CLASSES.get(first.code, ConfigError)
    return cls(message, hint=hint, code=first.code)


_WARNED: set[tuple[str, str]] = set()


def _warn_once(name: str, message: str) -> None:
    if (name, message) not in _WARNED:
        _WARNED.add((name, message))
        warnings.warn(message, MoetoolWarning, stacklevel=3)


def check_input(
    checkpoint: Any,
    *,
    float_weights: bool = False,
    scan_nonfinite: bool = True,
    allow_nonfinite: bool = False,
    transformers_config: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Validation:
    """Refuse an input that is not what its config says, before any compute (what every command runs).

    Args:
        checkpoint: the opened input checkpoint.
        float_weights: refuse quantized storage (commands that rewrite weights: merge, quantize, upcycle).
        scan_nonfinite: read every float tensor and count NaN/Inf (commands that write a model).
        allow_nonfinite: report NaN/Inf as a warning instead of refusing.
        transformers_config: also build the config with transformers' own class
            (:func:`transformers_config_findings`; imports transformers).
        on_bytes: progress callback of the value scan, bytes read.

    Returns:
        The warnings, and the NaN/Inf found (only with ``allow_nonfinite``).

    Raises:
        ConfigError: a config field of the wrong type or value (``CONFIG_INVALID``, ``TOPK_INVALID``).
        ShapeMismatchError: a tensor shape the config does not imply (``SHAPE_MISMATCH``).
        CheckpointError: ``EXPERT_MISSING``, ``TENSOR_MISSING``, ``QUANTIZED_INPUT``.
        NonfiniteError: ``NONFINITE_WEIGHTS`` without ``allow_nonfinite``.
        InputChangedError: a shard changed while it was being scanned.
    """
    findings = validate_checkpoint(checkpoint, float_weights=float_weights)
    error = as_error(findings, checkpoint.name)
    if error is not None:
        raise error
    if transformers_config:
        check_transformers_config(checkpoint)
    for finding in findings:
        _warn_once(checkpoint.name, finding.message)
    result = Validation(findings=findings)
    if scan_nonfinite and checkpoint.root is not None and checkpoint.tensors:
        from moetool.io.nonfinite import describe, scan_checkpoint

        found = scan_checkpoint(checkpoint, on_bytes=on_bytes)
        result.nonfinite = found
        if found and not allow_nonfinite:
            raise NonfiniteError(
                f"{checkpoint.name}: {describe(found)}",
                hint="the weights are corrupt (moetool inspect --scan-nonfinite lists them); pass "
                "--allow-nonfinite to process them anyway",
                code="NONFINITE_WEIGHTS",
            )
        if found:
            _warn_once(checkpoint.name, f"{describe(found)} (processed anyway: --allow-nonfinite)")
    return result


def preflight(
    model: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    float_weights: bool = False,
) -> Validation:
    """What a command runs first: open ``MODEL`` from its headers and refuse it if it is malformed.

    Reads config.json and the safetensors headers only (a Hub repo: remotely, nothing downloaded),
    imports no torch, and raises the same errors as :func:`check_input` (without the value scan),
    so a bad input is refused in well under a second, before datasets are read or models loaded.

    Args:
        model: a local folder or a Hub repo id.
        revision / token / offline: Hub access.
        float_weights: see :func:`check_input`.

    Returns:
        The warnings.
    """
    from moetool.io.source import open_model

    checkpoint = open_model(model, revision=revision, token=token, offline=offline, need_weights=False)
    return check_input(checkpoint, float_weights=float_weights, scan_nonfinite=False, transformers_config=False)


def nonfinite_names(found: Iterable[Any]) -> list[str]:
    """The tensor names of a value scan's result."""
    return [hit.tensor for hit in found]
