"""The config.json of the upcycled model, derived from the dense one with the registry's field names.

The dense config is copied (rope, norms, vocabulary, special tokens, ... keep their meaning), then the
keys that belong to the dense family's own conventions are replaced by the target family's: model type
and architecture, expert count, top-k and widths (``E``, ``K``, ``I``, ``D``, ``S`` fields of the
registry), the renormalise flag (``norm_topk_prob: true`` where the family does not renormalise by
default), the MoE layer schedule (``mlp_only_layers`` / ``decoder_sparse_step``), sliding windows and
the attention flags. No family name appears here: everything comes from :mod:`moetool.arch`.

Attention, norms and embeddings are copied tensor for tensor, so the target must store exactly the
same ones: :func:`compatibility_problems` compares the tensors both families' templates give for the
two configs, and the target's boolean flags (``qkv_bias``, ``attention_bias``) are chosen to match.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from moetool.arch.dims import COMMON_FIELDS, Dims, eval_dim, resolve_dims, template_applies
from moetool.arch.spec import FamilySpec, T
from moetool.errors import ConfigError, UsageError

# Keys transformers writes for its own bookkeeping; the copy must not claim the dense model's values.
_BOOKKEEPING = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")

# Per-layer categories that upcycling copies unchanged (the MLP categories are what it rewrites).
COPIED_LAYER_CATEGORIES = ("attention", "norms")
COPIED_GLOBAL_CATEGORIES = ("embedding", "norms", "lm_head")


def field_key(spec: FamilySpec, symbol: str) -> str:
    """The config key a family uses for a dimension symbol (its own first, else the common one)."""
    keys = spec.fields.get(symbol) or COMMON_FIELDS.get(symbol)
    if not keys:
        raise ConfigError(f"the {spec.name} family has no config field for {symbol}")
    return keys[0]


def _instantiate(prefix: str, templates: tuple[T, ...], values: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        prefix + t.name: tuple(eval_dim(term, values) for term in t.shape)
        for t in templates
        if template_applies(t, values)
    }


def copied_tensors(spec: FamilySpec, dims: Dims, layer: int | None) -> dict[str, tuple[int, ...]]:
    """Relative name -> shape of the tensors upcycling copies: one layer's, or the globals (``None``)."""
    if layer is None:
        out: dict[str, tuple[int, ...]] = {}
        for category in COPIED_GLOBAL_CATEGORIES:
            out.update(_instantiate("", spec.globals_.get(category, ()), dims.values))
        return out
    values = dims.for_layer(layer)
    out = {}
    for category in COPIED_LAYER_CATEGORIES:
        out.update(_instantiate("", getattr(spec, category), values))
    return out


def compatibility_problems(source: FamilySpec, source_dims: Dims, target: FamilySpec, target_dims: Dims) -> list[str]:
    """What the target cannot hold of the tensors upcycling copies (empty when compatible).

    Compares names and shapes of the global tensors and of every layer's attention and norms.
    """
    problems: list[str] = []
    layers: list[int | None] = [None, *range(source_dims.num_layers)]
    for layer in layers:
        have = copied_tensors(source, source_dims, layer)
        want = copied_tensors(target, target_dims, layer)
        where = "" if layer is None else f"layer {layer}: "
        for name in have.keys() - want.keys():
            problems.append(f"{where}{target.name} has no {name}")
        for name in want.keys() - have.keys():
            problems.append(f"{where}{target.name} needs {name}, which the {source.name} model lacks")
        for name in have.keys() & want.keys():
            if have[name] != want[name]:
                problems.append(f"{where}{name} is {list(have[name])} here but {list(want[name])} in {target.name}")
        if problems:
            break  # one layer says enough
    return sorted(problems)


def _flag_keys(spec: FamilySpec) -> list[tuple[str, bool]]:
    """The (config key, default) of a family's plain boolean flags (not the computed ones)."""
    return [rule for rule in spec.flags.values() if isinstance(rule, tuple)]


def _solve_flags(
    source: FamilySpec, source_dims: Dims, source_config: Mapping[str, Any], target: FamilySpec, config: dict[str, Any]
) -> list[str]:
    """Set the target's boolean flags so that its attention matches the source's; returns the problems left.

    Tries the target's flag assignments in order of preference (the source's value of the same key,
    else the target's default, first) and keeps the first that leaves no difference.
    """
    flags = _flag_keys(target)
    preferred = [bool(source_config.get(key, default)) for key, default in flags]
    candidates = sorted(
        itertools.product((False, True), repeat=len(flags)),
        key=lambda combo: sum(a != b for a, b in zip(combo, preferred, strict=True)),
    )
    first_problems: list[str] | None = None
    for combo in candidates:
        values = {key: value for (key, _), value in zip(flags, combo, strict=True)}
        problems = compatibility_problems(source, source_dims, target, resolve_dims(target, {**config, **values}))
        if not problems:
            config.update(values)
            return []
        if first_problems is None:
            first_problems = problems
    return first_problems or []


def target_config(
    *,
    source: FamilySpec,
    source_dims: Dims,
    source_config: Mapping[str, Any],
    target: FamilySpec,
    num_experts: int,
    top_k: int,
    expert_width: int,
    shared_width: int | None,
    dense_layers: list[int],
    sparse_step: int,
    dtype: str,
) -> dict[str, Any]:
    """Derive the target family's config.json from the dense one.

    Args:
        source / source_dims / source_config: the dense family, its resolved dims and config.json.
        target: the MoE family to write.
        num_experts / top_k: the values to write (already multiplied by the granularity).
        expert_width: the routed experts' intermediate size.
        shared_width: the shared expert's intermediate size (``None`` when the family has none).
        dense_layers: layers that keep a dense MLP (``mlp_only_layers``); empty for all-MoE.
        sparse_step: ``decoder_sparse_step`` (every n-th layer is MoE), 1 for all.
        dtype: the torch dtype name written as ``dtype``.

    Returns:
        The config as a dict, keys of the dense config first (in their order), then the new ones.

    Raises:
        UsageError: ``ARCH_INCOMPATIBLE`` when the target cannot hold the dense model's attention,
            norms or sliding-window pattern.
    """
    config: dict[str, Any] = copy.deepcopy(dict(source_config))
    dense_width_key = field_key(source, "D")
    drop = {*_BOOKKEEPING, "torch_dtype", "dtype", dense_width_key}
    drop.update(key for key, _ in _flag_keys(source))
    if source.windows is not None:
        drop.update(source.windows.keys)
    for key in drop:
        config.pop(key, None)
    config["model_type"] = target.model_types[0]
    config["architectures"] = [target.architectures[0]]
    if target.dense_mlp:  # dense layers keep the dense width (written before I: Mixtral shares the key)
        config[field_key(target, "D")] = source_dims.values["D"]
    config[field_key(target, "E")] = num_experts
    config[field_key(target, "K")] = top_k
    config[field_key(target, "I")] = expert_width
    if shared_width is not None:
        config[field_key(target, "S")] = shared_width
    routing = target.routing
    if routing.renormalize_key:
        # Exactness needs the top-k weights to sum to 1; families that default to not renormalising
        # (Qwen2-MoE, Qwen3-MoE) get the flag written out, and so does every other one, for clarity.
        config[routing.renormalize_key] = True
    if routing.scaling_key:
        config[routing.scaling_key] = 1.0
    if target.schedule == "qwen":
        config["mlp_only_layers"] = dense_layers
        config["decoder_sparse_step"] = sparse_step
    elif dense_layers or sparse_step != 1:
        raise UsageError(f"{target.name} cannot hold dense layers between MoE layers")

    windows = source.windows.read(source_config, source_dims.num_layers) if source.windows else []
    if any(w is not None for w in windows):
        written = target.windows.write(windows) if target.windows and target.windows.write else None
        if written is None:
            raise UsageError(
                f"{target.name} cannot express the sliding-window pattern of this {source.name} model "
                f"({_describe_windows(windows)})",
                hint="choose another --arch, or a model without sliding windows",
                code="ARCH_INCOMPATIBLE",
            )
        config.update(written)
    elif target.windows and target.windows.write:
        config.update(target.windows.write([None] * source_dims.num_layers) or {})
    config["dtype"] = dtype

    problems = _solve_flags(source, source_dims, source_config, target, config)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise UsageError(
            f"cannot upcycle this {source.name} model into {target.name}: {shown}",
            hint=_targets_hint(source),
            code="ARCH_INCOMPATIBLE",
        )
    return config


def _describe_windows(windows: list[int | None]) -> str:
    sliding = [i for i, w in enumerate(windows) if w is not None]
    sizes = sorted({w for w in windows if w is not None})
    return f"window {', '.join(map(str, sizes))} on {len(sliding)} of {len(windows)} layers"


def upcyclable_families() -> list[str]:
    """The dense families upcycle accepts (those the registry gives targets)."""
    from moetool.arch.families import FAMILIES

    return [spec.name for spec in FAMILIES if spec.upcycle_targets]


def _targets_hint(source: FamilySpec) -> str:
    if not source.upcycle_targets:
        return f"moetool upcycles {', '.join(upcyclable_families())} models"
    return f"--arch accepts {', '.join(source.upcycle_targets)} for a {source.name} model"
