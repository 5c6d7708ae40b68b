"""The real configs of well-known MoE models reproduce their published parameter counts.

Configs (and three index files) are copies of tests/data/moe-configs (from ../shared/moe-configs; see
PROVENANCE.json there). Published figures are rounded; each row says which active convention the
publisher used (GUIDE.md section 2: DeepSeek, gpt-oss and the Qwen "A3B"-style names leave the input
embedding out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetool.count.params import count_from_config

CONFIGS = Path(__file__).parent / "data" / "moe-configs"

# folder, published total (B), published active (B), active convention, tolerances (B) for total/active.
# The default tolerance is half a unit of the published figure's last digit; wider ones are explained.
PUBLISHED = [
    ("mistralai__Mixtral-8x7B-v0.1", 46.7, 12.9, "with_embedding", 0.05, 0.05),
    ("mistralai__Mixtral-8x22B-v0.1", 141, 39, "with_embedding", 0.5, 0.5),
    # 3.353B by the architecture (48 x (8 experts + attention + router) + embedding + head); Qwen's
    # card truncates it to 3.3B.
    ("Qwen__Qwen3-30B-A3B", 30.5, 3.3, "with_embedding", 0.05, 0.06),
    ("Qwen__Qwen3-235B-A22B", 235, 22, "with_embedding", 0.5, 0.5),
    ("Qwen__Qwen3-Coder-480B-A35B-Instruct", 480, 35, "with_embedding", 0.5, 0.5),
    # "A3B" is the model's name: the computed 3.6B (without input embedding) is its true activation.
    ("Qwen__Qwen3-Next-80B-A3B-Thinking", 80, 3, "without_embedding", 0.5, 0.6),
    ("Qwen__Qwen1.5-MoE-A2.7B-Chat", 14.3, 2.7, "with_embedding", 0.05, 0.05),
    ("Qwen__Qwen2-57B-A14B", 57, 14, "with_embedding", 0.5, 0.5),
    ("deepseek-ai__DeepSeek-V3", 671, 37, "without_embedding", 0.5, 0.5),
    ("deepseek-ai__DeepSeek-R1", 671, 37, "without_embedding", 0.5, 0.5),
    ("deepseek-ai__DeepSeek-V2.5", 236, 21, "without_embedding", 0.5, 0.5),
    ("deepseek-ai__DeepSeek-V2-Lite", 16, 2.4, "without_embedding", 0.5, 0.06),
    ("deepseek-ai__deepseek-moe-16b-base", 16.4, 2.8, "with_embedding", 0.05, 0.05),
    ("openai__gpt-oss-120b", 117, 5.1, "without_embedding", 0.5, 0.05),
    ("openai__gpt-oss-20b", 21, 3.6, "without_embedding", 0.5, 0.05),
    # The Llama-4 configs are trimmed to the text model; the published total includes the vision
    # encoder (about 1.2B for Scout, 0.7B for Maverick), which a text config cannot describe.
    ("meta-llama__Llama-4-Scout-17B-16E-Instruct", 109, 17, "with_embedding", 1.5, 0.5),
    ("meta-llama__Llama-4-Maverick-17B-128E-Instruct", 400, 17, "with_embedding", 1.0, 0.5),
    # "1T" is rounded to the nearest trillion.
    ("moonshotai__Kimi-K2-Instruct", 1000, 32, "with_embedding", 50, 1.0),
    ("databricks__dbrx-instruct", 132, 36, "with_embedding", 0.5, 0.5),
    ("tencent__Hunyuan-A13B-Instruct", 80, 13, "with_embedding", 0.5, 0.5),
    ("ibm-granite__granite-3.1-1b-a400m-instruct", 1.3, 0.4, "with_embedding", 0.05, 0.05),
    # Low-confidence config copy (README): the figures are only the right magnitude.
    ("MiniMaxAI__MiniMax-M2.5", 230, 10, "without_embedding", 2.0, 0.5),
]


def _config(folder: str) -> dict:
    return json.loads((CONFIGS / folder / "config.json").read_text())


def test_every_shared_config_has_a_row():
    folders = {p.name for p in CONFIGS.iterdir() if p.is_dir()}
    assert folders == {row[0] for row in PUBLISHED}


@pytest.mark.parametrize(("folder", "total", "active", "convention", "tol_total", "tol_active"), PUBLISHED)
def test_published_figures(folder, total, active, convention, tol_total, tol_active):
    report = count_from_config(_config(folder), name=folder)
    measured_active = report.active_params if convention == "with_embedding" else report.active_params_without_embedding
    assert report.total_params / 1e9 == pytest.approx(total, abs=tol_total)
    assert measured_active / 1e9 == pytest.approx(active, abs=tol_active)


def test_golden_exact_counts():
    """Exact counts, checked by hand against the architecture; they guard against silent drift."""
    mixtral = count_from_config(_config("mistralai__Mixtral-8x7B-v0.1"))
    assert mixtral.total_params == 46_702_792_704
    assert mixtral.active_params == 12_879_925_248
    v3 = count_from_config(_config("deepseek-ai__DeepSeek-V3"))
    assert v3.total_params == 671_026_419_200
    # DeepSeek's README_WEIGHTS: the MTP module is 11.5B unique parameters plus its own copies of the
    # embedding and output head (0.93B each); all stored: 684.5B.
    assert v3.categories["mtp"].total == 13_463_426_304
    assert v3.categories["mtp"].total - 2 * 129_280 * 7_168 == 11_610_068_224
    assert v3.total_params_with_mtp == 684_489_845_504
    assert v3.moe_layers == list(range(3, 61))
    assert (v3.num_experts, v3.top_k, v3.num_shared_experts) == (256, 8, 1)


def test_index_total_size_matches_predicted_bytes():
    """The bf16 Mixtral index's total_size (bytes) is exactly 2 bytes per predicted parameter."""
    for folder in ("mistralai__Mixtral-8x7B-v0.1", "mistralai__Mixtral-8x22B-v0.1"):
        index = json.loads((CONFIGS / folder / "model.safetensors.index.json").read_text())
        report = count_from_config(_config(folder))
        assert index["metadata"]["total_size"] == 2 * report.total_params


@pytest.mark.parametrize(
    "folder", ["mistralai__Mixtral-8x7B-v0.1", "mistralai__Mixtral-8x22B-v0.1", "openai__gpt-oss-20b"]
)
def test_real_tensor_names_match_family_templates(folder):
    """Every tensor name of the real checkpoint's index is placed by a template, not a heuristic."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.count.classify import TensorClassifier
    from moetool.count.quant import QuantScheme, logical_tensor
    from moetool.io.safetensors_header import TensorInfo

    config = _config(folder)
    spec = family_for_config(config)
    classifier = TensorClassifier(spec, resolve_dims(spec, config))
    scheme = QuantScheme.from_config(config)
    names = json.loads((CONFIGS / folder / "model.safetensors.index.json").read_text())["weight_map"]
    categories = set()
    for name in names:
        dtype = "U8" if name.endswith(("_blocks", "_scales")) else "BF16"
        logical = logical_tensor(TensorInfo(name, dtype, (1,), "x", 0, 1), scheme)
        if logical.storage_only:
            continue
        placement = classifier.classify(logical.name)
        assert placement.matched, name
        categories.add(placement.category)
    assert {"embedding", "lm_head", "attention", "router", "routed_experts", "norms"} <= categories
