"""Tiny random checkpoints of every supported family, built with stock transformers.

Used across the test suite: each call builds a model from a small config, saves it with
``save_pretrained`` (the on-disk layout the family's Hub checkpoints use) and returns the model too,
so tests can compare against what transformers itself instantiates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# model_type -> overrides of BASE. Chosen so every structural feature appears: dense layers mixed
# in, shared experts, MLA with and without the low-rank query, fused layouts, hybrid attention.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "mlp_only_layers": [1],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "mlp_only_layers": [1],
        "head_dim": 8,
    },
    "qwen3_next": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "head_dim": 8,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    },
    "deepseek_v2": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_group": 1,
        "topk_group": 1,
        "num_key_value_heads": 4,  # MLA attends with every head; fewer kv heads breaks the forward
    },
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 12,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "n_group": 2,
        "topk_group": 1,
        "num_key_value_heads": 4,
        "num_nextn_predict_layers": 0,
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "layer_types": None},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "llama4_text": {
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 40,
        "interleave_moe_layer_step": 2,
        "head_dim": 8,
    },
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2, "head_dim": 8},
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
    "dbrx": {
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 3,
        "max_seq_len": 64,
        "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # clip_qkv=None crashes
    },
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
}

MOE_TYPES = [t for t in FAMILY_OVERRIDES if t not in ("llama", "mistral", "qwen2", "qwen3")]
DENSE_TYPES = ["llama", "mistral", "qwen2", "qwen3"]
ALL_TYPES = list(FAMILY_OVERRIDES)


def tiny_config(model_type: str, **overrides: Any):
    """A transformers config object for a tiny model of this family."""
    from transformers import AutoConfig

    kwargs = dict(BASE)
    if model_type == "dbrx":
        kwargs = {"vocab_size": BASE["vocab_size"]}
    kwargs.update(FAMILY_OVERRIDES[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny(model_type: str, path: Path, *, seed: int = 0, **overrides: Any):
    """Build, save (safetensors) and return a tiny random model of the family."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return model


def stored_numel(model) -> int:
    """Parameters plus persistent buffers (what save_pretrained stores), tied tensors once."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        total += tensor.numel()
    return total


# ----------------------------------------------------------------------------- derived families


def derived_entries() -> dict[str, dict[str, Any]]:
    """The generated registry entries (moetool/arch/data/derived_families.json), by model type."""
    from moetool.arch.derived import load_table

    return {entry["model_type"]: entry for entry in load_table()["families"]}


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        # A dict keyed by layer index (Gemma-4's per_layer_config) is a whole value: the class
        # default's entries for layers past the tiny depth must not survive.
        per_layer = isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not per_layer:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def derived_tiny_config(model_type: str, **overrides: Any):
    """The tiny config the generator recorded for a derived family (class defaults + its changes)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    tiny = _deep_merge(derived_entries()[model_type]["tiny"], overrides)
    return cls.from_dict(_deep_merge(cls().to_dict(), tiny))


def build_tiny_derived(model_type: str, path: Path | None = None, *, seed: int = 0, **overrides: Any):
    """Build (and save, when ``path`` is given) a tiny random model of a derived family."""
    import torch
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = derived_tiny_config(model_type, **overrides)
    cls = getattr(transformers, derived_entries()[model_type]["model_class"])
    model = cls._from_config(config).eval()
    # Hash-routing tables (DeepSeek-V4's tid2eid) start as zeros, every token sending all k choices to
    # expert 0; real checkpoints store distinct experts per token: give each token k distinct ones.
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid") and buffer.dim() == 2:
            experts = int(buffer.max()) + 1 if buffer.any() else None
            experts = experts or _num_experts(config)
            rows = [torch.randperm(experts, generator=generator)[: buffer.shape[1]] for _ in range(buffer.shape[0])]
            buffer.copy_(torch.stack(rows))
    if path is not None:
        model.save_pretrained(path)
    return model


def _num_experts(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    raise ValueError("no expert count in the config")
