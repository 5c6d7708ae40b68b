"""Derived families reproduce published parameter counts from config.json alone.

Configs: the defaults of the installed transformers' config classes, whose docstrings name the
checkpoint they describe (``@auto_docstring(checkpoint=...)``), written out as config.json files with
``to_dict()``; and NLLB-MoE-54B, whose config is rebuilt from its published architecture (d_model 2048,
24 + 24 layers, 128 experts every 4th layer, FFN 8192, vocabulary 256,206). Published figures are the
model cards' (or the model's name, for "XB-AYB" names); the tolerance is half a unit of their last
digit unless a comment says otherwise.
"""

from __future__ import annotations

import pytest

from moetool.count.params import count_from_config

# model type (class defaults), checkpoint, published total (B), published active (B) or None, active
# convention, tolerances (B) for total / active.
PUBLISHED = [
    ("phimoe", "microsoft/Phi-3.5-MoE-instruct", 41.9, 6.6, "with_embedding", 0.05, 0.05),
    ("jamba", "ai21labs/Jamba-v0.1", 52, 12, "with_embedding", 0.5, 0.5),
    # Published 671B / 37B like DeepSeek-V3 (the MTP module excluded); the indexer adds 0.9B.
    ("deepseek_v32", "deepseek-ai/DeepSeek-V3.2-Exp", 671, 37, "without_embedding", 1.0, 0.5),
    ("mimo_v2_flash", "XiaomiMiMo/MiMo-V2-Flash", 309, 15, "without_embedding", 0.5, 0.5),
    # Active is dynamic (zero-compute experts: 18.6B-31.3B per token); only the total is comparable.
    ("longcat_flash", "meituan-longcat/LongCat-Flash-Chat", 560, None, "", 1.0, 0),
    # The name's figures, rounded down like Qwen3-Next's "A3B"; the total includes the vision tower.
    ("qwen3_5_moe", "Qwen/Qwen3.5-35B-A3B", 35, 3, "without_embedding", 0.5, 0.5),
    ("minicpm5_moe", "openbmb/MiniCPM5-15B-A2.5B", 15, 2.5, "without_embedding", 0.5, 0.05),
    ("mistral4", "mistralai/Mistral-Small-4-119B-2603", 119, None, "", 0.5, 0),
]


def _class_default(model_type: str) -> dict:
    from moetool.arch.derive.probe import config_class, quiet

    with quiet():
        config = config_class(model_type)().to_dict()
    config["model_type"] = model_type
    return config


@pytest.mark.parametrize(
    ("model_type", "checkpoint", "total", "active", "convention", "tol_total", "tol_active"), PUBLISHED
)
def test_class_default_configs_reproduce_published_figures(
    model_type, checkpoint, total, active, convention, tol_total, tol_active
):
    report = count_from_config(_class_default(model_type), name=checkpoint)
    assert report.total_params / 1e9 == pytest.approx(total, abs=tol_total)
    if active is not None:
        measured = report.active_params if convention == "with_embedding" else report.active_params_without_embedding
        assert measured / 1e9 == pytest.approx(active, abs=tol_active)


def test_nllb_moe_54b():
    config = {
        "model_type": "nllb-moe",
        "d_model": 2048,
        "encoder_layers": 24,
        "decoder_layers": 24,
        "encoder_ffn_dim": 8192,
        "decoder_ffn_dim": 8192,
        "encoder_attention_heads": 16,
        "decoder_attention_heads": 16,
        "num_experts": 128,
        "encoder_sparse_step": 4,
        "decoder_sparse_step": 4,
        "vocab_size": 256206,
        "max_position_embeddings": 1024,
    }
    report = count_from_config(config, name="facebook/nllb-moe-54b")
    assert report.total_params / 1e9 == pytest.approx(54.5, abs=0.05)
    # Encoder and decoder layers in one sequence: 12 MoE layers of 48.
    assert report.num_layers == 48 and len(report.moe_layers) == 12
    assert (report.num_experts, report.top_k) == (128, 2)


# Switch Transformers (Fedus et al. 2021, Table 9): architecture and published parameter count. T5's
# 32,128-token vocabulary, untied head, 64-wide heads; experts every other layer (Base) or every layer (C).
SWITCH = [
    pytest.param("switch-base-128", 768, 3072, 12, 12, 128, 2, 7.4, 0.1, id="switch-base-128"),
    pytest.param("switch-c-2048", 2080, 6144, 15, 32, 2048, 1, 1571, 1.0, id="switch-c-2048"),
]


@pytest.mark.parametrize(("name", "d_model", "d_ff", "layers", "heads", "experts", "step", "total", "tol"), SWITCH)
def test_switch_transformers_published(name, d_model, d_ff, layers, heads, experts, step, total, tol):
    config = {
        "model_type": "switch_transformers",
        "vocab_size": 32128,
        "d_model": d_model,
        "d_kv": 64,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_heads": heads,
        "num_experts": experts,
        "encoder_sparse_step": step,
        "decoder_sparse_step": step,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
    }
    report = count_from_config(config, name=f"google/{name}")
    assert report.total_params / 1e9 == pytest.approx(total, abs=tol)
    assert len(report.moe_layers) == 2 * layers // step and report.top_k == 1
