"""Which model types of the installed transformers are Mixture-of-Experts models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Config keys that declare routed experts (counts, top-k, or a switch that turns MoE blocks on).
MOE_KEYS = frozenset(
    {
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
        "n_experts",
        "num_routed_experts",
        "num_experts_per_tok",
        "moe_topk",
        "moe_k",
        "enable_moe_block",
        "top_k_experts",
    }
)


def _declares_experts(config: Mapping[str, Any], depth: int = 0) -> bool:
    for key, value in config.items():
        if isinstance(value, Mapping) and depth < 3:
            if _declares_experts(value, depth + 1):
                return True
        elif key in MOE_KEYS and value not in (None, False, 0):
            if key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") and value == 1:
                continue
            return True
        elif key in ("is_moe", "enable_moe_block"):
            return True
    return False


def _config_dict(cls: Any) -> dict[str, Any] | None:
    try:
        return cls().to_dict()
    except Exception:
        fields = getattr(cls, "__dataclass_fields__", {}) or {}
        return {name: True for name in fields}


def moe_model_types() -> dict[str, bool]:
    """Model types whose config declares routed experts: model type -> whether a checkpoint of it
    loads as a generative model class (causal LM, seq2seq LM or image-text-to-text). The others are
    sub-configurations (``*_text``, vision encoders) that only occur nested in a wrapper's config.

    A config declares experts when any key of it (or of a nested sub-config) is an expert count above
    one, a top-k, or a switch that enables MoE blocks (``enable_moe_block``, ``is_moe``), whatever
    the default value: hunyuan_v1_moe defaults to one expert, Gemma-4 to no MoE block.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from moetool.arch.derive.probe import config_class, model_class_name, quiet

    out: dict[str, bool] = {}
    with quiet():
        for model_type in sorted(CONFIG_MAPPING_NAMES):
            try:
                cls = config_class(model_type)
            except Exception:
                continue
            fields = set(getattr(cls, "__dataclass_fields__", {}) or {})
            config = _config_dict(cls) or {}
            if _declares_experts(config) or fields & {"num_local_experts", "n_routed_experts", "moe_num_experts"}:
                out[model_type] = model_class_name(model_type) is not None
    return out
